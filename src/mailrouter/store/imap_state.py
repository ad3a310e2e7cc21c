"""The IMAP watcher's rows: each watched mailbox's UIDVALIDITY and UID high-water mark, and
where an ingested message was routed to (plain reads and writes, no business rules here)."""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mailrouter.store.models import ImapState, Message, utcnow

__all__ = ["UidMark", "advance_mark", "mark_synced", "read_mark", "reset_mark", "routed_to"]


class UidMark(NamedTuple):
    uidvalidity: int
    last_uid: int


def read_mark(session: Session, account_id: int, mailbox: str) -> UidMark | None:
    """The mark stored for this mailbox, or None if it was never watched."""
    row = session.get(ImapState, (account_id, mailbox))
    return None if row is None else UidMark(int(row.uidvalidity), int(row.last_uid))


def reset_mark(session: Session, account_id: int, mailbox: str, uidvalidity: int) -> None:
    """Store ``uidvalidity`` with no UID seen yet, replacing whatever mark was there."""
    row = session.get(ImapState, (account_id, mailbox))
    if row is None:
        session.add(
            ImapState(
                account_id=account_id,
                mailbox=mailbox,
                uidvalidity=uidvalidity,
                last_uid=0,
                updated_at=utcnow(),
            )
        )
    else:
        row.uidvalidity, row.last_uid, row.updated_at = uidvalidity, 0, utcnow()


def advance_mark(
    session: Session, account_id: int, mailbox: str, uidvalidity: int, uid: int
) -> None:
    """Raise the mark to ``uid``: never lowers it, and leaves a mark of another UIDVALIDITY."""
    session.execute(
        update(ImapState)
        .where(
            ImapState.account_id == account_id,
            ImapState.mailbox == mailbox,
            ImapState.uidvalidity == uidvalidity,
            ImapState.last_uid < uid,
        )
        .values(last_uid=uid, updated_at=utcnow())
    )


def mark_synced(session: Session, account_id: int, mailbox: str) -> None:
    """Record that the watcher has just caught up with this mailbox."""
    session.execute(
        update(ImapState)
        .where(ImapState.account_id == account_id, ImapState.mailbox == mailbox)
        .values(last_sync_at=utcnow())
    )


def routed_to(session: Session, message_pk: int) -> int | None:
    """The account a stored message was routed to, if it was routed at all."""
    return session.scalar(select(Message.routed_to_account_id).where(Message.id == message_pk))
