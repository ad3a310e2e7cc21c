"""Schema migrations (Alembic) run from code: ``mailrouter db upgrade`` and the start-up check."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from mailrouter.log import event
from mailrouter.store.db import Database, SchemaError

__all__ = ["current_revision", "downgrade", "ensure_schema", "head_revision", "upgrade"]

log = logging.getLogger("mailrouter.store")
MIGRATIONS = Path(__file__).with_name("migrations")


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(db: Database) -> str | None:
    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


# An arbitrary, fixed advisory-lock key ("mailrt" in ASCII): serialises schema upgrades.
_UPGRADE_LOCK = 0x6D61696C7274


def upgrade(db: Database, revision: str = "head") -> tuple[str | None, str]:
    """Bring the schema to ``revision``; returns (before, after)."""
    before = current_revision(db)
    _run(db, command.upgrade, revision)
    after = current_revision(db)
    if before != after:
        revisions: dict[str, Any] = {"from": before or "empty", "to": after}  # "from": a keyword
        event(log, "schema-upgrade", **revisions)
    return before, after or ""


def downgrade(db: Database, revision: str) -> None:
    """Take the schema back to ``revision`` (tests; operators restore a backup instead)."""
    _run(db, command.downgrade, revision)


def _run(db: Database, step: Callable[[Config, str], None], revision: str) -> None:
    """Run one Alembic command in one transaction, the way each backend needs it."""
    cfg = _config()
    with db.engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            # SQLite's way to rebuild a table (https://sqlite.org/lang_altertable.html#otheralter):
            # enforcement off while the old table is dropped and the copy renamed into its
            # place (it cannot change inside a transaction, hence before BEGIN), and every
            # reference checked before the commit instead.
            _driver_sql(conn, "PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    # Several instances may start at once on one fresh database: the first
                    # to get this lock migrates, the others wait and then find the schema at
                    # head (Alembic itself would race on CREATE TABLE).  Released with the
                    # transaction.
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK})
                cfg.attributes["connection"] = conn
                step(cfg, revision)
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise SchemaError(
                            f"schema change to {revision} would leave {len(broken)} broken "
                            f"references (first: {tuple(broken[0])}); nothing was changed"
                        )
        finally:
            if sqlite:
                _driver_sql(conn, "PRAGMA foreign_keys=ON")


def _driver_sql(conn: Connection, sql: str) -> None:
    """Run ``sql`` on the driver's connection, outside any transaction SQLAlchemy began."""
    conn.connection.driver_connection.execute(sql)  # type: ignore[union-attr]


def ensure_schema(db: Database, auto_upgrade: bool) -> None:
    """Upgrade (when allowed) or refuse clearly when the schema is not at head."""
    head, current = head_revision(), current_revision(db)
    if current == head:
        return
    if auto_upgrade:
        upgrade(db)
        return
    raise SchemaError(
        f"database schema is at {current or 'nothing (empty database)'}, this version needs "
        f"{head}: run `mailrouter db upgrade` (or set database.auto_upgrade = true)"
    )
