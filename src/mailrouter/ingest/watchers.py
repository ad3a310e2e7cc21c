"""The daemon's IMAP watchers: one per account with an ``[accounts.NAME.imap]`` table.

A reload calls :meth:`WatcherSet.sync`: the watcher of an account whose ``imap`` table was
removed (or whose account was) stops, one whose table changed is restarted with the new
settings (a session belongs to one server and one login), a new one starts; the others
keep their sessions.  Stopping is graceful (LOGOUT after the message in hand), bounded by
a timeout after which the watcher is cancelled: it acknowledges nothing before its
commit, so a cancelled watcher only means a message read again by its successor.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from mailrouter.config import AccountSettings, ImapWatchSettings, Settings
from mailrouter.ingest.imap import ImapWatcher
from mailrouter.log import event
from mailrouter.pipeline import Pipeline

__all__ = ["Supervise", "WatcherSet"]

log = logging.getLogger("mailrouter.ingest.imap")

# The daemon's supervisor: run a stage under a name, restarting it on a crash, until stop.
Supervise = Callable[[str, Callable[[], Awaitable[None]], asyncio.Event], Coroutine[Any, Any, None]]


@dataclass
class _Running:
    watcher: ImapWatcher
    cfg: ImapWatchSettings
    stop: asyncio.Event
    task: asyncio.Task[None]


class WatcherSet:
    def __init__(
        self,
        pipeline: Pipeline,
        supervise: Supervise,
        *,
        on_accepted: Callable[[], None] | None = None,
        holder: Callable[[], str | None] | None = None,
    ) -> None:
        self.p = pipeline
        self.supervise = supervise
        self.on_accepted = on_accepted
        # The instance the watchers work for: each mailbox is watched only while it holds
        # the mailbox's lease (exactly one watcher among instances sharing a store).
        self.holder = holder
        self.running: dict[str, _Running] = {}

    @property
    def watchers(self) -> dict[str, ImapWatcher]:
        """The running watchers by account name (for status and health)."""
        return {name: r.watcher for name, r in self.running.items()}

    def start(self) -> None:
        """Start a watcher for every watched account of the current settings."""
        for acc in self.p.settings.accounts:
            if acc.imap is not None and acc.name not in self.running:
                self._start(acc)

    async def run_until(self, stop: asyncio.Event) -> None:
        """Wait for ``stop``, then stop every watcher (cancelled if this task is)."""
        try:
            await stop.wait()
            await self._stop(list(self.running), grace=None)
        finally:
            await self._stop(list(self.running), grace=0)

    async def sync(self, settings: Settings, grace: float) -> None:
        """Make the running watchers match ``settings`` (after a reload swapped them in)."""
        wanted = {a.name: a for a in settings.accounts if a.imap is not None}
        changed = [n for n, r in self.running.items() if n in wanted and wanted[n].imap != r.cfg]
        removed = [n for n in self.running if n not in wanted]
        for name in removed:
            event(log, "imap-watcher-removed", account=name)
        for name in changed:
            event(log, "imap-watcher-restart", account=name, reason="imap settings changed")
        await self._stop([*removed, *changed], grace)
        for name, acc in wanted.items():
            if name not in self.running:
                self._start(acc)

    def _start(self, account: AccountSettings) -> None:
        assert account.imap is not None
        watcher = ImapWatcher(self.p, account, on_accepted=self.on_accepted, holder=self.holder)
        stop = asyncio.Event()
        task = asyncio.create_task(
            self.supervise(f"imap:{account.name}", functools.partial(watcher.run, stop), stop),
            name=f"imap:{account.name}",
        )
        self.running[account.name] = _Running(watcher, account.imap, stop, task)

    async def _stop(self, names: Iterable[str], grace: float | None) -> None:
        """Ask the watchers ``names`` to stop; cancel those still running after ``grace`` seconds
        (None: wait as long as it takes)."""
        stopping = [self.running.pop(n) for n in names if n in self.running]
        if not stopping:
            return
        for r in stopping:
            r.stop.set()
        tasks = [r.task for r in stopping]
        try:
            if grace is None or grace > 0:
                await asyncio.wait(tasks, timeout=grace)
        finally:
            # Also when we are cancelled meanwhile (the daemon's drain timeout): no
            # watcher outlives the set that started it.
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
