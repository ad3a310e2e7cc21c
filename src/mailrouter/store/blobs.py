"""A big message's bytes into and out of SQLite in slices, never as a second whole copy.

A bound blob is copied by the driver (SQLITE_TRANSIENT), and the cached prepared statement
keeps that copy until it next runs: a 25 MB message stayed resident once more after its
250.  A selected blob is first assembled by SQLite from its overflow pages and then copied
into a Python ``bytes``: two copies at once.  From :data:`BLOB_THRESHOLD` on, SQLite's
incremental blob I/O avoids both: the insert binds only the length (``zeroblob(n)``) and
the bytes follow in slices; a read copies the pages straight into one ``bytes``.  The
insert avoids SQLite's own full-size buffer only because ``raw`` is the last column of
``messages`` (migration 0006).  Small messages keep the plain bind and select: one
statement on the hot path.  PostgreSQL binds and selects as ever.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from mailrouter.store.models import MESSAGES

__all__ = ["BLOB_THRESHOLD", "blob_connection", "read_raw", "write_raw"]

BLOB_THRESHOLD = 1024 * 1024
_SLICE = 1024 * 1024


def blob_connection(conn: Connection, size: int) -> sqlite3.Connection | None:
    """The sqlite3 connection to move a ``size``-byte message through, or None (bind it)."""
    if size < BLOB_THRESHOLD or conn.dialect.name != "sqlite":
        return None
    dbapi = conn.connection.driver_connection
    return dbapi if isinstance(dbapi, sqlite3.Connection) else None


def write_raw(dbapi: sqlite3.Connection, pk: int, raw: bytes) -> None:
    """Fill the zeroed ``raw`` of message ``pk`` with ``raw``, one slice at a time."""
    view = memoryview(raw)
    try:
        with _as_store_error("write"), dbapi.blobopen(MESSAGES.name, "raw", pk) as blob:
            for start in range(0, len(raw), _SLICE):
                blob.write(view[start : start + _SLICE])
    finally:
        view.release()


def read_raw(dbapi: sqlite3.Connection, pk: int) -> bytes:
    """Message ``pk``'s bytes, read from its pages into one ``bytes``."""
    with (
        _as_store_error("read"),
        dbapi.blobopen(MESSAGES.name, "raw", pk, readonly=True) as blob,
    ):
        return blob.read()


@contextmanager
def _as_store_error(what: str) -> Iterator[None]:
    """SQLite's errors (a full disk, say) as SQLAlchemy raises them, so that callers
    answer 451 and retry as for any other statement, instead of taking them for a bug."""
    try:
        yield
    except sqlite3.Error as exc:
        raise DBAPIError.instance(f"blob {what} messages.raw", None, exc, sqlite3.Error) from exc
