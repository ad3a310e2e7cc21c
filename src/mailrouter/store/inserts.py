"""Row writes on the hot path: messages with their id references and recipients, new
interactions and the update a new message makes to its interaction, outbox rows.  Core
statements built once, no business rules.

Core, not ORM objects, run as :class:`~mailrouter.store.prepared.Prepared` statements:
these run once or more per message on the ingest path, where SQLAlchemy's own work cost
more than the SQL itself.  A big message's bytes are written into SQLite in slices
(``store/blobs.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, bindparam, case, func, insert, update
from sqlalchemy.orm import Session

from mailrouter.parse import ParsedMessage, format_id
from mailrouter.store.blobs import blob_connection, write_raw
from mailrouter.store.models import (
    INTERACTIONS,
    MESSAGE_RECIPIENTS,
    MESSAGE_REFS,
    MESSAGES,
    OUTBOX,
    Direction,
    utcnow,
)
from mailrouter.store.prepared import Prepared

__all__ = [
    "add_message",
    "add_recipients",
    "insert_interaction",
    "insert_outbox",
    "touch_interaction",
]

_INSERT_MESSAGE = Prepared(insert(MESSAGES), returning=MESSAGES)
# The same row with ``raw`` as zeros of the message's length, filled in afterwards.
_INSERT_MESSAGE_ZEROBLOB = Prepared(
    insert(MESSAGES).values(raw=func.zeroblob(bindparam("raw_size", type_=Integer))),
    returning=MESSAGES,
)
_INSERT_REF = Prepared(insert(MESSAGE_REFS))
_INSERT_RECIPIENT = Prepared(insert(MESSAGE_RECIPIENTS))
_INSERT_OUTBOX = Prepared(insert(OUTBOX), returning=OUTBOX)
_INSERT_INTERACTION = Prepared(insert(INTERACTIONS), returning=INTERACTIONS)
_I = INTERACTIONS.c
_TOUCH_INTERACTION = Prepared(
    update(INTERACTIONS)
    .where(_I.id == bindparam("iid"))
    .values(
        unread=True,
        status="open",
        last_activity_at=bindparam("now", type_=_I.last_activity_at.type),
        last_customer_message_pk=case(
            (_I.customer_address.in_([bindparam("s1"), bindparam("s2")]), bindparam("pk")),
            else_=_I.last_customer_message_pk,
        ),
    )
)


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
    rule: str | None = None,
    action: str | None = None,
    hold_reason: str | None = None,
    step: str | None = None,
    matched_id: str | None = None,
    pk: int | None = None,
) -> int:
    """Insert a message with its id references and recipient accounts; returns its key.

    A ``hold_reason`` stores it as held (kept for inspection, no interaction); ``pk`` gives
    it that key instead of a new one (a released message taking its old row's place).
    """
    conn = session.connection()
    given = {} if pk is None else {"id": pk}
    blob = blob_connection(conn, len(msg.raw))
    content: dict[str, Any] = {"raw": msg.raw} if blob is None else {"raw_size": len(msg.raw)}
    pk = (_INSERT_MESSAGE if blob is None else _INSERT_MESSAGE_ZEROBLOB).insert(
        conn,
        given
        | content
        | dict(
            interaction_id=interaction_id,
            direction=direction.value,
            account_id=account_id,
            routed_to_account_id=routed_to,
            message_id=msg.message_id,
            synthetic_id=msg.synthetic_id,
            in_reply_to=" ".join(format_id(i) for i in msg.in_reply_to) or None,
            # The References text as trimmed by parse(); the header itself stays in raw.
            references=" ".join(format_id(i) for i in msg.references) or None,
            from_addr=msg.from_display or None,
            reply_to=msg.reply_to_email or None,
            to_addrs=", ".join(msg.recipients) or None,
            subject=msg.subject or None,
            date=msg.date,
            size=len(msg.raw),
            content_hash=msg.content_hash,
            automatic=msg.automatic,
            status="held" if hold_reason is not None else "stored",
            hold_reason=hold_reason,
            rule=rule,
            action=action,
            source=source,
            envelope_from=msg.envelope_sender,
            step=step,
            matched_id=matched_id,
            received_at=utcnow(),
        ),
    )
    if blob is not None:
        write_raw(blob, pk, msg.raw)
    # Bounded: parse() keeps at most MAX_REFERENCES + 1 parents however many ids the
    # headers name, so a hostile References cannot make one insert hold the write lock long.
    refs = [{"message_pk": pk, "position": n, "ref_id": r} for n, r in enumerate(msg.parents)]
    if refs:
        _INSERT_REF.executemany(conn, refs)
    rows = [{"message_pk": pk, "account_id": a} for a in dict.fromkeys(recipients)]
    _INSERT_RECIPIENT.executemany(conn, rows)
    return pk


def add_recipients(session: Session, message_pk: int, account_ids: Iterable[int]) -> None:
    """Record more accounts a stored message was addressed to."""
    rows = [{"message_pk": message_pk, "account_id": a} for a in account_ids]
    _INSERT_RECIPIENT.executemany(session.connection(), rows)


def insert_interaction(
    session: Session,
    *,
    account_id: int,
    customer_address: str | None,
    customer_name: str | None,
    subject: str | None,
    now: datetime,
) -> int:
    """A new open, unread interaction owned (and originated) by ``account_id``."""
    return _INSERT_INTERACTION.insert(
        session.connection(),
        dict(
            created_at=now,
            account_id=account_id,
            origin_account_id=account_id,
            status="open",
            unread=True,
            distribution="queue",
            customer_address=customer_address,
            customer_name=customer_name,
            subject=subject,
            last_activity_at=now,
        ),
    )


def insert_outbox(session: Session, **values: Any) -> int:
    """One outbox row with the given column values; returns its key."""
    return _INSERT_OUTBOX.insert(session.connection(), values)


def touch_interaction(
    session: Session,
    interaction_id: int,
    *,
    message_pk: int,
    senders: tuple[str | None, str | None],
    now: datetime,
) -> None:
    """A new message in the interaction: unread and open again, its activity now, and the
    message the customer's latest when one of ``senders`` is the customer's address."""
    first, second = senders
    s1 = first or second or ""  # no address at all matches only an empty customer one
    _TOUCH_INTERACTION.execute(
        session.connection(),
        {"iid": interaction_id, "now": now, "pk": message_pk, "s1": s1, "s2": second or s1},
    ).close()
