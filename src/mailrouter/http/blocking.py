"""Run the synchronous domain layer from a route: each call on a worker thread.

The domain operations and the read views are plain SQLAlchemy, which blocks; a route
awaits them here so the event loop (and with it SMTP, IMAP and the outbox) never waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from sqlalchemy.orm import Session

from mailrouter.runtime import Runtime

__all__ = ["call", "read"]

T = TypeVar("T")
P = ParamSpec("P")


async def call(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``func(*args, **kwargs)`` on a worker thread (a domain operation: its own transaction)."""
    return await asyncio.to_thread(func, *args, **kwargs)


async def read(rt: Runtime, query: Callable[[Session], T]) -> T:
    """``query(session)`` in one read transaction, on a worker thread."""

    def run() -> T:
        with rt.db.read() as s:
            return query(s)

    return await asyncio.to_thread(run)
