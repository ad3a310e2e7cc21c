"""Hot-path statements compiled once per dialect and run on the driver's own cursor.

SQLAlchemy's ``Connection.execute`` costs 30–50 µs of Python per statement here, before
the driver runs it (a SQLite insert itself takes ~17 µs, a keyed select ~2 µs); a message
costs about ten statements on the single writer thread, the daemon's bottleneck
(docs/benchmarks.md).  A :class:`Prepared` statement is still written as SQLAlchemy Core
(one source for the SQL, quoted and cast for each backend), compiled on first use per
dialect and set of parameter names, and from then on executed directly: the parameters
go through each column type's own bind processor (``UTCDateTime`` included), in the
order the compiled SQL wants them.

The driver's errors are raised as SQLAlchemy's (``IntegrityError``, ``OperationalError``)
so that callers tell store trouble from bugs the same way either path.  Deliberately
small: no expanding ``IN`` lists, no result processing (the selects run
this way return integers and strings only), no events — ``echo`` and
``before_cursor_execute`` do not see these statements; the driver's own tracing does
(``sqlite3.Connection.set_trace_callback``).  Everything else stays on SQLAlchemy.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.base import Executable

__all__ = ["Prepared", "savepoint"]

_Processor = Callable[[Any], Any] | None


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]  # the parameters, in the order a positional driver takes them
    positional: bool
    processors: tuple[_Processor, ...]
    fixed: Mapping[str, Any]  # values compiled into the statement (``values(unread=True)``)


class Prepared:
    """One Core statement, compiled on first use, run on the DBAPI cursor afterwards.

    ``returning``: an INSERT into ``table`` whose new primary key :meth:`insert` returns
    (``lastrowid`` on SQLite, ``RETURNING`` elsewhere).
    """

    def __init__(self, stmt: Executable, *, returning: Table | None = None) -> None:
        self._stmt = stmt
        self._returning = returning
        self._compiled: dict[tuple[str, frozenset[str]], _Compiled] = {}

    def _compile(self, conn: Connection, keys: frozenset[str]) -> _Compiled:
        dialect = conn.dialect
        stmt: Any = self._stmt
        if self._returning is not None and dialect.name != "sqlite":
            stmt = stmt.returning(*self._returning.primary_key.columns)
        compiled: Any = stmt.compile(dialect=dialect, column_keys=sorted(keys))
        if "POSTCOMPILE" in compiled.string:
            raise TypeError("Prepared statements take no expanding IN parameters")
        if compiled.positional:
            names = tuple(compiled.positiontup)
        else:  # named (psycopg): the binds the SQL names
            names = tuple(n for n in compiled.binds if f"%({n})s" in compiled.string)
        fixed: dict[str, Any] = {}
        for name in names:
            if name in keys:
                continue
            bind = compiled.binds[name]
            if bind.value is None:
                # A column default SQLAlchemy would fill in at execution: callers of a
                # prepared insert name every column instead.
                raise KeyError(f"{name!r}: no value given for {compiled.string[:60]}…")
            fixed[name] = bind.value
        processors = tuple(
            compiled.binds[n].type.dialect_impl(dialect).bind_processor(dialect) for n in names
        )
        return _Compiled(compiled.string, names, compiled.positional, processors, fixed)

    def _params(self, c: _Compiled, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        out = [
            p(v) if p is not None else v
            for p, v in zip(
                c.processors, (values.get(n, c.fixed.get(n)) for n in c.names), strict=True
            )
        ]
        return out if c.positional else dict(zip(c.names, out, strict=True))

    def _ready(self, conn: Connection, values: Mapping[str, Any]) -> _Compiled:
        key = (conn.dialect.name, frozenset(values))
        c = self._compiled.get(key)
        if c is None:
            c = self._compiled[key] = self._compile(conn, key[1])
        return c

    def execute(self, conn: Connection, values: Mapping[str, Any] | None = None) -> Any:
        """Run the statement in ``conn``'s transaction; returns the driver's cursor."""
        values = values or {}
        c = self._ready(conn, values)
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        params = self._params(c, values)
        try:
            cursor.execute(c.sql, params)
        except conn.dialect.loaded_dbapi.Error as exc:
            cursor.close()
            raise _wrapped(conn, c.sql, params, exc) from exc
        return cursor

    def executemany(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run the statement once per row (every row with the same keys)."""
        if not rows:
            return
        c = self._ready(conn, rows[0])
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        params = [self._params(c, r) for r in rows]
        try:
            cursor.executemany(c.sql, params)  # type: ignore[arg-type]
        except conn.dialect.loaded_dbapi.Error as exc:
            raise _wrapped(conn, c.sql, params, exc) from exc
        finally:
            cursor.close()

    def insert(self, conn: Connection, values: Mapping[str, Any]) -> int:
        """Run an INSERT made with ``returning=``; returns the new row's key."""
        assert self._returning is not None, "insert() needs Prepared(..., returning=table)"
        cursor = self.execute(conn, values)
        try:
            if conn.dialect.name == "sqlite":
                return int(cursor.lastrowid)
            (pk,) = cursor.fetchone()
            return int(pk)
        finally:
            cursor.close()

    def scalar(self, conn: Connection, values: Mapping[str, Any] | None = None) -> Any:
        """The first column of the first row, or None."""
        cursor = self.execute(conn, values)
        try:
            row = cursor.fetchone()
            return None if row is None else row[0]
        finally:
            cursor.close()

    def rows(self, conn: Connection, values: Mapping[str, Any] | None = None) -> list[Any]:
        """Every row, as the driver's tuples."""
        cursor = self.execute(conn, values)
        try:
            return list(cursor.fetchall())
        finally:
            cursor.close()


def _wrapped(conn: Connection, sql: str, params: Any, exc: Exception) -> Exception:
    """The driver's error as SQLAlchemy raises it (``IntegrityError``, ``OperationalError``,
    …): callers classify store errors by those classes, whichever way the SQL ran."""
    return DBAPIError.instance(
        sql, params, exc, conn.dialect.loaded_dbapi.Error, dialect=conn.dialect
    )


_savepoints = itertools.count(1)


@contextmanager
def savepoint(conn: Connection) -> Iterator[None]:
    """A SAVEPOINT issued on the driver: released when the block ends, rolled back to when
    it raises.  For Core-only work (no ORM objects, which would outlive a rollback the
    Session never heard of); ``Session.begin_nested()`` costs ~10x as much per message."""
    name = f"mr_{next(_savepoints)}"
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]

    def run(sql: str) -> None:
        try:
            cursor.execute(sql)
        except conn.dialect.loaded_dbapi.Error as exc:
            # SQLite rolls the whole transaction back on some errors (a full disk), and
            # the savepoint is gone with it: store trouble, as SQLAlchemy would say.
            raise _wrapped(conn, sql, (), exc) from exc

    try:
        run(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            run(f"ROLLBACK TO SAVEPOINT {name}")
            run(f"RELEASE SAVEPOINT {name}")
            raise
        run(f"RELEASE SAVEPOINT {name}")
    finally:
        cursor.close()
