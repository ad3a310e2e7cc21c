"""Waiting and backing off: the one jittered-backoff formula and the one interruptible wait.

Every retry loop in the daemon (the outbox, a crashed stage's restart, the IMAP watcher's
reconnect) uses these two, so "how long until the next try" has one answer and a stop
request never waits behind a sleep.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable
from typing import Any

__all__ = ["backoff", "wait_first", "wait_unless_stopped"]


def backoff(attempts: int, initial: float, cap: float, rnd: random.Random | None = None) -> float:
    """Seconds before attempt ``attempts + 1``: doubling from ``initial``, capped, jittered.

    The jitter (50–100 % of the step) keeps a burst of failures from retrying in lockstep.
    """
    # 2.0 ** 1024 raises OverflowError; a float product only becomes inf, which the cap
    # absorbs.  So a row retried a thousand times (tiny initial, long lifetime) gets the cap.
    doublings = min(max(0, attempts - 1), 1023)
    step = min(cap, initial * 2.0**doublings)
    jitter: float = (rnd or random).uniform(0.5, 1.0)
    return step * jitter


async def wait_unless_stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stop`` is set; True when stopped (the caller should end)."""
    if stop.is_set():
        return True
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        return False
    return True


async def wait_first(*aws: Awaitable[Any], seconds: float | None) -> None:
    """Return when the first of ``aws`` finishes or ``seconds`` pass; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
