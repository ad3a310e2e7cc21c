"""Prepared statements (store/prepared.py) on both stores: the same rows as SQLAlchemy's
own execution would write and read — keys, UTC timestamps, booleans, literals compiled
into the statement — and a clear refusal of what they do not support."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailrouter.store.db import Database, open_database
from mailrouter.store.migrate import upgrade
from mailrouter.store.models import INTERACTIONS, Interaction
from mailrouter.store.prepared import Prepared, savepoint

_INSERT = Prepared(insert(INTERACTIONS), returning=INTERACTIONS)
_REOPEN = Prepared(
    update(INTERACTIONS).where(INTERACTIONS.c.id == bindparam("iid")).values(status="open")
)
_SUBJECTS = Prepared(
    select(INTERACTIONS.c.id, INTERACTIONS.c.subject)
    .where(INTERACTIONS.c.status == bindparam("status"))
    .order_by(INTERACTIONS.c.id)
)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    db = open_database(database_url)
    upgrade(db)
    with db.write() as s:
        s.connection().exec_driver_sql(
            "INSERT INTO accounts (name, address, transfer_enabled, transfer_notify, created_at)"
            " VALUES ('sales', 'sales@example.test', true, true, '2026-11-28 09:00:00')"
        )
    yield db
    db.dispose()


def _row(subject: str, when: datetime) -> dict[str, object]:
    return dict(
        created_at=when,
        account_id=1,
        origin_account_id=1,
        status="closed",
        unread=True,
        distribution="queue",
        customer_address="carol@customer.test",
        customer_name=None,
        subject=subject,
        last_activity_at=when,
    )


def _one(s: Session, pk: int) -> Interaction:
    return s.execute(select(Interaction).where(Interaction.id == pk)).scalar_one()


def test_a_prepared_insert_returns_its_key_and_writes_what_sqlalchemy_reads_back(
    db: Database,
) -> None:
    """Keys increase; a timestamp in another zone is stored as the same UTC instant (the
    column type's own processing), a boolean as a boolean, None as NULL."""
    zoned = datetime(2026, 12, 8, 9, 30, 15, 250, tzinfo=timezone(timedelta(hours=2)))
    with db.write() as s:
        first = _INSERT.insert(s.connection(), _row("Chairs", zoned))
        second = _INSERT.insert(s.connection(), _row("Desks", datetime(2026, 12, 8, tzinfo=UTC)))
    assert second > first
    with db.read() as s:
        row = _one(s, first)
        assert row.created_at == zoned and row.created_at.tzinfo is not None
        assert row.created_at.utcoffset() == timedelta(0)
        assert row.unread is True and row.customer_name is None and row.subject == "Chairs"


def test_values_compiled_into_a_statement_and_selects_with_parameters(db: Database) -> None:
    """``values(status="open")`` needs no parameter; a select returns the driver's rows."""
    when = datetime(2026, 12, 8, tzinfo=UTC)
    with db.write() as s:
        conn = s.connection()
        pks = [_INSERT.insert(conn, _row(f"n{n}", when)) for n in range(3)]
        _REOPEN.execute(conn, {"iid": pks[1]}).close()
    with db.read() as s:
        conn = s.connection()
        assert [tuple(r) for r in _SUBJECTS.rows(conn, {"status": "open"})] == [(pks[1], "n1")]
        assert _SUBJECTS.scalar(conn, {"status": "closed"}) == pks[0]
        assert _SUBJECTS.scalar(conn, {"status": "nothing"}) is None


def test_an_insert_that_leaves_out_a_defaulted_column_is_refused_not_written_null(
    db: Database,
) -> None:
    """SQLAlchemy would fill a Python-side default in; a prepared insert refuses instead."""
    row = _row("x", datetime(2026, 12, 8, tzinfo=UTC))
    del row["unread"]  # the model's default=True
    with db.write() as s, pytest.raises(KeyError, match="unread"):
        _INSERT.insert(s.connection(), row)


def test_a_driver_error_is_raised_as_sqlalchemy_raises_it(db: Database) -> None:
    """The pipeline retries an IntegrityError and 451s an OperationalError: a prepared
    statement's failures must be those classes, not the driver's own."""
    row = _row("x", datetime(2026, 12, 8, tzinfo=UTC))
    with db.write() as s:
        pk = _INSERT.insert(s.connection(), row)
    with db.write() as s, pytest.raises(IntegrityError):
        _INSERT.insert(s.connection(), row | {"id": pk})
    with db.write() as s, pytest.raises(IntegrityError):
        _INSERT.executemany(s.connection(), [row | {"id": pk}])


def test_a_savepoint_undoes_its_block_only_and_lets_the_error_through(db: Database) -> None:
    """What the pipeline relies on for each message: a failing message leaves no rows, the
    ones before it in the same transaction stay."""
    when = datetime(2026, 12, 8, tzinfo=UTC)
    with db.write() as s:
        conn = s.connection()
        with savepoint(conn):
            kept = _INSERT.insert(conn, _row("kept", when))
        with pytest.raises(IntegrityError), savepoint(conn):
            _INSERT.insert(conn, _row("undone", when))
            _INSERT.insert(conn, _row("clash", when) | {"id": kept})
        with savepoint(conn):  # the transaction goes on after the rollback
            after = _INSERT.insert(conn, _row("after", when))
    with db.read() as s:
        rows = _SUBJECTS.rows(s.connection(), {"status": "closed"})
        assert [tuple(r) for r in rows] == [(kept, "kept"), (after, "after")]


def test_an_expanding_in_list_is_refused() -> None:
    stmt = Prepared(
        select(INTERACTIONS.c.id).where(INTERACTIONS.c.id.in_(bindparam("ids", expanding=True)))
    )
    db = open_database("sqlite://")
    try:
        with db.read() as s, pytest.raises(TypeError, match="expanding"):
            stmt.rows(s.connection(), {"ids": [1, 2]})
    finally:
        db.dispose()
