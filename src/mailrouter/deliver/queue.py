"""Operator actions on the outbox (the delivery queue): requeue failed work.

Like the other domain operations, each is one transaction and refuses with
:class:`~mailrouter.errors.Refused` without changing anything.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from mailrouter.errors import Refused
from mailrouter.runtime import Runtime
from mailrouter.store.models import Outbox, OutboxStatus, utcnow

__all__ = ["requeue"]


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
