"""What every front end and stage shares: settings, the store, the account map, the writer,
and the metrics hooks.

A :class:`Runtime` is opened once — by the daemon, by one CLI command, by a test — and
passed in; nothing reaches for a module global.  It holds no rules: the pipeline, the
domain operations (``interactions``, ``transfer``, ``reply``) and the outbox worker take
a runtime and do their work through it.

It is also the one place the daemon's current settings live: every stage reads
``rt.settings`` and ``rt.accounts`` when it needs them (never a copy taken at start), so a
reload that calls :meth:`Runtime.swap` changes them everywhere at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from mailrouter.config import AccountSettings, Settings
from mailrouter.metrics import Metrics
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
    # The stages call these hooks where things happen; the default records nothing (and
    # costs an empty call).  The daemon opens its runtime with a PrometheusMetrics.
    metrics: Metrics = field(default_factory=Metrics)
    writes: WriteBatcher = field(init=False)

    def __post_init__(self) -> None:
        self.writes = WriteBatcher(self.db)

    @classmethod
    def open(
        cls, settings: Settings, *, upgrade: bool | None = None, metrics: Metrics | None = None
    ) -> Runtime:
        """Open the store, check (or upgrade) its schema and mirror the configured accounts.

        With ``metrics``, the stages count into it, and it reads its store gauges from here.
        """
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
        rt = cls(settings, db, accounts, metrics if metrics is not None else Metrics())
        rt.metrics.watch_store(rt)
        return rt

    def swap(self, settings: Settings, accounts: AccountMap) -> None:
        """Make ``settings`` current for every stage (a reload), with the account map that
        mirrors them (:func:`~mailrouter.store.queries.sync_accounts`, already committed).

        The map is assigned first: it only ever gains rows, so a stage on another thread
        (the writer) that already sees the new settings also finds every account in them.
        """
        self.accounts = accounts
        self.settings = settings

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
def opened(
    settings: Settings, *, upgrade: bool | None = None, metrics: Metrics | None = None
) -> Iterator[Runtime]:
    """A runtime for the length of a ``with`` block (one CLI command, one test)."""
    rt = Runtime.open(settings, upgrade=upgrade, metrics=metrics)
    try:
        yield rt
    finally:
        rt.close()
