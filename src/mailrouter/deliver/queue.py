"""The queue, after Postfix's ``postqueue -p`` and ``postsuper``: messages held for
inspection and outbox jobs in one view, and what an operator does to them.

An item's id says its kind: ``m12`` is message 12, held for inspection (it has no
delivery job: the routing never got that far); ``o34`` is outbox job 34 (a delivery into
a mailbox, a notice or an agent reply).  A bare number is an outbox job, as ``queue
retry N`` has always meant.

Every operation here is one transaction that locks the row it changes, and either does
what it says or raises :class:`~mailrouter.errors.Refused` with nothing changed.  The CLI
calls these, and so will the admin API: neither holds a rule of its own.  ``delete``
never removes a stored message, only a delivery job — and even that row stays (status
``deleted``, never claimed again), so ``trace`` can still tell what became of it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.parser import BytesParser
from email.policy import compat32
from typing import Any, Literal

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from mailrouter.errors import Refused
from mailrouter.log import event
from mailrouter.parse import decode_text, format_id
from mailrouter.runtime import Runtime
from mailrouter.store.models import (
    Message,
    MessageRecipient,
    Outbox,
    OutboxAttempt,
    OutboxStatus,
    utcnow,
)

__all__ = [
    "ACTIVE",
    "QueueChange",
    "QueueId",
    "attempts_of",
    "delete",
    "depth",
    "hold",
    "list_queue",
    "parse_id",
    "release",
    "requeue",
    "retry",
    "retry_all",
    "show",
]

log = logging.getLogger("mailrouter.queue")

# Outbox states an operator still has to care about; `--all` adds sent and deleted.
ACTIVE = (
    OutboxStatus.PENDING.value,
    OutboxStatus.SENDING.value,
    OutboxStatus.FAILED.value,
    OutboxStatus.HELD.value,
)

_ID = re.compile(r"([mo]?)(\d{1,18})", re.IGNORECASE)


@dataclass(frozen=True)
class QueueId:
    """``m12`` (a held message) or ``o34`` (an outbox job)."""

    kind: Literal["m", "o"]
    number: int

    def __str__(self) -> str:
        return f"{self.kind}{self.number}"


def parse_id(text: str) -> QueueId:
    """``m12``, ``o34`` or ``34`` (an outbox job); anything else is refused."""
    found = _ID.fullmatch(text.strip())
    if found is None:
        raise Refused(
            "bad-queue-id",
            f"{text!r} is not a queue id (m12: held message 12; o34 or 34: outbox job 34)",
        )
    kind: Literal["m", "o"] = "m" if found.group(1).lower() == "m" else "o"
    return QueueId(kind, int(found.group(2)))


@dataclass(frozen=True)
class QueueChange:
    """What an operation did to one item (the API's answer, the CLI's line)."""

    queue_id: str
    status: str  # the item's status afterwards
    # A released message: what the routing decided now, and its new delivery job.
    action: str | None = None
    rule: str | None = None
    interaction: int | None = None
    reason: str | None = None
    job: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- reading


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _outbox_reason(o: Outbox) -> str | None:
    """Why a job is still in the queue, in the log's words (None: new, or done)."""
    if o.status == OutboxStatus.HELD.value:
        return "held by operator"
    if o.status == OutboxStatus.DELETED.value:
        return "deleted by operator"
    if o.status == OutboxStatus.FAILED.value:
        return "expired" if (o.last_error or "").startswith("gave up after") else "bounced"
    if o.status == OutboxStatus.PENDING.value and o.attempts:
        return "deferred"
    return None


def _outbox_entry(o: Outbox, message_id: str | None) -> dict[str, Any]:
    from mailrouter.views import outbox_dict

    return {
        "queue_id": f"o{o.id}",
        **outbox_dict(o),
        "reason": _outbox_reason(o),
        "message_id": format_id(message_id) if message_id else None,
    }


def _message_entry(m: Message, recipients: Sequence[str]) -> dict[str, Any]:
    """A held message in the shape of an outbox row (``kind`` = ``message``)."""
    return {
        "queue_id": f"m{m.id}",
        "id": m.id,
        "kind": "message",
        "account": m.account.name,
        "interaction": m.interaction_id,
        "status": m.status,
        "attempts": 0,
        "to": ",".join(recipients),
        "created_at": _iso(m.received_at),
        "next_attempt_at": None,
        "deadline": None,
        "sent_at": None,
        "last_error": None,
        "reason": m.hold_reason,
        "message_id": format_id(m.message_id),
    }


def _recipients(s: Session, pks: Sequence[int]) -> dict[int, list[str]]:
    from mailrouter.store.models import Account

    out: dict[int, list[str]] = {pk: [] for pk in pks}
    if pks:
        rows = s.execute(
            select(MessageRecipient.message_pk, Account.address)
            .join(Account, Account.id == MessageRecipient.account_id)
            .where(MessageRecipient.message_pk.in_(pks))
            .order_by(MessageRecipient.message_pk, Account.address)
        )
        for pk, address in rows:
            out[pk].append(address)
    return out


def list_queue(s: Session, *, all_rows: bool = False, limit: int = 200) -> list[dict[str, Any]]:
    """Held messages and outbox jobs, most recently queued first (``postqueue -p``).

    Without ``all_rows``: jobs still pending, being sent, failed or held, and the held
    messages; with it, sent and deleted jobs too.
    """
    q = (
        select(Outbox, Message.message_id)
        .outerjoin(Message, Message.id == Outbox.message_pk)
        .order_by(Outbox.id.desc())
        .limit(limit)
    )
    if not all_rows:
        q = q.where(Outbox.status.in_(ACTIVE))
    jobs = [_outbox_entry(o, mid) for o, mid in s.execute(q).unique()]
    held = list(
        s.scalars(
            select(Message)
            .where(Message.status == "held")
            .order_by(Message.received_at.desc(), Message.id.desc())
            .limit(limit)
        ).unique()
    )
    rcpts = _recipients(s, [m.id for m in held])
    messages = [_message_entry(m, rcpts[m.id]) for m in held]
    rows = sorted([*jobs, *messages], key=lambda r: r["created_at"] or "", reverse=True)
    return rows[:limit]


def _headers(raw: bytes) -> dict[str, str]:
    head = BytesParser(policy=compat32).parsebytes(raw, headersonly=True)
    return {
        name: decode_text(head.get(name))
        for name in ("From", "To", "Subject", "Message-ID", "In-Reply-To")
        if head.get(name) is not None
    }


def attempts_of(s: Session, outbox_id: int) -> list[dict[str, Any]]:
    """Every recorded attempt of a job, first first, with the server's reply."""
    rows = s.scalars(
        select(OutboxAttempt)
        .where(OutboxAttempt.outbox_id == outbox_id)
        .order_by(OutboxAttempt.attempt, OutboxAttempt.id)
    )
    return [
        {
            "attempt": a.attempt,
            "started_at": _iso(a.started_at),
            "finished_at": _iso(a.finished_at),
            "status": a.status,
            "relay": a.relay,
            "dsn": a.dsn,
            "reply": a.reply,
        }
        for a in rows
    ]


def show(s: Session, qid: QueueId) -> dict[str, Any]:
    """One item with its envelope, headers and (for a job) every attempt so far."""
    if qid.kind == "m":
        m = s.get(Message, qid.number)
        if m is None or m.status != "held":
            raise _not_a_held_message(qid, m)
        out = _message_entry(m, _recipients(s, [m.id])[m.id])
        out.update(
            envelope_from=m.envelope_from,
            source=m.source,
            size=m.size,
            rule=m.rule,
            step=m.step,
            automatic=m.automatic,
            headers=_headers(m.raw),
        )
        return out
    o = s.get(Outbox, qid.number)
    if o is None:
        raise Refused("not-found", f"no queue item {qid}")
    msg = s.get(Message, o.message_pk) if o.message_pk is not None else None
    out = _outbox_entry(o, msg.message_id if msg is not None else None)
    out.update(
        envelope_from=o.envelope_from,
        message=msg.id if msg is not None else None,
        headers=_headers(o.payload or (msg.raw if msg is not None else b"")),
        attempt_log=attempts_of(s, o.id),
    )
    return out


def depth(s: Session) -> dict[str, tuple[int, datetime | None]]:
    """Items and the oldest one's queueing time, per queue (``mailrouter_queue_messages``).

    Queues: ``pending`` (never tried), ``deferred`` (tried, waiting for the next try),
    ``sending``, ``failed``, ``held`` (jobs an operator parked) and ``held-messages``.
    Grouped queries over indexes: the cost follows the queue, not the history.
    """
    out: dict[str, tuple[int, datetime | None]] = {}
    tried = Outbox.attempts > 0
    rows = s.execute(
        select(Outbox.status, tried, func.count(), func.min(Outbox.created_at))
        .where(Outbox.status.in_(ACTIVE))
        .group_by(Outbox.status, tried)
    )
    for status, was_tried, count, oldest in rows:
        name = "deferred" if status == OutboxStatus.PENDING.value and was_tried else status
        have, since = out.get(name, (0, None))
        out[name] = (have + int(count), _earliest(since, oldest))
    count, oldest = s.execute(
        select(func.count(), func.min(Message.received_at)).where(Message.status == "held")
    ).one()
    out["held-messages"] = (int(count), oldest)
    return out


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


# --------------------------------------------------------------------------- changing


def _not_a_held_message(qid: QueueId, m: Message | None) -> Refused:
    if m is None:
        return Refused("not-found", f"no queue item {qid}")
    return Refused(
        "not-held",
        f"message {m.id} is not held (it is {m.status}"
        + (f", in interaction {m.interaction_id})" if m.interaction_id else ")"),
    )


def _not_a_job(qid: QueueId, verb: str) -> Refused:
    return Refused(
        "not-a-job",
        f"{qid} is a held message, not a delivery job: `queue {verb}` works on outbox "
        f"jobs (o…); `mailrouter queue release {qid}` routes the message again",
    )


def _locked_job(s: Session, qid: QueueId) -> tuple[Outbox, str | None]:
    """The job's row, locked until the transaction ends (SQLite: BEGIN IMMEDIATE already)."""
    o = s.scalar(select(Outbox).where(Outbox.id == qid.number).with_for_update(of=Outbox))
    if o is None:
        raise Refused("not-found", f"no queue item {qid}")
    mid = None
    if o.message_pk is not None:
        mid = s.scalar(select(Message.message_id).where(Message.id == o.message_pk))
    return o, mid


def _refuse_state(qid: QueueId, o: Outbox) -> Refused:
    """Why an operation cannot touch a job in its current state."""
    match o.status:
        case OutboxStatus.SENDING.value:
            return Refused(
                "being-delivered", f"{qid} is being delivered right now; try again in a moment"
            )
        case OutboxStatus.SENT.value:
            return Refused("already-sent", f"{qid} was sent at {_iso(o.sent_at)}")
        case OutboxStatus.DELETED.value:
            return Refused("deleted", f"{qid} was deleted")
        case OutboxStatus.HELD.value:
            return Refused(
                "held", f"{qid} is held: `mailrouter queue release {qid}` lets it go first"
            )
        case OutboxStatus.FAILED.value:
            return Refused(
                "failed", f"{qid} has failed for good: retry it (`queue retry {qid}`) or delete it"
            )
        case _:
            return Refused("wrong-state", f"{qid} is {o.status}")


def _logged(op: str, change: QueueChange, o: Outbox | None, mid: str | None) -> QueueChange:
    event(
        log,
        f"queue-{op}",
        queue=change.queue_id,
        kind=o.kind if o is not None else "message",
        msgid=format_id(mid) if mid else None,
        account=o.account.address if o is not None else None,
        interaction=change.interaction if o is None else o.interaction_id,
        status=change.status,
        action=change.action,
        rule=change.rule,
    )
    return change


def retry(rt: Runtime, qid: QueueId) -> QueueChange:
    """Make a pending or failed job due now (a failed one gets a fresh lifetime)."""
    if qid.kind == "m":
        raise _not_a_job(qid, "retry")
    now = utcnow()
    with rt.db.write() as s:
        o, mid = _locked_job(s, qid)
        if o.status == OutboxStatus.FAILED.value:
            o.status = OutboxStatus.PENDING.value
            o.deadline = now + timedelta(seconds=rt.settings.outbox.lifetime)
            o.last_error = None
        elif o.status != OutboxStatus.PENDING.value:
            raise _refuse_state(qid, o)
        o.next_attempt_at = now
        change = QueueChange(str(qid), o.status)
        return _logged("retry", change, o, mid)


def retry_all(rt: Runtime) -> int:
    """Make every pending job due now, like ``postqueue -f``; returns how many were waiting.

    Failed jobs stay failed (retry them one by one once their cause is fixed), held ones
    stay held.
    """
    now = utcnow()
    with rt.db.write() as s:
        res = s.execute(
            update(Outbox)
            .where(Outbox.status == OutboxStatus.PENDING.value, Outbox.next_attempt_at > now)
            .values(next_attempt_at=now)
        )
        count = int(getattr(res, "rowcount", 0) or 0)
    event(log, "queue-flush", due=count)
    return count


def hold(rt: Runtime, qid: QueueId) -> QueueChange:
    """Park a pending job: the worker never claims it until :func:`release`."""
    if qid.kind == "m":
        with rt.db.read() as s:
            m = s.get(Message, qid.number)
            if m is None or m.status != "held":
                raise _not_a_held_message(qid, m)
        raise Refused("already-held", f"{qid} is held already (a message kept for inspection)")
    with rt.db.write() as s:
        o, mid = _locked_job(s, qid)
        if o.status == OutboxStatus.HELD.value:
            raise Refused("already-held", f"{qid} is held already")
        if o.status != OutboxStatus.PENDING.value:
            raise _refuse_state(qid, o)
        o.status = OutboxStatus.HELD.value
        o.claimed_until = None
        return _logged("hold", QueueChange(str(qid), o.status), o, mid)


def release(rt: Runtime, qid: QueueId) -> QueueChange:
    """Let a held job go (due now, with a fresh lifetime), or route a held message again.

    A message is routed by :meth:`Pipeline.release` — one transaction, and if the routing
    holds it again it stays held with the new reason (status ``held`` in the answer).
    """
    if qid.kind == "m":
        from mailrouter.pipeline import Pipeline

        with rt.db.read() as s:
            if s.get(Message, qid.number) is None:
                raise Refused("not-found", f"no queue item {qid}")
        r = Pipeline(rt).release(qid.number)
        d = r.decision
        change = QueueChange(
            str(qid),
            "held" if d.action == "hold" else "released",
            action=d.action,
            rule=d.rule,
            interaction=r.interaction_id,
            reason=d.reason,
            job=f"o{r.outbox_id}" if r.outbox_id is not None else None,
        )
        return _logged("release", change, None, None)
    now = utcnow()
    with rt.db.write() as s:
        o, mid = _locked_job(s, qid)
        if o.status != OutboxStatus.HELD.value:
            raise Refused("not-held", f"{qid} is not held (it is {o.status})")
        o.status = OutboxStatus.PENDING.value
        o.next_attempt_at = now
        # Time spent held does not count against the job: a retry schedule starts anew.
        o.deadline = now + timedelta(seconds=rt.settings.outbox.lifetime)
        return _logged("release", QueueChange(str(qid), o.status), o, mid)


def delete(rt: Runtime, qid: QueueId) -> QueueChange:
    """Drop a job that is pending, failed or held: it is never attempted again.

    The stored message is never touched (it stays in its interaction), and the job's row
    is kept with status ``deleted`` so ``trace`` still shows it.
    """
    if qid.kind == "m":
        raise Refused(
            "not-a-job",
            f"{qid} is a stored message, not a delivery job: `queue delete` removes delivery "
            "jobs only, never a stored message",
        )
    with rt.db.write() as s:
        o, mid = _locked_job(s, qid)
        if o.status not in (
            OutboxStatus.PENDING.value,
            OutboxStatus.FAILED.value,
            OutboxStatus.HELD.value,
        ):
            raise _refuse_state(qid, o)
        o.status = OutboxStatus.DELETED.value
        o.claimed_until = None
        return _logged("delete", QueueChange(str(qid), o.status), o, mid)


def requeue(rt: Runtime, outbox_id: int) -> None:
    """Make a failed outbox item pending again, due now, with a fresh deadline."""
    now = utcnow()
    with rt.db.write() as s:
        res = s.execute(
            update(Outbox)
            .where(Outbox.id == outbox_id, Outbox.status == OutboxStatus.FAILED.value)
            .values(
                status=OutboxStatus.PENDING.value,
                next_attempt_at=now,
                last_error=None,
                deadline=now + timedelta(seconds=rt.settings.outbox.lifetime),
            )
        )
        if not getattr(res, "rowcount", 0):
            raise Refused("not-failed", f"no failed outbox item {outbox_id}")
