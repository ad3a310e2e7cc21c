"""Engine and transaction helpers: one place that knows SQLite's and PostgreSQL's quirks.

Writers on SQLite take the write lock up front (``BEGIN IMMEDIATE``) so two writers never
deadlock half-way through a transaction; readers use plain deferred transactions so a long
``interactions`` listing never blocks ingest.  WAL lets readers and the writer overlap.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["Database", "SchemaError", "open_database"]

log = logging.getLogger("mailrouter.store")

SQLITE_BUSY_TIMEOUT_MS = 30_000


class SchemaError(Exception):
    """The database schema is not at the revision this code needs."""


@dataclass
class Database:
    engine: Engine
    _reader: sessionmaker[Session]
    _writer: sessionmaker[Session]

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction: committed on success, rolled back on any exception."""
        with self._writer() as session, session.begin():
            yield session

    @contextmanager
    def scratch(self) -> Iterator[Session]:
        """A write transaction that is always rolled back (dry runs)."""
        with self._writer() as session:
            session.begin()
            try:
                yield session
            finally:
                session.rollback()

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._reader() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_setup(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy (through the "begin" hook below) emit BEGIN, not pysqlite.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cur.execute("PRAGMA foreign_keys=ON")
        # FULL: a message we acknowledged must survive power loss, not only a crash.
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("mailrouter_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _private_file(path: Path) -> None:
    """Create the SQLite file 0600 in a 0700 directory before SQLite does (with 0644 under
    the usual umask): it holds every message's raw bytes.  Its -wal and -shm files take
    the database file's mode."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def open_database(
    url: str, *, echo: bool = False, busy_timeout: float = SQLITE_BUSY_TIMEOUT_MS / 1000
) -> Database:
    """An engine for ``url`` with the project's per-backend settings applied.

    ``busy_timeout`` (seconds, SQLite only): how long a writer waits for a lock another
    connection holds before giving up with "database is locked".
    """
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo, "future": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _private_file(Path(parsed.database))
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout}
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    writer_bind: Engine = engine
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine, round(busy_timeout * 1000))
        writer_bind = engine.execution_options(mailrouter_begin="IMMEDIATE")
    return Database(
        engine=engine,
        _reader=sessionmaker(bind=engine, expire_on_commit=False),
        _writer=sessionmaker(bind=writer_bind, expire_on_commit=False),
    )


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())
