"""``mailrouter db backup PATH``: a consistent copy of a SQLite store while the daemon runs.

SQLite's online backup API (:meth:`sqlite3.Connection.backup`) copies the database in
one step inside a read transaction: the copy is the database as of one commit, and in
WAL mode the daemon's writers go on meanwhile (a read never blocks them).  Copying the
file with ``cp`` instead could catch it between a write to the WAL and a checkpoint.

The copy is written beside its target under a temporary name, made a single
self-contained file (``journal_mode=DELETE``: no ``-wal`` to carry along), checked with
``PRAGMA quick_check``, flushed to disk and only then renamed to ``PATH``: a backup
interrupted half-way never looks like a complete one.  It is readable by its owner only
(it holds every stored message).  PostgreSQL is backed up with ``pg_dump``
(docs/operations.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from mailrouter.errors import Refused
from mailrouter.log import event
from mailrouter.store.db import Database

__all__ = ["Backup", "backup"]

log = logging.getLogger("mailrouter.store")


@dataclass(frozen=True)
class Backup:
    path: Path
    size: int  # bytes
    schema: str | None  # the Alembic revision in the copy
    seconds: float


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup(db: Database, target: Path) -> Backup:
    """Copy ``db`` (SQLite) to ``target``, which must not exist; raises Refused, with
    nothing written, for PostgreSQL, an existing target or a missing directory."""
    if not db.is_sqlite:
        raise Refused(
            "not-sqlite",
            "db backup copies a SQLite database; back PostgreSQL up with pg_dump "
            "(docs/operations.md)",
        )
    target = target.expanduser().absolute()
    if target.exists():
        raise Refused("backup-exists", f"{target} exists; remove it or give another name")
    if not target.parent.is_dir():
        raise Refused("no-directory", f"{target.parent} is not a directory")
    partial = target.with_name(f".{target.name}.partial")
    started = time.monotonic()
    # Created empty and private first: SQLite would create it with the umask's mode.
    os.close(os.open(partial, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600))
    try:
        raw = db.engine.raw_connection()
        try:
            source = raw.driver_connection
            assert isinstance(source, sqlite3.Connection)
            copy = sqlite3.connect(partial, isolation_level=None)
            try:
                source.backup(copy)  # all pages in one step: one consistent snapshot
                copy.execute("PRAGMA journal_mode=DELETE")
                (check,) = copy.execute("PRAGMA quick_check").fetchone()
                if check != "ok":
                    raise Refused("backup-corrupt", f"the copy failed its check: {check}")
                schema = None
                with contextlib.suppress(sqlite3.OperationalError):  # an empty database
                    row = copy.execute("SELECT version_num FROM alembic_version").fetchone()
                    schema = row[0] if row else None
            finally:
                copy.close()
        finally:
            raw.close()
        with partial.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, target)
        _fsync_dir(target.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    done = Backup(target, target.stat().st_size, schema, time.monotonic() - started)
    event(
        log,
        "db-backup",
        path=str(target),
        size=done.size,
        schema=schema,
        seconds=round(done.seconds, 3),
    )
    return done
