"""The one path every inbound message takes: parse → resolve → decide → persist.

SMTP, LMTP, the IMAP watcher, ``mailrouter ingest`` and ``replay`` all call
:meth:`Pipeline.accept`; it commits the message, its interaction and the delivery work
(an outbox row) in one transaction and only then returns, so a caller that acknowledges
after it returns never acknowledges mail that is not safely stored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from mailrouter.config import AccountSettings, Settings
from mailrouter.log import event
from mailrouter.parse import ParsedMessage, format_id, parse
from mailrouter.routing.decide import Decision, decide
from mailrouter.store.db import Database, open_database
from mailrouter.store.migrate import ensure_schema
from mailrouter.store.models import (
    Direction,
    Interaction,
    Message,
    MessageRecipient,
    MessageRef,
    Outbox,
    OutboxKind,
    utcnow,
)
from mailrouter.store.queries import AccountMap, StoreView, sync_accounts

__all__ = ["Accepted", "Pipeline", "StoreUnavailable", "add_message", "enqueue"]

routing_log = logging.getLogger("mailrouter.routing")
log = logging.getLogger("mailrouter.pipeline")


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
) -> Message:
    """Insert a message with its id references and recipient accounts."""
    row = Message(
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
        status="held" if decision is not None and decision.action == "hold" else "stored",
        hold_reason=decision.reason if decision is not None and decision.action == "hold" else None,
        rule=decision.rule if decision else None,
        action=decision.action if decision else None,
        source=source,
    )
    session.add(row)
    session.flush()
    session.add_all(
        MessageRef(message_pk=row.id, position=pos, ref_id=ref)
        for pos, ref in enumerate(msg.parents)
    )
    session.add_all(
        MessageRecipient(message_pk=row.id, account_id=a) for a in dict.fromkeys(recipients)
    )
    return row


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
) -> Outbox:
    """Write work for the outbox worker in the caller's transaction (the outbox pattern)."""
    now = utcnow()
    row = Outbox(
        kind=kind.value,
        account_id=account_id,
        interaction_id=interaction_id,
        message_pk=message_pk,
        payload=payload,
        envelope_from=envelope_from,
        envelope_to=",".join(envelope_to),
        created_at=now,
        next_attempt_at=now,
        deadline=now + timedelta(seconds=settings.outbox.lifetime),
    )
    session.add(row)
    session.flush()
    return row


class Pipeline:
    """Settings, the database and the account map: what every stage needs, built once."""

    def __init__(self, settings: Settings, db: Database, accounts: AccountMap) -> None:
        self.settings = settings
        self.db = db
        self.accounts = accounts

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
        self.db.dispose()

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
        if not accounts:
            raise ValueError("accept() needs at least one receiving account")
        msg = parse(raw, envelope_sender)
        receiving = self.order_recipients(msg, accounts)
        for attempt in (1, 2):
            try:
                with self.db.write() as session:
                    result = self._apply(session, msg, receiving, source, in_mailbox_of)
                break
            except IntegrityError:
                # Another instance stored the same message between our look-up and insert;
                # the second attempt sees it and takes the duplicate path.
                if attempt == 2:
                    raise StoreUnavailable("conflicting concurrent insert") from None
            except OperationalError as exc:
                raise StoreUnavailable(f"store unavailable: {exc.orig}") from exc
            except SQLAlchemyError as exc:
                raise StoreUnavailable(f"store error: {exc}") from exc
            except Exception as exc:
                log.exception("routing failed; holding message msgid=%s", format_id(msg.message_id))
                result = self._hold_after_crash(msg, receiving, source, exc)
                break
        self._log(msg, result)
        return result

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
            session.add_all(
                MessageRecipient(message_pk=d.existing_pk, account_id=a)
                for a in ids
                if a not in known
            )
            return Accepted(d, d.existing_pk, d.interaction_id)
        if d.action == "hold":
            row = add_message(
                session,
                msg,
                direction=Direction.INBOUND,
                account_id=ids[0],
                interaction_id=None,
                source=source,
                recipients=ids,
                decision=d,
            )
            return Accepted(d, row.id, None)

        assert d.owner is not None and d.deliver_to is not None
        owner_id = self.accounts.id(d.owner)
        now = utcnow()
        if d.interaction_id is None:
            interaction = Interaction(
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
            )
            session.add(interaction)
            session.flush()
            iid = interaction.id
        else:
            iid = d.interaction_id
        row = add_message(
            session,
            msg,
            direction=Direction.INBOUND,
            account_id=ids[0],
            interaction_id=iid,
            source=source,
            recipients=ids,
            routed_to=owner_id if owner_id != ids[0] else None,
            decision=d,
        )
        # New customer mail makes the conversation unread again (and reopens a closed one),
        # but never changes its owner: only a transfer does (no automatic return).
        session.execute(
            update(Interaction)
            .where(Interaction.id == iid)
            .values(
                unread=True, status="open", last_activity_at=now, last_customer_message_pk=row.id
            )
        )
        if d.deliver_to == in_mailbox_of:
            return Accepted(d, row.id, iid)
        out = enqueue(
            session,
            self.settings,
            kind=OutboxKind.DELIVER,
            account_id=self.accounts.id(d.deliver_to),
            interaction_id=iid,
            message_pk=row.id,
            envelope_to=[self.settings.account(d.deliver_to).address],
        )
        return Accepted(d, row.id, iid, out.id)

    def _hold_after_crash(
        self, msg: ParsedMessage, receiving: list[str], source: str, exc: Exception
    ) -> Accepted:
        d = Decision(
            "hold",
            "internal-error",
            receiving[0],
            reason=f"internal error: {type(exc).__name__}: {exc}",
        )
        ids = [self.accounts.id(n) for n in receiving]
        try:
            with self.db.write() as session:
                seen = StoreView(session, self.accounts).existing(msg.message_id, msg.content_hash)
                if seen is not None:
                    return Accepted(d, seen[0], None)
                row = add_message(
                    session,
                    msg,
                    direction=Direction.INBOUND,
                    account_id=ids[0],
                    interaction_id=None,
                    source=source,
                    recipients=ids,
                    decision=d,
                )
                return Accepted(d, row.id, None)
        except SQLAlchemyError as exc2:
            raise StoreUnavailable(f"could not hold message after error: {exc2}") from exc2

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

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.db.write() as s:
            yield s
