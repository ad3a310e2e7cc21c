"""Leases: a named piece of work held by one instance at a time, until it expires.

Used for watching an IMAP mailbox: two instances on one PostgreSQL must not both watch
it.  A lease row (rather than a PostgreSQL advisory lock) because it works the same on
SQLite, survives a dropped connection without losing the holder's identity, and shows
who holds what (``leases`` table).  A holder that dies stops renewing; its lease expires
and another instance takes it.  No business rules here.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailrouter.store.models import LEASES

__all__ = ["acquire", "holder_of", "release", "renew"]

_L = LEASES.c


def acquire(session: Session, name: str, holder: str, now: datetime, ttl: float) -> bool:
    """Take ``name`` for ``holder`` if it is free, expired or already its own."""
    conn = session.connection()
    until = now + timedelta(seconds=ttl)
    res = conn.execute(
        update(LEASES)
        .where(_L.name == name, (_L.holder == holder) | (_L.expires_at < now))
        .values(holder=holder, expires_at=until, acquired_at=now)
    )
    if res.rowcount:
        return True
    if conn.scalar(select(_L.holder).where(_L.name == name)) is not None:
        return False  # someone else holds it, and it has not expired
    try:
        with session.begin_nested():
            conn.execute(
                LEASES.insert().values(name=name, holder=holder, expires_at=until, acquired_at=now)
            )
    except IntegrityError:
        return False  # another instance inserted it first
    return True


def renew(session: Session, name: str, holder: str, now: datetime, ttl: float) -> bool:
    """Extend ``holder``'s lease; False if it is no longer ``holder``'s."""
    res = session.connection().execute(
        update(LEASES)
        .where(_L.name == name, _L.holder == holder)
        .values(expires_at=now + timedelta(seconds=ttl))
    )
    return bool(res.rowcount)


def release(session: Session, name: str, holder: str) -> None:
    session.connection().execute(delete(LEASES).where(_L.name == name, _L.holder == holder))


def holder_of(session: Session, name: str, now: datetime) -> str | None:
    """Who holds ``name`` now (None when free or expired)."""
    return session.scalar(select(_L.holder).where(_L.name == name, _L.expires_at >= now))
