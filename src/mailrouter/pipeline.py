"""The one path every inbound message takes: parse → resolve → decide → persist.

SMTP, LMTP, the IMAP watcher, ``mailrouter ingest`` and ``replay`` all call
:meth:`Pipeline.accept`; it commits the message, its interaction and the delivery work
(an outbox row) in one transaction and only then returns, so a caller that acknowledges
after it returns never acknowledges mail that is not safely stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection, Insert, delete, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from mailrouter.config import AccountSettings, Settings
from mailrouter.log import event
from mailrouter.parse import ParsedMessage, format_id, parse
from mailrouter.routing.decide import Decision, decide
from mailrouter.store.db import Database, open_database
from mailrouter.store.migrate import ensure_schema
from mailrouter.store.models import (
    INTERACTIONS,
    MESSAGE_RECIPIENTS,
    MESSAGE_REFS,
    MESSAGES,
    OUTBOX,
    Direction,
    Message,
    MessageRecipient,
    OutboxKind,
    utcnow,
)
from mailrouter.store.queries import AccountMap, StoreView, sync_accounts
from mailrouter.store.writer import WriteBatcher

__all__ = ["Accepted", "NotHeld", "Pipeline", "StoreUnavailable", "add_message", "enqueue"]

T = TypeVar("T")
routing_log = logging.getLogger("mailrouter.routing")

# Built once: statements for the per-message hot path (building costs more than running).
_INSERT_MESSAGE = insert(MESSAGES)
_INSERT_REF = insert(MESSAGE_REFS)
_INSERT_RECIPIENT = insert(MESSAGE_RECIPIENTS)
_INSERT_OUTBOX = insert(OUTBOX)
_INSERT_INTERACTION = insert(INTERACTIONS)
log = logging.getLogger("mailrouter.pipeline")


class NotHeld(Exception):
    """``release`` was asked for a message that is not held."""


class StoreUnavailable(Exception):
    """The store could not take the message; the sender must retry (SMTP 451)."""


@dataclass(frozen=True)
class Accepted:
    decision: Decision
    message_pk: int | None
    interaction_id: int | None
    outbox_id: int | None = None


def add_message(
    session: Session,
    msg: ParsedMessage,
    *,
    direction: Direction,
    account_id: int,
    interaction_id: int | None,
    source: str,
    recipients: Sequence[int] = (),
    routed_to: int | None = None,
    decision: Decision | None = None,
) -> int:
    """Insert a message with its id references and recipient accounts; returns its key.

    Core inserts, not ORM objects: this runs once per message on the ingest hot path,
    where the unit of work's bookkeeping cost several times the SQL itself.
    """
    held = decision is not None and decision.action == "hold"
    conn = session.connection()
    pk = _new_id(
        conn,
        _INSERT_MESSAGE,
        dict(
            interaction_id=interaction_id,
            direction=direction.value,
            account_id=account_id,
            routed_to_account_id=routed_to,
            message_id=msg.message_id,
            synthetic_id=msg.synthetic_id,
            in_reply_to=" ".join(format_id(i) for i in msg.in_reply_to) or None,
            references=" ".join(format_id(i) for i in msg.references) or None,
            from_addr=msg.from_display or None,
            reply_to=msg.reply_to_email or None,
            to_addrs=", ".join(msg.recipients) or None,
            subject=msg.subject or None,
            date=msg.date,
            size=len(msg.raw),
            content_hash=msg.content_hash,
            raw=msg.raw,
            automatic=msg.automatic,
            status="held" if held else "stored",
            hold_reason=decision.reason if held and decision is not None else None,
            rule=decision.rule if decision else None,
            action=decision.action if decision else None,
            source=source,
            received_at=utcnow(),
        ),
    )
    refs = [{"message_pk": pk, "position": n, "ref_id": r} for n, r in enumerate(msg.parents)]
    if refs:
        conn.execute(_INSERT_REF, refs)
    rcpts = [{"message_pk": pk, "account_id": a} for a in dict.fromkeys(recipients)]
    if rcpts:
        conn.execute(_INSERT_RECIPIENT, rcpts)
    return pk


def _new_id(conn: Connection, stmt: Insert, params: dict[str, Any]) -> int:
    """The primary key the insert created (lastrowid on SQLite, RETURNING elsewhere)."""
    key = conn.execute(stmt, params).inserted_primary_key
    assert key is not None
    return int(key[0])


def enqueue(
    session: Session,
    settings: Settings,
    *,
    kind: OutboxKind,
    account_id: int,
    interaction_id: int | None,
    message_pk: int | None,
    payload: bytes = b"",
    envelope_from: str = "",
    envelope_to: Sequence[str] = (),
) -> int:
    """Write work for the outbox worker in the caller's transaction (the outbox pattern)."""
    now = utcnow()
    return _new_id(
        session.connection(),
        _INSERT_OUTBOX,
        dict(
            kind=kind.value,
            account_id=account_id,
            interaction_id=interaction_id,
            message_pk=message_pk,
            payload=payload,
            envelope_from=envelope_from,
            envelope_to=",".join(envelope_to),
            status="pending",
            attempts=0,
            created_at=now,
            next_attempt_at=now,
            deadline=now + timedelta(seconds=settings.outbox.lifetime),
        ),
    )


class Pipeline:
    """Settings, the database and the account map: what every stage needs, built once."""

    def __init__(self, settings: Settings, db: Database, accounts: AccountMap) -> None:
        self.settings = settings
        self.db = db
        self.accounts = accounts
        self.writes = WriteBatcher(db)

    @classmethod
    def open(cls, settings: Settings, *, upgrade: bool | None = None) -> Pipeline:
        """Open the store, check (or upgrade) its schema and mirror the configured accounts."""
        db = open_database(settings.database_url)
        try:
            ensure_schema(db, settings.auto_upgrade if upgrade is None else upgrade)
            with db.write() as session:
                accounts = sync_accounts(session, settings)
        except BaseException:
            db.dispose()
            raise
        return cls(settings, db, accounts)

    def close(self) -> None:
        self.writes.shutdown()
        self.db.dispose()

    async def aclose(self) -> None:
        """Close from inside the event loop that used :attr:`writes`."""
        await self.writes.aclose()
        await asyncio.to_thread(self.db.dispose)

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
            return msg, decide(msg, self.order_recipients(msg, accounts), view)

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
        msg, receiving = self._prepare(raw, accounts, envelope_sender)

        def once() -> Accepted:
            with self.db.write() as session:
                return self._accept_in(session, msg, receiving, source, in_mailbox_of)

        result = self._with_retry(once)
        self._log(msg, result)
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
        msg, receiving = await asyncio.to_thread(self._prepare, raw, accounts, envelope_sender)
        for attempt in (1, 2):
            try:
                result = await self.writes.submit(
                    lambda s: self._accept_in(s, msg, receiving, source, in_mailbox_of)
                )
                break
            except Exception as exc:
                if not self._retryable(exc, attempt):
                    raise self._unavailable(exc) from exc
        self._log(msg, result)
        return result

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
        return msg, self.order_recipients(msg, accounts)

    def _with_retry(self, once: Callable[[], T]) -> T:
        for attempt in (1, 2):
            try:
                return once()
            except NotHeld:
                raise  # a refusal, not a store problem
            except Exception as exc:
                if not self._retryable(exc, attempt):
                    raise self._unavailable(exc) from exc
        raise AssertionError("unreachable")

    @staticmethod
    def _retryable(exc: Exception, attempt: int) -> bool:
        # Another instance stored the same message between our look-up and insert; the
        # second attempt sees it and takes the duplicate path.
        return isinstance(exc, IntegrityError) and attempt == 1

    @staticmethod
    def _unavailable(exc: Exception) -> StoreUnavailable:
        if isinstance(exc, StoreUnavailable):
            return exc
        if isinstance(exc, IntegrityError):
            return StoreUnavailable("conflicting concurrent insert")
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
    ) -> Accepted:
        """Decide and persist in ``session``; a crash in the routing code holds the message."""
        try:
            with session.begin_nested():
                return self._apply(session, msg, receiving, source, in_mailbox_of)
        except SQLAlchemyError:
            raise  # the store's problem, not the message's: the caller retries or 451s
        except Exception as exc:  # noqa: BLE001 - event() logs it with exc_info
            event(
                log, "routing-crashed", logging.ERROR, exc_info=exc, msgid=format_id(msg.message_id)
            )
            with session.begin_nested():
                return self._hold_after_crash(session, msg, receiving, source, exc)

    def _apply(
        self,
        session: Session,
        msg: ParsedMessage,
        receiving: list[str],
        source: str,
        in_mailbox_of: str | None = None,
    ) -> Accepted:
        view = StoreView(session, self.accounts)
        d = decide(msg, receiving, view)
        ids = [self.accounts.id(n) for n in receiving]
        if d.action == "duplicate":
            return Accepted(d, d.existing_pk, d.interaction_id)
        if d.action == "attach":
            assert d.existing_pk is not None
            have = view.existing(msg.message_id, msg.content_hash)
            known = {self.accounts.id(n) for n in (have[1] if have else set())}
            extra = [{"message_pk": d.existing_pk, "account_id": a} for a in ids if a not in known]
            if extra:
                session.connection().execute(_INSERT_RECIPIENT, extra)
            return Accepted(d, d.existing_pk, d.interaction_id)
        if d.action == "hold":
            return self._store_held(session, msg, ids, source, d)

        assert d.owner is not None and d.deliver_to is not None
        owner_id = self.accounts.id(d.owner)
        now = utcnow()
        if d.interaction_id is None:
            iid = _new_id(
                session.connection(),
                _INSERT_INTERACTION,
                dict(
                    created_at=now,
                    account_id=owner_id,
                    origin_account_id=owner_id,
                    status="open",
                    unread=True,
                    distribution="queue",
                    customer_address=msg.reply_to_email or msg.from_email or None,
                    customer_name=msg.from_name or None,
                    subject=msg.subject or None,
                    last_activity_at=now,
                ),
            )
        else:
            iid = d.interaction_id
        pk = add_message(
            session,
            msg,
            direction=Direction.INBOUND,
            account_id=ids[0],
            interaction_id=iid,
            source=source,
            recipients=ids,
            # Routed only when the owner was not among the recipients: a Cc to the old and
            # the new address reached the owner directly.
            routed_to=owner_id if d.action == "route" else None,
            decision=d,
        )
        # New customer mail makes the conversation unread again (and reopens a closed one),
        # but never changes its owner: only a transfer does (no automatic return).
        session.connection().execute(
            update(INTERACTIONS)
            .where(INTERACTIONS.c.id == iid)
            .values(unread=True, status="open", last_activity_at=now, last_customer_message_pk=pk)
        )
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
    ) -> Accepted:
        d = Decision(
            "hold",
            "internal-error",
            receiving[0],
            reason=f"internal error: {type(exc).__name__}: {exc}",
        )
        seen = StoreView(session, self.accounts).existing(msg.message_id, msg.content_hash)
        if seen is not None:
            return Accepted(d, seen[0], None)
        return self._store_held(session, msg, [self.accounts.id(n) for n in receiving], source, d)

    @staticmethod
    def _store_held(
        session: Session, msg: ParsedMessage, ids: list[int], source: str, d: Decision
    ) -> Accepted:
        """Keep a message for inspection: no interaction, no delivery, the reason recorded."""
        pk = add_message(
            session,
            msg,
            direction=Direction.INBOUND,
            account_id=ids[0],
            interaction_id=None,
            source=source,
            recipients=ids,
            decision=d,
        )
        return Accepted(d, pk, None)

    def release(self, message_pk: int) -> Accepted:
        """Route a held message again (after its cause was fixed), in one transaction.

        The held row gives way to whatever the pipeline decides now; if that fails, the
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
                msg = parse(row.raw)
                for table, column in (
                    (MESSAGE_REFS, "message_pk"),
                    (MESSAGE_RECIPIENTS, "message_pk"),
                    (MESSAGES, "id"),
                ):
                    session.execute(delete(table).where(table.c[column] == message_pk))
                session.expunge(row)
                return msg, self._accept_in(session, msg, receiving, row.source or "release", None)

        msg, result = self._with_retry(once)
        self._log(msg, result)  # after the commit, like accept()
        return result

    def _log(self, msg: ParsedMessage, r: Accepted) -> None:
        d = r.decision
        rcpt = self.settings.account(d.receiving).address
        owner = self.settings.account(d.owner).address if d.owner else None
        event(
            routing_log,
            "decision",
            logging.WARNING if d.action == "hold" else logging.INFO,
            interaction=r.interaction_id,
            msgid=format_id(msg.message_id),
            rcpt=rcpt,
            owner=owner,
            rule=d.rule,
            action=d.action,
            matched=format_id(d.matched_id) if d.matched_id else None,
            reason=d.reason,
            auto=msg.automatic,
            message=r.message_pk,
        )
