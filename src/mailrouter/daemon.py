"""The supervisor: starts every stage in one event loop, restarts a crashed one, drains on stop.

``startup() → main_loop() → shutdown()`` as in uvicorn: on SIGTERM or SIGINT the listeners
stop accepting, sessions in flight get up to ``daemon.shutdown_timeout`` seconds to finish,
the outbox worker completes the job in hand, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from mailrouter.config import Settings
from mailrouter.deliver.outbox import OutboxWorker
from mailrouter.ingest.smtp import Listener, start_listener
from mailrouter.log import event
from mailrouter.pipeline import Pipeline
from mailrouter.retry import backoff, wait_unless_stopped
from mailrouter.runtime import Runtime

if TYPE_CHECKING:
    from mailrouter.http import HttpServer

__all__ = ["Daemon", "StartupError", "run"]

log = logging.getLogger("mailrouter.daemon")


class StartupError(Exception):
    """The daemon cannot start as configured (reported, exit status 2)."""


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about readiness; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), addr)


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = asyncio.Event()
        self.runtime: Runtime | None = None
        self.pipeline: Pipeline | None = None
        self.worker: OutboxWorker | None = None
        self.listeners: list[tuple[str, Listener]] = []
        self.http: HttpServer | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.ready = asyncio.Event()

    async def supervise(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        """Run a stage; if it crashes, log it and restart it with capped, jittered backoff."""
        crashes = 0
        while not self.stop.is_set():
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - event() logs it with exc_info
                crashes += 1
                pause = backoff(crashes, 1.0, 60.0)
                event(
                    log,
                    "stage-crashed",
                    logging.ERROR,
                    exc_info=True,
                    stage=name,
                    restart_in=round(pause, 1),
                )
                if await wait_unless_stopped(self.stop, pause):
                    return

    async def startup(self) -> None:
        s = self.settings
        from mailrouter.notify import check_templates

        problems = check_templates(s)
        if problems:
            raise StartupError("notice templates: " + "; ".join(problems))
        self.runtime = await asyncio.to_thread(Runtime.open, s)
        self.pipeline = Pipeline(self.runtime)
        self.worker = OutboxWorker(self.runtime)
        worker = self.worker
        self.tasks.append(
            asyncio.create_task(self.supervise("outbox", lambda: worker.run(self.stop)))
        )
        for name, listener, lmtp in (("smtp", s.smtp, False), ("lmtp", s.lmtp, True)):
            if listener.enabled:
                listener_ = await start_listener(
                    self.pipeline, listener, lmtp=lmtp, on_accepted=worker.wake
                )
                self.listeners.append((name, listener_))
        if s.http.enabled:
            # Imported here: a daemon without [http] never loads FastAPI.
            from mailrouter.http import create_app, start_http

            self.http = await start_http(create_app(self.runtime, wake=worker.wake), s.http)
        watched = [a for a in s.accounts if a.imap is not None]
        if watched:
            from mailrouter.ingest.imap import ImapWatcher

            for acc in watched:
                watcher = ImapWatcher(self.pipeline, acc, on_accepted=worker.wake)
                run_watcher = functools.partial(watcher.run, self.stop)
                self.tasks.append(
                    asyncio.create_task(self.supervise(f"imap:{acc.name}", run_watcher))
                )
        listening = " ".join(
            f"{n}={sock.getsockname()[0]}:{sock.getsockname()[1]}"
            for n, lst in self.listeners
            for sock in lst.server.sockets[:1]
        )
        if self.http is not None:
            listening = f"{listening} http={self.http.address}".strip()
        event(
            log,
            "ready",
            listening=listening or "none",
            accounts=len(s.accounts),
            imap_watchers=len(watched),
            database=s.database_url.split(":", 1)[0],
            state_dir=str(s.state_dir),
        )
        sd_notify("READY=1")
        self.ready.set()

    async def shutdown(self) -> None:
        sd_notify("STOPPING=1")
        event(log, "stopping", timeout=self.settings.shutdown_timeout)
        self.stop.set()
        # Stop accepting; sessions in flight finish (a 250 still needs its commit, so the
        # writer stays up until they are done).
        drains = [lst.drain() for _, lst in self.listeners]
        if self.http is not None:
            drains.append(self.http.drain())  # requests in flight get their answer
        try:
            async with asyncio.timeout(self.settings.shutdown_timeout):
                await asyncio.gather(*drains, *self.tasks, return_exceptions=True)
                # Mail accepted just before the signal is already safe in the outbox; one
                # last bounded pass delivers what is due so a restart finds nothing waiting.
                if self.worker is not None:
                    await self.worker.run_once(max_rounds=10)
        except TimeoutError:
            pending = sum(not t.done() for t in self.tasks)
            event(log, "drain-timeout", logging.WARNING, pending=pending)
        for _, lst in self.listeners:
            lst.abort()
        if self.http is not None:
            self.http.abort()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.runtime is not None:
            await self.runtime.aclose()
        event(log, "stopped")

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        try:
            await self.startup()
            await self.stop.wait()
        finally:
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


def _log_unraisable(args: sys.UnraisableHookArgs) -> None:
    # Python would print "Exception ignored in: …" and a traceback straight to stderr.
    what = args.err_msg or "Exception ignored in"
    event(log, "unraisable", logging.ERROR, exc_info=args.exc_value, error=what, where=args.object)


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean stop.

    Everything the process would otherwise print on its own — an exception that escapes
    the loop, an exception ignored in a finaliser — goes through the log as well, so a
    JSON log stays one object per line from start to stop.
    """
    previous, sys.unraisablehook = sys.unraisablehook, _log_unraisable
    try:
        asyncio.run(Daemon(settings).serve())
    except (StartupError, OSError):
        raise  # the command line reports these as "cannot start"
    except Exception:  # noqa: BLE001 - event() logs it with exc_info
        event(log, "crashed", logging.CRITICAL, exc_info=True)
        return 1
    finally:
        sys.unraisablehook = previous
    return 0
