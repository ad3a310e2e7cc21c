"""Desk sessions: a row per signed-in browser, found by the SHA-256 of the cookie's secret.

Why rows and not a signed cookie: a signed cookie stays valid until it expires, whatever
happens on the server, so signing out could only ask the browser to forget it.  A row
is gone when the agent signs out, and the lookup on every request joins the agent's own
row: a removed agent has no sessions (the foreign key cascades), and a session opened
before the agent's password last changed is refused.  The browser holds only a random
secret; the store only its hash, so a copy of the database opens no session.

Each session has its own CSRF token, which every form of the desk carries back.  A
session ends after :data:`LIFETIME`, or after :data:`IDLE` without a request; to spare
the store a write per request, ``last_seen_at`` moves at most every :data:`TOUCH`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, or_, select, update

from mailrouter.agents import Agent, identity
from mailrouter.errors import Refused
from mailrouter.runtime import Runtime
from mailrouter.store.models import Agent as AgentRow
from mailrouter.store.models import DeskSession, utcnow

__all__ = [
    "IDLE",
    "LIFETIME",
    "Signed",
    "csrf_matches",
    "end_session",
    "find_session",
    "new_token",
    "open_session",
]

LIFETIME = timedelta(hours=12)
IDLE = timedelta(hours=2)
TOUCH = timedelta(minutes=5)


@dataclass(frozen=True)
class Signed:
    """The signed-in agent of a request, as it is in the store now, and its session."""

    agent: Agent
    csrf: str
    session_id: int


def new_token() -> str:
    """A fresh random secret for a cookie or a form (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def csrf_matches(given: str | None, expected: str) -> bool:
    """Whether a form's token is ``expected``, compared in constant time."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


def open_session(rt: Runtime, agent_name: str) -> str:
    """A new session for ``agent_name`` (just authenticated); returns the cookie's secret.

    Sessions that have ended are deleted on the way, so the table stays the size of the
    team that is signed in.
    """
    secret = new_token()
    now = utcnow()
    with rt.db.write() as s:
        s.execute(
            delete(DeskSession).where(
                or_(DeskSession.expires_at <= now, DeskSession.last_seen_at <= now - IDLE)
            )
        )
        row = s.scalar(select(AgentRow).where(AgentRow.name == agent_name))
        if row is None:  # removed between the password check and now
            raise Refused("unknown-agent", f"no agent {agent_name!r}")
        s.add(
            DeskSession(
                secret_hash=_digest(secret),
                agent_id=row.id,
                csrf=new_token(),
                password_set_at=row.password_set_at,
                created_at=now,
                last_seen_at=now,
                expires_at=now + LIFETIME,
            )
        )
    return secret


def find_session(rt: Runtime, secret: str) -> Signed | None:
    """The live session whose cookie secret is ``secret``, with its agent read now."""
    now = utcnow()
    with rt.db.read() as s:
        row = s.scalar(select(DeskSession).where(DeskSession.secret_hash == _digest(secret)))
        if row is None:
            return None
        agent = row.agent
        if (
            row.expires_at <= now
            or row.last_seen_at <= now - IDLE
            or agent.password_hash is None
            or agent.password_set_at != row.password_set_at
        ):
            return None
        signed = Signed(identity(agent), row.csrf, row.id)
        stale = row.last_seen_at <= now - TOUCH
    if stale:
        with rt.db.write() as s:
            s.execute(
                update(DeskSession)
                .where(DeskSession.id == signed.session_id)
                .values(last_seen_at=now)
            )
    return signed


def end_session(rt: Runtime, session_id: int) -> None:
    """Sign out: the session's row goes, and with it every request that carries its cookie."""
    with rt.db.write() as s:
        s.execute(delete(DeskSession).where(DeskSession.id == session_id))
