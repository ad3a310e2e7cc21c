"""Group commit: the daemon's writes run on one thread, many per transaction.

A durable commit costs an fsync (milliseconds on real disks); with eight SMTP sessions
each waiting for its own commit, the fsyncs — not the work — set the pace, and on SQLite
the sessions' threads also fight over the write lock.  Here every write operation is
queued; one thread takes whatever is waiting, runs each operation in its own SAVEPOINT
(so one failing operation does not undo the others) inside a single transaction, commits
once, and only then resolves each caller's future.  A caller therefore still hears
"done" only after its data is durable — persist-then-acknowledge holds — but a burst
shares one fsync.  An operation that already undoes its own work when it fails
(``submit(op, atomic=True)``: the pipeline's accept, which runs in a savepoint of its
own) is spared the second savepoint: two statements less per message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from mailrouter.store.db import Database

__all__ = ["WriteBatcher"]

log = logging.getLogger("mailrouter.store")
T = TypeVar("T")
Op = Callable[[Session], Any]
_Queued = tuple[Op, bool, "asyncio.Future[Any]"]

MAX_BATCH = 128


class WriteBatcher:
    """Runs ``op(session)`` callables in shared transactions on a single writer thread."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailrouter-writer")
        self._queue: asyncio.Queue[_Queued] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, op: Callable[[Session], T], *, atomic: bool = False) -> T:
        """Run ``op`` in the next transaction; returns its result after the commit.

        Raises what ``op`` raised (its savepoint rolled back, the others kept), or the
        commit's own error (nothing in that transaction was kept).  ``atomic``: ``op``
        rolls back its own writes before it raises, so it runs without a savepoint here.
        """
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._loop = loop
            self._task = loop.create_task(self._run(self._queue), name="mailrouter-writer")
        assert self._queue is not None
        fut: asyncio.Future[T] = loop.create_future()
        await self._queue.put((op, atomic, fut))
        return await fut

    async def _run(self, queue: asyncio.Queue[_Queued]) -> None:
        while True:
            await self._next_batch(queue)

    async def _next_batch(self, queue: asyncio.Queue[_Queued]) -> None:
        """Run the operations waiting now as one transaction and hand out their outcomes.

        A method of its own so that its locals die with it: a loop's variables would keep
        the last batch's operations, and the messages they hold, alive while the next batch
        runs (a 25 MB message stayed resident through its own delivery).
        """
        batch = [await queue.get()]
        while len(batch) < MAX_BATCH and not queue.empty():
            batch.append(queue.get_nowait())
        # Callers that gave up before the batch started are left out; one that gives up
        # while it runs still has its operation committed, and its outcome is dropped
        # below — every outcome is matched to its own future, never shifted.
        run = [(op, atomic, fut) for op, atomic, fut in batch if not fut.cancelled()]
        del batch
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._run_batch, [(op, atomic) for op, atomic, _ in run]
            )
        except Exception as exc:  # noqa: BLE001 - the commit failed: every op failed
            outcomes = [exc] * len(run)
        for (_op, _atomic, fut), outcome in zip(run, outcomes, strict=True):
            if fut.cancelled():
                continue
            if isinstance(outcome, _Failed):
                fut.set_exception(outcome.exc)
            elif isinstance(outcome, BaseException):
                fut.set_exception(outcome)
            else:
                fut.set_result(outcome)

    def _run_batch(self, ops: list[tuple[Op, bool]]) -> list[Any]:
        outcomes: list[Any] = []
        with self.db.write() as session:
            for op, atomic in ops:
                try:
                    if atomic:
                        outcomes.append(op(session))
                        continue
                    with session.begin_nested():
                        outcomes.append(op(session))
                except Exception as exc:  # noqa: BLE001 - reported to that op's caller only
                    outcomes.append(_Failed(exc))
        return outcomes

    async def aclose(self) -> None:
        """Stop the writer task (pending submissions fail) and the thread."""
        if self._task is not None and self._loop is asyncio.get_running_loop():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        self.shutdown()

    def shutdown(self) -> None:
        """Stop the writer thread (for callers outside any event loop)."""
        self._pool.shutdown(wait=True)


class _Failed:
    """An operation's own exception, kept apart from results that happen to be exceptions."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc
