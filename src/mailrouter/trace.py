"""``mailrouter trace MESSAGE-ID``: the whole life of one message, read from the store.

Postfix needs its log collated for this; here it is all in one place.  When and how the
message arrived, what the routing decided and why, its interaction, every delivery
attempt with the server's reply, the notices and replies that answered it, and every
later transfer of its interaction — as sections, and as one timeline in time order.
A read: it changes nothing, and the same function serves the CLI and the HTTP API.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailrouter.deliver.queue import attempts_of
from mailrouter.errors import Refused
from mailrouter.parse import format_id, parse_ids
from mailrouter.routing import describe_action, describe_rule
from mailrouter.store.models import (
    Account,
    Direction,
    Interaction,
    Message,
    MessageRecipient,
    Outbox,
    Transfer,
)

__all__ = ["bare_id", "trace"]


def bare_id(text: str) -> str:
    """The Message-ID as stored: without ``<>``, read as leniently as at ingest."""
    ids = parse_ids(text)
    return ids[0] if ids else text.strip().strip("<>").strip()


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def trace(s: Session, message_id: str) -> dict[str, Any]:
    """Everything the store knows about the message(s) with this Message-ID.

    Usually one; a Message-ID reused with other content is stored once per content, and
    each copy is traced.  Refused (``not-found``) when nothing has this id.
    """
    bare = bare_id(message_id)
    found = list(
        s.scalars(
            select(Message)
            .where(Message.message_id == bare)
            .order_by(Message.received_at, Message.id)
        ).unique()
    )
    if not found:
        raise Refused("not-found", f"no stored message has Message-ID {format_id(bare)}")
    return {"message_id": format_id(bare), "messages": [_one(s, m) for m in found]}


def _one(s: Session, m: Message) -> dict[str, Any]:
    recipients = list(
        s.scalars(
            select(Account.name)
            .join(MessageRecipient, MessageRecipient.account_id == Account.id)
            .where(MessageRecipient.message_pk == m.id)
            .order_by(Account.name)
        )
    )
    arrival = {
        "id": m.id,
        "queue_id": f"m{m.id}" if m.status == "held" else None,
        "direction": m.direction,
        "received_at": _iso(m.received_at),
        "source": m.source,
        "envelope_from": m.envelope_from,
        "account": m.account.name,
        "account_address": m.account.address,
        "recipients": recipients,
        "from": m.from_addr,
        "to": m.to_addrs,
        "subject": m.subject,
        "date": _iso(m.date),
        "size": m.size,
        "automatic": m.automatic,
        "in_reply_to": m.in_reply_to,
        "status": m.status,
    }
    decision = {
        "rule": m.rule,
        "why": describe_rule(m.rule) if m.rule else None,
        "step": m.step,
        "action": m.action,
        "action_means": describe_action(m.action) if m.action else None,
        "matched": format_id(m.matched_id) if m.matched_id else None,
        "routed_to": m.routed_to.name if m.routed_to is not None else None,
        "hold_reason": m.hold_reason,
    }
    interaction = None
    transfers: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = []
    if m.interaction_id is not None:
        i = s.get(Interaction, m.interaction_id)
        assert i is not None
        interaction = {
            "id": i.id,
            "account": i.account.name,
            "origin_account": i.origin_account.name,
            "created_at": _iso(i.created_at),
            "status": i.status,
            "unread": i.unread,
            "assigned_agent": i.assigned_agent,
        }
        transfers = _transfers_after(s, i.id, m.received_at)
        if m.direction == Direction.INBOUND.value:
            answers = _answers(s, i.id, m.message_id)
    jobs = _jobs(s, m.id)
    return {
        "message": arrival,
        "decision": decision,
        "interaction": interaction,
        "deliveries": jobs,
        "answers": answers,
        "transfers": transfers,
        "timeline": _timeline(arrival, decision, interaction, jobs, answers, transfers),
    }


def _jobs(s: Session, message_pk: int) -> list[dict[str, Any]]:
    rows = s.scalars(select(Outbox).where(Outbox.message_pk == message_pk).order_by(Outbox.id))
    return [
        {
            "queue_id": f"o{o.id}",
            "kind": o.kind,
            "account": o.account.name,
            "to": o.envelope_to,
            "status": o.status,
            "created_at": _iso(o.created_at),
            "sent_at": _iso(o.sent_at),
            "next_attempt_at": _iso(o.next_attempt_at) if o.status == "pending" else None,
            "last_error": o.last_error,
            "attempts": attempts_of(s, o.id),
        }
        for o in rows.unique().all()
    ]


def _answers(s: Session, interaction_id: int, message_id: str) -> list[dict[str, Any]]:
    """Our own mail that answered this message: transfer notices and agent replies."""
    rows = s.scalars(
        select(Message)
        .where(
            Message.interaction_id == interaction_id,
            Message.direction == Direction.OUTBOUND.value,
            Message.in_reply_to == format_id(message_id),
        )
        .order_by(Message.received_at, Message.id)
    ).unique()
    out = []
    for a in rows:
        transfer_id = s.scalar(
            select(Transfer.id).where(Transfer.notification_message_id == a.message_id)
        )
        out.append(
            {
                "message_id": format_id(a.message_id),
                "kind": "notice" if a.source == "transfer-notice" else "reply",
                "transfer": transfer_id,
                "account": a.account.name,
                "to": a.to_addrs,
                "subject": a.subject,
                "created_at": _iso(a.received_at),
                "deliveries": _jobs(s, a.id),
            }
        )
    return out


def _transfers_after(s: Session, interaction_id: int, since: datetime) -> list[dict[str, Any]]:
    from mailrouter.views import transfer_dict

    rows = s.execute(
        select(Transfer, Outbox)
        .outerjoin(Outbox, Outbox.id == Transfer.notification_outbox_id)
        .where(Transfer.interaction_id == interaction_id, Transfer.at >= since)
        .order_by(Transfer.at, Transfer.id)
    ).unique()
    return [transfer_dict(t, o) for t, o in rows]


def _timeline(
    arrival: dict[str, Any],
    decision: dict[str, Any],
    interaction: dict[str, Any] | None,
    jobs: list[dict[str, Any]],
    answers: list[dict[str, Any]],
    transfers: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """One entry per thing that happened, oldest first: ``{at, event, text}``."""
    out: list[dict[str, Any]] = []
    at = arrival["received_at"]
    if arrival["direction"] == Direction.OUTBOUND.value:
        text = f"composed by mailrouter ({arrival['source']}) from {arrival['account_address']}"
        text += f" to {arrival['to']}"
    else:
        text = f"received via {arrival['source']} for {', '.join(arrival['recipients'])}"
        text += f" from {arrival['from'] or '?'}"
        if arrival["envelope_from"] is not None:
            text += f" envelope-from=<{arrival['envelope_from']}>"
        text += f", {arrival['size']} bytes"
        if arrival["automatic"]:
            text += f", automatic ({arrival['automatic']})"
    out.append({"at": at, "event": "received", "text": text})
    if decision["action"] is not None:
        text = f"{decision['action']} by rule {decision['rule']}"
        if decision["step"] and decision["step"] != decision["rule"]:
            text += f" (step {decision['step']})"
        if decision["matched"]:
            text += f", matched {decision['matched']}"
        if interaction is not None:
            text += f"; interaction {interaction['id']}"
        if decision["routed_to"]:
            text += f", routed to {decision['routed_to']}"
        if decision["hold_reason"]:
            text += f"; held ({arrival['queue_id']}): {decision['hold_reason']}"
        out.append({"at": at, "event": "decision", "text": text})
    out += _job_events(jobs, "")
    for a in answers:
        what = f"{a['kind']} {a['message_id']} to {a['to']}"
        if a["transfer"]:
            what += f" (transfer {a['transfer']})"
        out.append({"at": a["created_at"], "event": a["kind"], "text": what + " queued"})
        out += _job_events(a["deliveries"], f"{a['kind']} ")
    for t in transfers:
        text = f"interaction moved {t['from']} -> {t['to']}"
        text += f" by {t['by']}" if t["by"] else ""
        text += f"; notice {t['notification']}"
        if t["notification_reason"]:
            text += f" ({t['notification_reason']})"
        out.append({"at": t["at"], "event": "transfer", "text": text})
    # Stable: entries of one instant keep their order; undated ones ("now") come last.
    out.sort(key=lambda e: (e["at"] is None, e["at"] or ""))
    return out


def _job_events(jobs: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for j in jobs:
        out.append(
            {
                "at": j["created_at"],
                "event": "queued",
                "text": f"{prefix}{j['queue_id']} {j['kind']} to {j['to'] or j['account']}",
            }
        )
        for a in j["attempts"]:
            out.append(
                {
                    "at": a["finished_at"],
                    "event": a["status"],
                    "text": (
                        f"{prefix}{j['queue_id']} attempt {a['attempt']} relay={a['relay']} "
                        f"dsn={a['dsn']}: {a['reply']}"
                    ),
                }
            )
        if j["status"] in ("held", "deleted", "pending", "sending"):
            # No time is stored for an operator's hold or delete: the entry says "now".
            state = {
                "held": "held by operator",
                "deleted": "deleted by operator",
                "pending": f"waiting, next try {j['next_attempt_at']}",
                "sending": "being delivered",
            }[j["status"]]
            out.append(
                {"at": None, "event": j["status"], "text": f"{prefix}{j['queue_id']} {state}"}
            )
    return out
