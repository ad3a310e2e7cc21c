"""Group commit (store/writer.py): many callers, one transaction, each its own answer."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from mailrouter.store.db import Database, open_database
from mailrouter.store.writer import WriteBatcher


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{tmp_path / 'w.db'}")
    with database.engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (v INTEGER UNIQUE)"))
    yield database
    database.dispose()


def insert(value: int) -> object:
    def op(s: Session) -> int:
        s.execute(text("INSERT INTO t (v) VALUES (:v)"), {"v": value})
        return value

    return op


def stored(db: Database) -> list[int]:
    with db.read() as s:
        return [r[0] for r in s.execute(text("SELECT v FROM t ORDER BY v"))]


async def test_each_caller_gets_its_own_result_after_one_commit(db: Database) -> None:
    """Concurrent submissions share a transaction and each gets its own value back."""
    w = WriteBatcher(db)
    try:
        results = await asyncio.gather(*(w.submit(insert(i)) for i in range(20)))  # type: ignore[arg-type]
    finally:
        await w.aclose()
    assert results == list(range(20))
    assert stored(db) == list(range(20))


async def test_a_failing_operation_rolls_back_alone(db: Database) -> None:
    """A duplicate insert fails for its caller only; the rest of the batch is committed."""
    w = WriteBatcher(db)
    try:
        outcomes = await asyncio.gather(
            w.submit(insert(1)),  # type: ignore[arg-type]
            w.submit(insert(1)),  # type: ignore[arg-type]
            w.submit(insert(2)),  # type: ignore[arg-type]
            return_exceptions=True,
        )
    finally:
        await w.aclose()
    assert outcomes[0] == 1 and outcomes[2] == 2
    assert isinstance(outcomes[1], Exception) and "UNIQUE" in str(outcomes[1])
    assert stored(db) == [1, 2]


async def test_caller_cancelled_mid_batch_does_not_shift_others_results(db: Database) -> None:
    """A caller that gives up while its batch runs must not hand its result to the next one."""
    w = WriteBatcher(db)
    entered, release = threading.Event(), threading.Event()

    def slow(s: Session) -> str:
        entered.set()
        assert release.wait(10)
        return "slow"

    def value(name: str) -> object:
        return lambda s: name

    try:
        first = asyncio.ensure_future(w.submit(slow))
        await asyncio.to_thread(entered.wait, 10)  # batch 1 (slow) is running
        # These three queue up and run together in batch 2.
        a = asyncio.ensure_future(w.submit(value("a")))  # type: ignore[arg-type]
        b = asyncio.ensure_future(w.submit(value("b")))  # type: ignore[arg-type]
        c = asyncio.ensure_future(w.submit(value("c")))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        release.set()
        assert await first == "slow"
        # Batch 2 is now in the writer thread; b's caller gives up meanwhile.
        await asyncio.sleep(0)
        b.cancel()
        assert (await a, await c) == ("a", "c")
        assert b.cancelled()
    finally:
        release.set()
        await w.aclose()
