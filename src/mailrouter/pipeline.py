"""The one path every inbound message takes: parse → resolve → decide → persist.

SMTP, LMTP, the IMAP watcher, ``mailrouter ingest`` and ``replay`` all call
:meth:`Pipeline.accept`; it commits the message, its interaction and the delivery work
(an outbox row) in one transaction and only then returns, so a caller that acknowledges
after it returns never acknowledges mail that is not safely stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar, assert_never

from sqlalchemy import delete, select, text
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from mailrouter.config import AccountSettings, Settings
from mailrouter.deliver.outbox import enqueue, mark_bounced
from mailrouter.errors import Refused
from mailrouter.log import event
from mailrouter.parse import ParsedMessage, format_id, parse
from mailrouter.retry import backoff
from mailrouter.routing import INTERNAL_ERROR, Action, Decision, decide
from mailrouter.runtime import Runtime
from mailrouter.store.inserts import (
    add_message,
    add_recipients,
    insert_interaction,
    touch_interaction,
)
from mailrouter.store.models import (
    INTERACTIONS,
    MESSAGE_RECIPIENTS,
    MESSAGE_REFS,
    MESSAGES,
    Direction,
    Message,
    MessageRecipient,
    OutboxKind,
    utcnow,
)
from mailrouter.store.prepared import savepoint
from mailrouter.store.queries import AccountMap, StoreView

__all__ = ["Accepted", "NotHeld", "Pipeline", "StoreUnavailable", "ThreadBusy"]

T = TypeVar("T")
routing_log = logging.getLogger("mailrouter.routing")

log = logging.getLogger("mailrouter.pipeline")


class NotHeld(Refused):
    """``release`` was asked for a message that is not held."""

    def __init__(self, message: str) -> None:
        super().__init__("not-held", message)


class StoreUnavailable(Exception):
    """The store could not take the message; the sender must retry (SMTP 451)."""


class ThreadBusy(Exception):
    """Another instance is storing mail of the same thread, or changing its interaction,
    right now (PostgreSQL): this message is resolved again in a moment."""


# Below this size a message is parsed on the event loop (~0.2 ms for 4 KB): a hand-off to
# a thread and back cost more than that and made the writer thread wait for the GIL.
# parse() reads only the header section and hashes the body in slices, so its time grows
# slowly with size; bigger messages still go to a thread so the loop never stalls.
INLINE_PARSE_LIMIT = 64 * 1024
# ThreadBusy lasts as long as another instance's transaction (milliseconds; a group
# commit of a burst perhaps 100 ms): retried with a short doubling wait, about 3 s in all,
# before the sender is told 451.
_BUSY_ATTEMPTS = 30
_BUSY_INITIAL, _BUSY_CAP = 0.005, 0.2
# "SELECT ... FOR UPDATE NOWAIT" found the row locked.
_LOCK_NOT_AVAILABLE = "55P03"
_TRY_LOCKS = text(
    "SELECT bool_and(pg_try_advisory_xact_lock(k)) FROM unnest(CAST(:keys AS bigint[])) AS k"
)


def thread_keys(msg: ParsedMessage) -> list[int]:
    """Advisory-lock keys for every id that could join ``msg`` to another message: its own
    Message-ID and every id it points at.  Two messages that the thread rules could put in
    one interaction always share one of these (a reply names its parent; siblings name
    their common ancestor), so holding them all serialises exactly the races that could
    split a thread.  Sorted, so everyone takes them in one order."""
    ids = {i for i in (msg.message_id, *msg.parents) if i}
    return sorted(
        int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big", signed=True)
        for i in ids
    )


@dataclass(frozen=True)
class Accepted:
    decision: Decision
    message_pk: int | None
    interaction_id: int | None
    outbox_id: int | None = None


class Pipeline:
    """Accept, explain and release inbound mail on one :class:`~mailrouter.runtime.Runtime`."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.db = rt.db

    # Read through the runtime on every use, so that a reload applies at once.
    @property
    def settings(self) -> Settings:
        return self.rt.settings

    @property
    def accounts(self) -> AccountMap:
        return self.rt.accounts

    # ------------------------------------------------------------------ recipients

    def order_recipients(
        self, msg: ParsedMessage, accounts: Sequence[AccountSettings]
    ) -> list[str]:
        """Account names, those named in To/Cc first in header order, then the rest."""
        by_addr = {a.address: a.name for a in accounts}
        ordered = [by_addr[r] for r in msg.recipients if r in by_addr]
        ordered += [a.name for a in accounts]
        return list(dict.fromkeys(ordered))

    # ------------------------------------------------------------------ accept

    def explain(
        self, raw: bytes, accounts: Sequence[AccountSettings], envelope_sender: str | None = None
    ) -> tuple[ParsedMessage, Decision]:
        """The decision :meth:`accept` would take now, without changing anything."""
        msg = parse(raw, envelope_sender)
        with self.db.read() as session:
            view = StoreView(session, self.accounts)
            return msg, decide(
                msg,
                self.order_recipients(msg, accounts),
                view,
                subject_token=self.settings.notify.subject_token or None,
            )

    def accept(
        self,
        raw: bytes,
        accounts: Sequence[AccountSettings],
        *,
        source: str,
        envelope_sender: str | None = None,
        in_mailbox_of: str | None = None,
    ) -> Accepted:
        """Store ``raw`` for ``accounts`` and queue its delivery; returns after the commit.

        ``in_mailbox_of`` names the account whose mailbox the message was read from (the
        IMAP watcher): no delivery is queued into that mailbox, since it is there already.

        Raises :class:`StoreUnavailable` when the store cannot take it (retry later).  A
        message that breaks the routing code is stored as held instead: one bad message
        must never stop the stage, nor be lost.
        """
        started = time.perf_counter()
        msg, receiving = self._prepare(raw, accounts, envelope_sender)

        def once() -> Accepted:
            with self.db.write() as session:
                return self._accept_in(session, msg, receiving, source, in_mailbox_of)

        try:
            result = self._with_retry(once)
        except StoreUnavailable:
            self.rt.metrics.received(receiving[0], source, "tempfail")
            raise
        self.rt.metrics.accepted(time.perf_counter() - started)
        self._log(msg, result, source)
        return result

    async def accept_async(
        self,
        raw: bytes,
        accounts: Sequence[AccountSettings],
        *,
        source: str,
        envelope_sender: str | None = None,
        in_mailbox_of: str | None = None,
    ) -> Accepted:
        """:meth:`accept` for the daemon: the same work, group-committed with other writes."""
        started = time.perf_counter()
        if len(raw) < INLINE_PARSE_LIMIT:
            msg, receiving = self._prepare(raw, accounts, envelope_sender)
        else:
            msg, receiving = await asyncio.to_thread(self._prepare, raw, accounts, envelope_sender)
        for attempt in range(1, _BUSY_ATTEMPTS + 1):
            try:
                # Atomic: _accept_in runs in a savepoint of its own.
                result = await self.rt.writes.submit(
                    lambda s: self._accept_in(s, msg, receiving, source, in_mailbox_of),
                    atomic=True,
                )
                break
            except Exception as exc:
                if not self._retryable(exc, attempt):
                    self.rt.metrics.received(receiving[0], source, "tempfail")
                    raise self._unavailable(exc) from exc
                if isinstance(exc, ThreadBusy):
                    await asyncio.sleep(backoff(attempt, _BUSY_INITIAL, _BUSY_CAP))
        self.rt.metrics.accepted(time.perf_counter() - started)
        self._log(msg, result, source)
        return result

    def accept_many(
        self,
        batch: Sequence[tuple[bytes, Sequence[AccountSettings]]],
        *,
        source: str,
    ) -> list[Accepted]:
        """:meth:`accept` for many messages in ONE transaction (bulk import: ``replay``).

        One commit per batch instead of per message is what makes a bulk import fast (the
        commit's fsync dominates).  The batch is atomic: a crash leaves none of it applied,
        and since every message is recognised as a duplicate when it is seen again, a rerun
        after a crash is idempotent.  A store error in the batch (another instance inserted
        one of these messages, or holds one of their threads, meanwhile) rolls all of it back
        and raises :class:`StoreUnavailable`: the caller accepts those messages one by one,
        each with :meth:`accept`'s own retry, and learns which of them failed.
        """
        started = time.perf_counter()
        prepared = [self._prepare(raw, accounts, None) for raw, accounts in batch]
        try:
            with self.db.write() as session:
                results = [
                    self._accept_in(session, msg, receiving, source, None)
                    for msg, receiving in prepared
                ]
        except (SQLAlchemyError, ThreadBusy) as exc:
            raise self._unavailable(exc) from exc
        each = (time.perf_counter() - started) / max(1, len(batch))
        for (msg, _receiving), result in zip(prepared, results, strict=True):
            self.rt.metrics.accepted(each)
            self._log(msg, result, source)
        return results

    def accept_in(
        self, session: Session, raw: bytes, accounts: Sequence[AccountSettings], *, source: str
    ) -> Accepted:
        """:meth:`accept`'s work inside the caller's transaction (``replay --dry-run``)."""
        msg, receiving = self._prepare(raw, accounts, None)
        return self._accept_in(session, msg, receiving, source, None)

    def _prepare(
        self, raw: bytes, accounts: Sequence[AccountSettings], envelope_sender: str | None
    ) -> tuple[ParsedMessage, list[str]]:
        if not accounts:
            raise ValueError("accept() needs at least one receiving account")
        msg = parse(raw, envelope_sender)
        # Read a bounce here, off the writer thread, where resolution will want it.
        _ = msg.bounce
        return msg, self.order_recipients(msg, accounts)

    def _with_retry(self, once: Callable[[], T]) -> T:
        for attempt in range(1, _BUSY_ATTEMPTS + 1):
            try:
                return once()
            except NotHeld:
                raise  # a refusal, not a store problem
            except Exception as exc:
                if not self._retryable(exc, attempt):
                    raise self._unavailable(exc) from exc
                if isinstance(exc, ThreadBusy):
                    time.sleep(backoff(attempt, _BUSY_INITIAL, _BUSY_CAP))
        raise AssertionError("unreachable")

    @staticmethod
    def _retryable(exc: Exception, attempt: int) -> bool:
        if isinstance(exc, ThreadBusy):
            return attempt < _BUSY_ATTEMPTS
        # Another instance stored the same message between our look-up and insert; the
        # second attempt sees it and takes the duplicate path.
        return isinstance(exc, IntegrityError) and attempt == 1

    @staticmethod
    def _unavailable(exc: Exception) -> StoreUnavailable:
        if isinstance(exc, StoreUnavailable):
            return exc
        if isinstance(exc, IntegrityError):
            return StoreUnavailable("conflicting concurrent insert")
        if isinstance(exc, ThreadBusy):
            return StoreUnavailable("its thread stayed busy on another instance")
        if isinstance(exc, OperationalError):
            return StoreUnavailable(f"store unavailable: {exc.orig}")
        return StoreUnavailable(f"store error: {exc}")

    def _accept_in(
        self,
        session: Session,
        msg: ParsedMessage,
        receiving: list[str],
        source: str,
        in_mailbox_of: str | None,
        pk: int | None = None,
    ) -> Accepted:
        """Decide and persist in ``session``; a crash in the routing code holds the message.

        ``pk``: store the message under this key (a released message keeps its id).
        """
        try:
            # Core only in here, so a driver-level savepoint will do (store/prepared.py).
            with savepoint(session.connection()):
                return self._apply(session, msg, receiving, source, in_mailbox_of, pk)
        except (SQLAlchemyError, ThreadBusy):
            raise  # the store's problem, not the message's: the caller retries or 451s
        except Exception as exc:  # noqa: BLE001 - event() logs it with exc_info
            event(
                log, "routing-crashed", logging.ERROR, exc_info=exc, msgid=format_id(msg.message_id)
            )
            with savepoint(session.connection()):
                return self._hold_after_crash(session, msg, receiving, source, exc, pk)

    def _apply(
        self,
        session: Session,
        msg: ParsedMessage,
        receiving: list[str],
        source: str,
        in_mailbox_of: str | None = None,
        pk: int | None = None,
    ) -> Accepted:
        view = StoreView(session, self.accounts)
        started = time.perf_counter()
        if not self.db.is_sqlite:
            self._lock_thread(session, msg)
        d = decide(msg, receiving, view, subject_token=self.settings.notify.subject_token or None)
        if (
            not self.db.is_sqlite
            and d.interaction_id is not None
            and d.owner is not None
            and self._lock_interaction(session, d.interaction_id) != d.owner
        ):
            # A transfer committed after decide read the owner: decide again, now that
            # no transfer can change it until this transaction ends.
            d = decide(
                msg, receiving, view, subject_token=self.settings.notify.subject_token or None
            )
        self.rt.metrics.resolved(time.perf_counter() - started)
        ids = [self.accounts.id(n) for n in receiving]
        match d.action:
            case Action.DUPLICATE:
                return Accepted(d, d.existing_pk, d.interaction_id)
            case Action.ATTACH:
                assert d.existing_pk is not None
                have = view.existing(msg.message_id, msg.content_hash)
                known = {self.accounts.id(n) for n in (have[1] if have else set())}
                add_recipients(session, d.existing_pk, [a for a in ids if a not in known])
                return Accepted(d, d.existing_pk, d.interaction_id)
            case Action.HOLD:
                return self._store_held(session, msg, ids, source, d, pk)
            case Action.DELIVER | Action.ROUTE:
                return self._store_and_deliver(session, msg, ids, source, in_mailbox_of, d, pk)
            case _:
                assert_never(d.action)

    def _lock_thread(self, session: Session, msg: ParsedMessage) -> None:
        """PostgreSQL: hold this message's thread keys until the transaction ends.

        On SQLite one writer at a time resolves and stores, so a message always sees the
        one stored before it.  On PostgreSQL two instances resolve at once, and neither
        sees the other's uncommitted message: two replies to one parent that is not
        stored, or a message and its reply, would each open an interaction.  The lock is
        tried, never waited for: a group commit holds its locks until its whole batch
        commits, and two batches waiting on each other would deadlock.
        """
        keys = thread_keys(msg)
        # bool_and over no keys is NULL, not true: a message with no id at all locks nothing.
        if keys and not session.connection().scalar(_TRY_LOCKS, {"keys": keys}):
            raise ThreadBusy(format_id(msg.message_id))

    def _lock_interaction(self, session: Session, interaction_id: int) -> str | None:
        """PostgreSQL: lock the interaction's row (NOWAIT, as above) and return its owner
        (an account name) as read under the lock.

        A transfer locks the row too: with it held, the owner cannot change between the
        routing decision and the commit, so a reply to the old address is never delivered
        to the old owner after a transfer that its notice did not see.
        """
        stmt = (
            select(INTERACTIONS.c.account_id)
            .where(INTERACTIONS.c.id == interaction_id)
            .with_for_update(nowait=True)
        )
        # No savepoint of its own: a refused lock aborts the message's savepoint
        # (``_accept_in``), which the ThreadBusy raised here rolls back.
        try:
            account_id = session.connection().scalar(stmt)
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) == _LOCK_NOT_AVAILABLE:
                raise ThreadBusy(f"interaction {interaction_id}") from exc
            raise
        return None if account_id is None else self.accounts.name(account_id)

    def _store_and_deliver(
        self,
        session: Session,
        msg: ParsedMessage,
        ids: list[int],
        source: str,
        in_mailbox_of: str | None,
        d: Decision,
        pk: int | None = None,
    ) -> Accepted:
        """Store the message in its interaction (a new one if need be) and queue delivery."""
        assert d.owner is not None and d.deliver_to is not None
        owner_id = self.accounts.id(d.owner)
        now = utcnow()
        if d.interaction_id is None:
            iid = insert_interaction(
                session,
                account_id=owner_id,
                customer_address=msg.reply_to_email or msg.from_email or None,
                customer_name=msg.from_name or None,
                subject=msg.subject or None,
                now=now,
            )
        else:
            iid = d.interaction_id
        pk = add_message(
            session,
            msg,
            direction=Direction.INBOUND,
            account_id=ids[0],
            interaction_id=iid,
            pk=pk,
            source=source,
            recipients=ids,
            # Routed only when the owner was not among the recipients: a Cc to the old and
            # the new address reached the owner directly.
            routed_to=owner_id if d.action == Action.ROUTE else None,
            rule=d.rule,
            action=d.action,
            step=d.step,
            matched_id=d.matched_id,
        )
        # New customer mail makes the conversation unread again (and reopens a closed one),
        # but never changes its owner: only a transfer does (no automatic return).  Only
        # the customer's own mail becomes the one replies and notices answer: a colleague
        # or stranger who joined by In-Reply-To must never receive the agent's reply.
        touch_interaction(
            session, iid, message_pk=pk, senders=(msg.from_email, msg.reply_to_email), now=now
        )
        if d.rule == "bounce-of" and msg.bounce is not None and d.matched_id is not None:
            # The notice or reply it reports on did not reach the customer after all.
            mark_bounced(session, d.matched_id, msg.bounce.summary())
        if d.deliver_to == in_mailbox_of:
            return Accepted(d, pk, iid)
        out = enqueue(
            session,
            self.settings,
            kind=OutboxKind.DELIVER,
            account_id=self.accounts.id(d.deliver_to),
            interaction_id=iid,
            message_pk=pk,
            envelope_to=[self.settings.account(d.deliver_to).address],
        )
        return Accepted(d, pk, iid, out)

    def _hold_after_crash(
        self,
        session: Session,
        msg: ParsedMessage,
        receiving: list[str],
        source: str,
        exc: Exception,
        pk: int | None = None,
    ) -> Accepted:
        d = Decision(
            Action.HOLD,
            INTERNAL_ERROR.name,
            receiving[0],
            reason=f"internal error: {type(exc).__name__}: {exc}",
            step=INTERNAL_ERROR.name,
        )
        seen = StoreView(session, self.accounts).existing(msg.message_id, msg.content_hash)
        if seen is not None:
            return Accepted(d, seen[0], None)
        ids = [self.accounts.id(n) for n in receiving]
        return self._store_held(session, msg, ids, source, d, pk)

    @staticmethod
    def _store_held(
        session: Session,
        msg: ParsedMessage,
        ids: list[int],
        source: str,
        d: Decision,
        pk: int | None = None,
    ) -> Accepted:
        """Keep a message for inspection: no interaction, no delivery, the reason recorded."""
        pk = add_message(
            session,
            msg,
            direction=Direction.INBOUND,
            account_id=ids[0],
            interaction_id=None,
            pk=pk,
            source=source,
            recipients=ids,
            rule=d.rule,
            action=d.action,
            hold_reason=d.reason or d.rule,
            step=d.step,
            matched_id=d.matched_id,
        )
        return Accepted(d, pk, None)

    def release(self, message_pk: int) -> Accepted:
        """Route a held message again (after its cause was fixed), in one transaction.

        The held row gives way to whatever the pipeline decides now, under the same key (so
        ``m12`` in the queue stays message 12, held again or delivered); if that fails, the
        transaction rolls back and the message stays held — it is never lost on the way.
        """

        def once() -> tuple[ParsedMessage, Accepted]:
            with self.db.write() as session:
                row = session.get(Message, message_pk)
                if row is None or row.status != "held":
                    raise NotHeld(f"message {message_pk} is not held")
                receiving = [
                    self.accounts.name(a)
                    for a in session.scalars(
                        select(MessageRecipient.account_id).where(
                            MessageRecipient.message_pk == message_pk
                        )
                    )
                ] or [self.accounts.name(row.account_id)]
                # The envelope sender it came with still decides "automatic" (a bounce).
                msg = parse(row.raw, row.envelope_from)
                for table, column in (
                    (MESSAGE_REFS, "message_pk"),
                    (MESSAGE_RECIPIENTS, "message_pk"),
                    (MESSAGES, "id"),
                ):
                    session.execute(delete(table).where(table.c[column] == message_pk))
                session.expunge(row)
                source = row.source or "release"
                return msg, self._accept_in(session, msg, receiving, source, None, message_pk)

        msg, result = self._with_retry(once)
        # After the commit, like accept(); a release is a decision, not a new arrival.
        self._log(msg, result, "release", arrived=False)
        return result

    def _log(self, msg: ParsedMessage, r: Accepted, source: str, *, arrived: bool = True) -> None:
        """The one line per ingest and decision (``event=decision``), and its counters."""
        d = r.decision
        if arrived:
            self.rt.metrics.received(d.receiving, source, d.action)
        self.rt.metrics.decided(d.rule, d.action)
        account = self.settings.account(d.receiving).address
        owner = self.settings.account(d.owner).address if d.owner else None
        held = d.action == Action.HOLD
        event(
            routing_log,
            "decision",
            logging.WARNING if held else logging.INFO,
            interaction=r.interaction_id,
            msgid=format_id(msg.message_id),
            account=account,
            owner=owner,
            rule=d.rule,
            action=d.action,
            step=d.step,
            status="held" if held else None,
            matched=format_id(d.matched_id) if d.matched_id else None,
            reason=d.reason,
            auto=msg.automatic,
            message=r.message_pk,
            queue=f"m{r.message_pk}" if held and r.message_pk is not None else None,
            source=source,
            size=len(msg.raw),
        )
