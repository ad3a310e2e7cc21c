"""Read-side queries and their stable JSON shapes: ``interactions``, ``show``, ``queue``, ``held``
(the unified queue view and its operations are in :mod:`mailrouter.deliver.queue`).

Field names here are a public interface (scripts parse ``--json``): add fields, never
rename or remove them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailrouter.parse import format_id
from mailrouter.runtime import Runtime
from mailrouter.store.models import Interaction, Message, Outbox, Transfer

__all__ = [
    "held_messages",
    "interaction_detail",
    "interaction_dict",
    "list_interactions",
    "open_interaction_counts",
    "outbox_dict",
    "queue_rows",
]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def interaction_dict(i: Interaction) -> dict[str, Any]:
    return {
        "id": i.id,
        "account": i.account.name,
        "account_address": i.account.address,
        "origin_account": i.origin_account.name,
        "created_at": _iso(i.created_at),
        "last_activity_at": _iso(i.last_activity_at),
        "unread": i.unread,
        "status": i.status,
        "distribution": i.distribution,
        "assigned_agent": i.assigned_agent,
        "subject": i.subject,
        "customer": i.customer_address,
        "customer_name": i.customer_name,
    }


def message_dict(m: Message) -> dict[str, Any]:
    return {
        "message_id": format_id(m.message_id),
        "synthetic_id": m.synthetic_id,
        "direction": m.direction,
        "account": m.account.name,
        "account_address": m.account.address,
        "routed_to": m.routed_to.name if m.routed_to is not None else None,
        "from": m.from_addr,
        "to": m.to_addrs,
        "subject": m.subject,
        "date": _iso(m.date),
        "received_at": _iso(m.received_at),
        "in_reply_to": m.in_reply_to,
        "size": m.size,
        "status": m.status,
        "hold_reason": m.hold_reason,
        "rule": m.rule,
        "action": m.action,
        "automatic": m.automatic,
        "source": m.source,
    }


def transfer_dict(t: Transfer, outbox: Outbox | None) -> dict[str, Any]:
    notification = t.notification
    if (
        notification == "queued"
        and outbox is not None
        and outbox.status
        in (
            "sent",
            "failed",
            "bounced",
        )
    ):
        notification = outbox.status
    return {
        "id": t.id,
        "from": t.from_account.name,
        "to": t.to_account.name,
        "by": t.actor,
        "at": _iso(t.at),
        "notification": notification,
        "notification_reason": t.notification_reason or (outbox.last_error if outbox else None),
        "notification_message_id": (
            format_id(t.notification_message_id) if t.notification_message_id else None
        ),
    }


def outbox_dict(o: Outbox) -> dict[str, Any]:
    return {
        "id": o.id,
        "kind": o.kind,
        "account": o.account.name,
        "interaction": o.interaction_id,
        "status": o.status,
        "attempts": o.attempts,
        "to": o.envelope_to,
        "created_at": _iso(o.created_at),
        "next_attempt_at": _iso(o.next_attempt_at) if o.status == "pending" else None,
        "deadline": _iso(o.deadline),
        "sent_at": _iso(o.sent_at),
        "last_error": o.last_error,
    }


def list_interactions(
    s: Session,
    rt: Runtime,
    *,
    account: str | None = None,
    unread: bool = False,
    status: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    q = select(Interaction).order_by(Interaction.last_activity_at.desc(), Interaction.id.desc())
    if account is not None:
        q = q.where(Interaction.account_id == rt.accounts.id(rt.settings.account(account).name))
    if unread:
        q = q.where(Interaction.unread.is_(True))
    if status is not None:
        q = q.where(Interaction.status == status)
    if limit is not None:
        q = q.limit(limit)
    return [interaction_dict(i) for i in s.scalars(q).unique()]


def interaction_detail(s: Session, interaction_id: int) -> dict[str, Any] | None:
    i = s.get(Interaction, interaction_id)
    if i is None:
        return None
    out = interaction_dict(i)
    msgs = s.scalars(
        select(Message)
        .where(Message.interaction_id == i.id)
        .order_by(Message.received_at, Message.id)
    ).unique()
    out["messages"] = [message_dict(m) for m in msgs]
    transfers = s.execute(
        select(Transfer, Outbox)
        .outerjoin(Outbox, Outbox.id == Transfer.notification_outbox_id)
        .where(Transfer.interaction_id == i.id)
        .order_by(Transfer.at, Transfer.id)
    ).unique()
    out["transfers"] = [transfer_dict(t, o) for t, o in transfers]
    return out


def queue_rows(s: Session, *, all_rows: bool = False, limit: int = 200) -> list[dict[str, Any]]:
    q = select(Outbox).order_by(Outbox.id.desc()).limit(limit)
    if not all_rows:
        q = q.where(Outbox.status.in_(("pending", "sending", "failed")))
    return [outbox_dict(o) for o in s.scalars(q).unique()]


def open_interaction_counts(s: Session) -> dict[tuple[int, str], int]:
    """Open interactions per (account id, ``open``) and unread ones per (id, ``unread``).

    Closed interactions are history (``report`` counts those): leaving them out keeps
    this one index range over ``ix_interactions_status``, however old the store.
    """
    out: dict[tuple[int, str], int] = {}
    rows = s.execute(
        select(Interaction.account_id, Interaction.unread, func.count())
        .where(Interaction.status == "open")
        .group_by(Interaction.account_id, Interaction.unread)
    )
    for account_id, unread, count in rows:
        out[(account_id, "open")] = out.get((account_id, "open"), 0) + int(count)
        if unread:
            out[(account_id, "unread")] = int(count)
    return out


def held_messages(s: Session, limit: int = 200) -> list[dict[str, Any]]:
    q = select(Message).where(Message.status == "held").order_by(Message.id.desc()).limit(limit)
    return [{"id": m.id, **message_dict(m)} for m in s.scalars(q).unique()]
