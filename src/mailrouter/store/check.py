"""``check-config``'s look at the database: does ``database.url`` open, without changing it.

A config can be valid and still name a database that cannot be reached (a wrong port, a
missing role, a directory the service user cannot write).  This connects once with a short
timeout and runs ``SELECT 1``; an SQLite file that does not exist yet is not created — the
nearest existing directory above it must be writable instead, since the daemon creates it.
Errors never show a password: the URL is masked as ``check-config`` prints it.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from mailrouter.config import Settings
from mailrouter.config.settings import mask_url

__all__ = ["check_database"]

CONNECT_TIMEOUT = 5  # seconds: check-config must answer promptly, not hang on a firewall


def check_database(settings: Settings) -> list[str]:
    """Problems with ``database.url`` (empty when it opens), each naming the key."""
    shown = mask_url(settings.database_url)
    try:
        url = make_url(settings.database_url)
    except ArgumentError as exc:
        return [f"database.url: {shown}: not a database URL ({exc})"]
    if url.get_backend_name() == "sqlite":
        return _check_sqlite(url.database, shown)
    connect_args = (
        {"connect_timeout": CONNECT_TIMEOUT} if url.get_backend_name() == "postgresql" else {}
    )
    try:
        engine = create_engine(url, connect_args=connect_args)
    except (ArgumentError, ImportError) as exc:
        return [f"database.url: {shown}: {exc}"]
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return [f"database.url: cannot connect to {shown}: {reason}"]
    finally:
        engine.dispose()
    return []


def _check_sqlite(database: str | None, shown: str) -> list[str]:
    if not database or database == ":memory:":
        return []
    path = Path(database)
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            return [f"database.url: {path}: not readable and writable by this user"]
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=CONNECT_TIMEOUT)
            try:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            return [f"database.url: {path}: cannot open as SQLite: {exc}"]
        return []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return [f"database.url: {shown}: {parent} is not a directory"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"database.url: {path} does not exist and {parent} is not writable by this user"]
    return []
