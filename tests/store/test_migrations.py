"""Schema migrations: a store written by the previous revision upgrades in place, its rows
read back through today's code, and every revision downgrades and upgrades again."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from helpers import make_settings, scenario
from mailrouter.config import Settings
from mailrouter.pipeline import Pipeline
from mailrouter.runtime import Runtime
from mailrouter.status import status
from mailrouter.store.db import Database, open_database
from mailrouter.store.migrate import current_revision, downgrade, head_revision, upgrade
from mailrouter.trace import trace
from servers import SQLITE_ONLY


@pytest.fixture
def store_settings(tmp_path: Path, database_url: str) -> Settings:
    return make_settings(tmp_path).with_(database_url=database_url)


# The one account the rows written under an old revision belong to (plain SQL: the
# models describe today's schema, not that revision's).
_SALES = text(
    "INSERT INTO accounts (name, address, transfer_enabled, transfer_notify, created_at)"
    " VALUES ('sales', 'sales@example.test', true, true, '2026-11-28 09:00:00')"
)


def _to(settings: Settings, revision: str, *, down: bool = False) -> None:
    db = open_database(settings.database_url)
    try:
        if down:
            downgrade(db, revision)
        else:
            upgrade(db, revision)
    finally:
        db.dispose()


def test_a_0001_store_with_mail_upgrades_and_its_messages_can_be_traced(
    store_settings: Settings,
) -> None:
    """Mail stored under 0001; upgraded: trace and status read it (no envelope, no step)."""
    _to(store_settings, "0001")
    db = open_database(store_settings.database_url)
    try:
        assert current_revision(db) == "0001"
        with db.engine.begin() as conn:
            conn.execute(_SALES)
            conn.execute(
                text(
                    "INSERT INTO messages (direction, account_id, message_id, synthetic_id,"
                    " size, content_hash, raw, status, rule, action, source, received_at)"
                    " VALUES ('inbound', 1, 'old@customer.test', false, 3, 'h', :raw,"
                    " 'held', 'malformed', 'hold', 'smtp', '2026-11-28 09:00:00')"
                ),
                {"raw": b"abc"},
            )
        assert upgrade(db) == ("0001", head_revision())
    finally:
        db.dispose()
    rt = Runtime.open(store_settings)
    try:
        with rt.db.read() as s:
            [copy] = trace(s, "<old@customer.test>")["messages"]
        assert copy["message"]["envelope_from"] is None and copy["decision"]["step"] is None
        assert status(rt)["queue"]["held-messages"]["count"] == 1
    finally:
        rt.close()


def test_head_downgrades_to_0001_and_upgrades_again(store_settings: Settings) -> None:
    """0003's downgrade removes exactly what it added; the upgrade after it works."""
    rt = Runtime.open(store_settings)
    try:
        Pipeline(rt).accept(
            scenario("chairs-quote", "01-customer-asks.eml"),
            [store_settings.account("sales")],
            source="test",
        )
    finally:
        rt.close()
    _to(store_settings, "0001", down=True)
    _to(store_settings, "head")
    db = open_database(store_settings.database_url)
    try:
        assert current_revision(db) == head_revision()
    finally:
        db.dispose()


def _columns(db: Database, table: str) -> list[str]:
    return [c["name"] for c in inspect(db.engine).get_columns(table)]


@SQLITE_ONLY
def test_a_0005_sqlite_store_is_rebuilt_with_raw_last_and_keeps_every_row_and_reference(
    store_settings: Settings,
) -> None:
    """0006 moves messages.raw to the end (SQLite fills a last-column blob in slices); the
    rebuild keeps every message and every row that points at one, with enforcement back on."""
    _to(store_settings, "0005")
    db = open_database(store_settings.database_url)
    try:
        assert _columns(db, "messages")[-1] != "raw"
        with db.engine.begin() as conn:
            conn.execute(_SALES)
            for n in (1, 2):
                conn.execute(
                    text(
                        "INSERT INTO messages (id, direction, account_id, message_id,"
                        " synthetic_id, size, content_hash, raw, status, source, received_at)"
                        " VALUES (:n, 'inbound', 1, :mid, false, 3, 'h', :raw, 'stored',"
                        " 'smtp', '2026-11-28 09:00:00')"
                    ),
                    {"n": n, "mid": f"m{n}@customer.test", "raw": b"raw%d" % n},
                )
            conn.execute(
                text(
                    "INSERT INTO message_refs (message_pk, position, ref_id)"
                    " VALUES (2, 0, 'm1@customer.test')"
                )
            )
            conn.execute(
                text("INSERT INTO message_recipients (message_pk, account_id) VALUES (2, 1)")
            )
        assert upgrade(db) == ("0005", head_revision())
        assert _columns(db, "messages")[-1] == "raw"
        with db.engine.connect() as conn:
            rows = conn.execute(text("SELECT id, message_id, raw FROM messages ORDER BY id"))
            assert [tuple(r) for r in rows] == [
                (1, "m1@customer.test", b"raw1"),
                (2, "m2@customer.test", b"raw2"),
            ]
            assert conn.execute(text("SELECT count(*) FROM message_refs")).scalar() == 1
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall() == []
            # The pooled connection enforces references again after the upgrade.
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            with pytest.raises(IntegrityError):
                conn.execute(
                    text("INSERT INTO message_recipients (message_pk, account_id) VALUES (9, 1)")
                )
        names = {ix["name"] for ix in inspect(db.engine).get_indexes("messages")}
        assert {"ix_messages_interaction", "ix_messages_status"} <= names
    finally:
        db.dispose()


@SQLITE_ONLY
def test_a_fresh_sqlite_store_has_raw_as_the_last_column_of_messages(
    store_settings: Settings,
) -> None:
    """Guards 0006 against a later migration that adds a column to messages after raw."""
    db = open_database(store_settings.database_url)
    try:
        upgrade(db)
        assert _columns(db, "messages")[-1] == "raw"
    finally:
        db.dispose()


@pytest.mark.postgres
def test_instances_starting_at_once_on_a_fresh_postgresql_all_reach_head() -> None:
    """Four upgrades of one empty database at the same moment: one migrates, the others
    wait on the upgrade lock and find the schema at head; none fails on CREATE TABLE."""
    import threading

    from servers import fresh_database

    with fresh_database() as url:
        barrier = threading.Barrier(4)
        results: list[object] = []

        def start() -> None:
            db = open_database(url)
            try:
                barrier.wait(timeout=30)
                results.append(upgrade(db)[1])
            except Exception as exc:  # noqa: BLE001 - the assertion below shows it
                results.append(exc)
            finally:
                db.dispose()

        threads = [threading.Thread(target=start) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert results == [head_revision()] * 4, results


@pytest.mark.postgres
def test_instances_opening_a_fresh_postgresql_at_once_share_one_set_of_accounts(
    tmp_path: Path,
) -> None:
    """Four Runtime.open at once on a database whose schema is there but whose accounts are
    not (what `db upgrade` then starting several instances gives): all start, and they
    agree on each account's row; none dies on a duplicate address.  Five rounds."""
    from servers import fresh_database

    for _round in range(5):
        with fresh_database() as url:
            db = open_database(url)
            try:
                upgrade(db)
            finally:
                db.dispose()
            _open_at_once(make_settings(tmp_path).with_(database_url=url), 4)


def _open_at_once(settings: Settings, n: int) -> None:
    """``n`` threads call Runtime.open(settings) behind a barrier; each one's account map."""
    import threading

    barrier = threading.Barrier(n)
    results: list[object] = []

    def start() -> None:
        try:
            barrier.wait(timeout=30)
            rt = Runtime.open(settings)
        except Exception as exc:  # noqa: BLE001 - the assertion below shows it
            results.append(exc)
            return
        try:
            results.append({a.name: rt.accounts.id(a.name) for a in settings.accounts})
        finally:
            rt.close()

    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == n and all(r == results[0] for r in results), results
    assert isinstance(results[0], dict) and len(results[0]) == len(settings.accounts)
