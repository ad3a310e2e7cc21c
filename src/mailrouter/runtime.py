"""What every front end and stage shares: settings, the store, the account map, the writer.

A :class:`Runtime` is opened once — by the daemon, by one CLI command, by a test — and
passed in; nothing reaches for a module global.  It holds no rules: the pipeline, the
domain operations (``interactions``, ``transfer``, ``reply``) and the outbox worker take
a runtime and do their work through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from mailrouter.config import AccountSettings, Settings
from mailrouter.store.db import Database, open_database
from mailrouter.store.migrate import ensure_schema
from mailrouter.store.queries import AccountMap, accounts_in_sync, sync_accounts
from mailrouter.store.writer import WriteBatcher

__all__ = ["Runtime", "opened"]


@dataclass
class Runtime:
    settings: Settings
    db: Database
    accounts: AccountMap
    writes: WriteBatcher = field(init=False)

    def __post_init__(self) -> None:
        self.writes = WriteBatcher(self.db)

    @classmethod
    def open(cls, settings: Settings, *, upgrade: bool | None = None) -> Runtime:
        """Open the store, check (or upgrade) its schema and mirror the configured accounts."""
        db = open_database(settings.database_url, busy_timeout=settings.database_busy_timeout)
        try:
            ensure_schema(db, settings.auto_upgrade if upgrade is None else upgrade)
            with db.read() as session:
                accounts = accounts_in_sync(session, settings)
            if accounts is None:
                with db.write() as session:
                    accounts = sync_accounts(session, settings)
        except BaseException:
            db.dispose()
            raise
        return cls(settings, db, accounts)

    def account_of(self, account_id: int) -> AccountSettings:
        """The configured account behind a row id."""
        return self.settings.account(self.accounts.name(account_id))

    def close(self) -> None:
        self.writes.shutdown()
        self.db.dispose()

    async def aclose(self) -> None:
        """Close from inside the event loop that used :attr:`writes`."""
        await self.writes.aclose()
        await asyncio.to_thread(self.db.dispose)


@contextmanager
def opened(settings: Settings, *, upgrade: bool | None = None) -> Iterator[Runtime]:
    """A runtime for the length of a ``with`` block (one CLI command, one test)."""
    rt = Runtime.open(settings, upgrade=upgrade)
    try:
        yield rt
    finally:
        rt.close()
