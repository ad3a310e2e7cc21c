"""Instances: which process incarnation holds a claim, and whether it is still alive.

A daemon registers at start, beats every ``outbox.heartbeat`` seconds and says when it
stops; a CLI flush registers for its one pass.  A claim (an outbox row in ``sending``)
belongs to an instance: once that instance is retired or silent for
``outbox.dead_after`` seconds its claims are claimable again.  No business rules here.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Select, delete, or_, select, update
from sqlalchemy.orm import Session

from mailrouter.store.models import INSTANCES, LEASES, OUTBOX, OutboxStatus

__all__ = ["alive_ids", "claim_is_dead", "heartbeat", "register", "retire"]

_I = INSTANCES.c


def register(session: Session, name: str, now: datetime) -> str:
    """A new incarnation called ``name``; older incarnations of that name are retired.

    A restarted daemon thus takes back its dead predecessor's claims at once, instead of
    waiting for their leases or for its heartbeat to go stale.  Returns the new id.
    """
    retire(session, select(_I.id).where(_I.name == name, _I.stopped_at.is_(None)), now)
    # Housekeeping: incarnations gone for a day hold nothing and explain nothing more.
    session.connection().execute(
        delete(INSTANCES).where(
            _I.heartbeat_at < now - timedelta(days=1),
            _I.id.not_in(select(OUTBOX.c.claimed_by).where(OUTBOX.c.claimed_by.is_not(None))),
        )
    )
    instance_id = uuid.uuid4().hex
    session.connection().execute(
        INSTANCES.insert().values(
            id=instance_id,
            name=name,
            host=socket.gethostname()[:255],
            pid=os.getpid(),
            started_at=now,
            heartbeat_at=now,
            stopped_at=None,
        )
    )
    return instance_id


def heartbeat(session: Session, instance_id: str, now: datetime) -> bool:
    """Say ``instance_id`` is alive; False if it was retired meanwhile (a newer
    incarnation of its name started): its claims are no longer its own."""
    res = session.connection().execute(
        update(INSTANCES)
        .where(_I.id == instance_id, _I.stopped_at.is_(None))
        .values(heartbeat_at=now)
    )
    return bool(res.rowcount)


def retire(session: Session, ids: Select[tuple[str]] | list[str], now: datetime) -> int:
    """Mark instances stopped and give their claims back (due now); returns the claims freed.

    Their leases (an IMAP mailbox being watched) are freed too: a daemon restarted after
    a crash must not wait in standby for its own dead incarnation's lease to run out.
    """
    conn = session.connection()
    # Resolved once: a query such as "this name's running incarnations" matches nothing
    # once they are marked stopped, and the claims and leases below would stay taken.
    ids = [str(i) for i in conn.execute(ids).scalars()] if not isinstance(ids, list) else ids
    if not ids:
        return 0
    conn.execute(
        update(INSTANCES).where(_I.id.in_(ids), _I.stopped_at.is_(None)).values(stopped_at=now)
    )
    conn.execute(delete(LEASES).where(LEASES.c.holder.in_(ids)))
    o = OUTBOX.c
    # next_attempt_at stays as it was (due already, or it would not have been claimed):
    # the work a crash interrupted keeps its place at the head of the queue instead of
    # waiting behind the whole backlog.
    res = conn.execute(
        update(OUTBOX)
        .where(o.status == OutboxStatus.SENDING.value, o.claimed_by.in_(ids))
        .values(status=OutboxStatus.PENDING.value, claimed_by=None, claimed_until=None)
    )
    return int(res.rowcount or 0)


def alive_ids(now: datetime, dead_after: float) -> Select[tuple[str]]:
    """The ids of instances that have not stopped and beat within ``dead_after`` seconds."""
    cutoff = now - timedelta(seconds=dead_after)
    return select(_I.id).where(_I.stopped_at.is_(None), _I.heartbeat_at >= cutoff)


def claim_is_dead(now: datetime, dead_after: float) -> ColumnElement[bool]:
    """For an outbox row in ``sending``: its lease ran out, or its holder is not alive."""
    o = OUTBOX.c
    return or_(
        o.claimed_until < now,
        o.claimed_by.is_(None),
        o.claimed_by.not_in(alive_ids(now, dead_after)),
    )
