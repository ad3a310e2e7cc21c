"""Schema migrations: a store written by the previous revision upgrades in place, its rows
read back through today's code, and every revision downgrades and upgrades again."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text

from helpers import make_settings, scenario
from mailrouter.config import Settings
from mailrouter.pipeline import Pipeline
from mailrouter.runtime import Runtime
from mailrouter.status import status
from mailrouter.store.db import open_database
from mailrouter.store.migrate import _config, current_revision, head_revision, upgrade
from mailrouter.trace import trace


@pytest.fixture
def store_settings(tmp_path: Path, database_url: str) -> Settings:
    return make_settings(tmp_path).with_(database_url=database_url)


def _to(settings: Settings, revision: str, *, down: bool = False) -> None:
    db = open_database(settings.database_url)
    try:
        cfg = _config()
        with db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            (command.downgrade if down else command.upgrade)(cfg, revision)
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
            conn.execute(
                text(
                    "INSERT INTO accounts (name, address, transfer_enabled, transfer_notify,"
                    " created_at) VALUES ('sales', 'sales@example.test', true, true,"
                    " '2026-11-28 09:00:00')"
                )
            )
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
