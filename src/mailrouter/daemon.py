"""The supervisor: starts every stage in one event loop, restarts a crashed one, drains on stop.

``startup() → main_loop() → shutdown()`` as in uvicorn: on SIGTERM or SIGINT the listeners
stop accepting, sessions in flight get up to ``daemon.shutdown_timeout`` seconds to finish,
the outbox worker completes the job in hand, and the process exits 0.  SIGHUP reloads the
config file (:mod:`mailrouter.reload`).  systemd hears about each step (:mod:`mailrouter.systemd`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mailrouter import reload
from mailrouter.config import Settings
from mailrouter.deliver.outbox import OutboxWorker, queue_counts
from mailrouter.ingest.smtp import Listener, return_big_buffers, start_listener
from mailrouter.ingest.watchers import WatcherSet
from mailrouter.log import event
from mailrouter.metrics import PrometheusMetrics
from mailrouter.pipeline import Pipeline
from mailrouter.retry import backoff, wait_first, wait_unless_stopped
from mailrouter.runtime import Runtime
from mailrouter.store.db import SchemaError
from mailrouter.systemd import Notifier, status_text

if TYPE_CHECKING:
    from mailrouter.http import HttpServer

__all__ = ["Daemon", "StartupError", "run"]

log = logging.getLogger("mailrouter.daemon")


class StartupError(Exception):
    """The daemon cannot start as configured (reported, exit status 2)."""


# How often the STATUS= line shown by `systemctl status` is brought up to date.
STATUS_INTERVAL = 10.0


class Daemon:
    # Seconds a stage must run before a crash counts as a new first crash (see supervise).
    stable_after = 60.0

    def __init__(self, settings: Settings, notifier: Notifier | None = None) -> None:
        self._settings = settings
        self.stop = asyncio.Event()
        self.runtime: Runtime | None = None
        # The daemon's own registry: its stages count into it, /metrics renders it.
        self.metrics = PrometheusMetrics()
        self.pipeline: Pipeline | None = None
        self.worker: OutboxWorker | None = None
        self.watchers: WatcherSet | None = None
        self.listeners: list[tuple[str, Listener]] = []
        self.http: HttpServer | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.ready = asyncio.Event()
        self.notifier = notifier or Notifier()
        # What a reload re-reads and applies besides the settings themselves; a new part
        # of the daemon (agents, say) appends its own in startup().
        self.reloaders: list[reload.Reloader] = [
            reload.templates_reloader(),
            reload.log_level_reloader(),
        ]
        self.reload_requested = asyncio.Event()
        self.reload_refused = False
        self._service_tasks: list[asyncio.Task[None]] = []
        self._service_stop = asyncio.Event()
        self._phase = "starting"
        self.started_at = datetime.now(UTC)
        self._started = time.monotonic()

    @property
    def settings(self) -> Settings:
        """The current settings: the runtime's once it is open (a reload swaps them there)."""
        return self.runtime.settings if self.runtime is not None else self._settings

    async def supervise(
        self,
        name: str,
        factory: Callable[[], Awaitable[None]],
        stop: asyncio.Event | None = None,
    ) -> None:
        """Run a stage; if it crashes, log it and restart it with capped, jittered backoff.

        ``stop`` ends one stage (an IMAP watcher a reload removes); the daemon's own
        :attr:`stop` ends them all.
        """
        stop = stop or self.stop
        crashes = 0
        while not stop.is_set() and not self.stop.is_set():
            started = asyncio.get_running_loop().time()
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - event() logs it with exc_info
                # A stage that ran well for a while before this crash starts its backoff
                # afresh: a crash a week ago must not make today's restart wait 60 s.
                if asyncio.get_running_loop().time() - started >= self.stable_after:
                    crashes = 0
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
                await wait_first(stop.wait(), self.stop.wait(), seconds=pause)
                if stop.is_set() or self.stop.is_set():
                    return

    async def startup(self) -> None:
        s = self.settings
        # Once per process, before any message: freed big buffers (DATA, its parse, store
        # and delivery; IMAP fetches too) go back to the OS instead of a growing heap.
        return_big_buffers()
        from mailrouter.notify import check_templates

        # Off the loop: a render is bounded in a child process, but may take seconds.
        problems = await asyncio.to_thread(check_templates, s)
        if problems:
            raise StartupError("notice templates: " + "; ".join(problems))
        try:
            self.runtime = await asyncio.to_thread(
                functools.partial(Runtime.open, s, metrics=self.metrics)
            )
        except SchemaError as exc:
            # auto_upgrade = false and a schema behind: the operator's step, not a crash.
            raise StartupError(str(exc)) from None
        self.pipeline = Pipeline(self.runtime)
        self.worker = OutboxWorker(
            self.runtime, name=s.instance_name or f"{socket.gethostname()}:{s.state_dir}"
        )
        worker = self.worker
        # Registering retires this name's dead predecessor and frees its claims at once,
        # before the first round (a crash must not strand work until a lease runs out).
        await self.runtime.writes.submit(worker.register_in)
        self.tasks.append(
            asyncio.create_task(self.supervise("outbox", lambda: worker.run(self.stop)))
        )
        self.tasks.append(asyncio.create_task(self.supervise("heartbeat", self._beat)))
        for name, listener, lmtp in (("smtp", s.smtp, False), ("lmtp", s.lmtp, True)):
            if listener.enabled:
                listener_ = await start_listener(self.pipeline, lmtp=lmtp, on_accepted=worker.wake)
                self.listeners.append((name, listener_))
        if s.http.enabled:
            # Imported here: a daemon without [http] never loads FastAPI.
            from mailrouter.http import create_app, start_http

            app = create_app(self.runtime, wake=worker.wake, live=self.live_state)
            self.http = await start_http(app, s.http)
        self.watchers = WatcherSet(
            self.pipeline,
            self.supervise,
            on_accepted=worker.wake,
            holder=lambda: worker.instance_id,
        )
        self.watchers.start()
        self.tasks.append(asyncio.create_task(self.watchers.run_until(self.stop)))
        watched = self.watchers.watchers
        self.reloaders += [
            reload.tls_reloader([lst for _, lst in self.listeners]),
            reload.imap_reloader(self.watchers),
        ]
        self.tasks.append(asyncio.create_task(self._reload_on_request()))
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
        self._phase = "accepting" if self.listeners else "running"
        self.notifier.ready(await self._status_for_systemd())
        self._service_tasks += [
            # Pings go on while the daemon drains: systemd's stop timeout takes over then.
            asyncio.create_task(self.notifier.keep_alive(self._service_stop)),
            asyncio.create_task(self._refresh_status()),
        ]
        self.ready.set()

    async def _beat(self) -> None:
        assert self.worker is not None
        await self.worker.beat(self.stop)

    # ------------------------------------------------------------------ reload, status

    async def reload(self) -> bool:
        """Re-read the config file and apply it (see :mod:`mailrouter.reload`); True if it
        was applied, False if refused (the running settings stay)."""
        assert self.runtime is not None, "startup() first"
        phase, self._phase = self._phase, "reloading"
        self.notifier.reloading()
        try:
            ok = await reload.reload(self.runtime, self.reloaders)
        finally:
            self._phase = phase
        self.reload_refused = not ok
        self.notifier.ready(await self._status_for_systemd())
        return ok

    async def _reload_on_request(self) -> None:
        """One reload per SIGHUP; signals that arrive during a reload cause one more."""
        while True:
            await wait_first(self.reload_requested.wait(), self.stop.wait(), seconds=None)
            if self.stop.is_set():
                return
            self.reload_requested.clear()
            await self.reload()

    def live_state(self) -> dict[str, Any]:
        """What only the running daemon knows, for ``/healthz?verbose=1`` (``"live"``):
        its phase, the addresses its listeners are bound to, each IMAP watcher's state.
        Read on the event loop, from memory: it never touches the store."""
        listening: dict[str, list[str]] = {
            name: [_address(sock.getsockname()) for sock in lst.server.sockets]
            for name, lst in self.listeners
        }
        if self.http is not None:
            listening["http"] = [_address(sock.getsockname()) for sock in self.http.sockets]
        watchers = self.watchers.watchers if self.watchers is not None else {}
        return {
            "phase": self._phase,
            "pid": os.getpid(),
            "started_at": self.started_at.isoformat(),
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            "instance": self.worker.name if self.worker is not None else None,
            "listening": listening,
            "sessions": {name: len(lst.sessions.open) for name, lst in self.listeners},
            "imap": {name: w.state for name, w in sorted(watchers.items())},
            "reload_refused": self.reload_refused,
        }

    async def status(self) -> str:
        """The one-line state for systemd's STATUS= ("accepting; queue 3; imap sales ok")."""
        counts: dict[str, int] | None = None
        if self.runtime is not None:
            db = self.runtime.db

            def count() -> dict[str, int]:
                with db.read() as session:
                    return queue_counts(session)

            try:
                counts = await asyncio.to_thread(count)
            except Exception:  # noqa: BLE001 - a status line never fails; it says "queue ?"
                counts = None
        imap = {n: w.state for n, w in (self.watchers.watchers if self.watchers else {}).items()}
        return status_text(self._phase, counts, imap, reload_refused=self.reload_refused)

    async def _status_for_systemd(self) -> str | None:
        # Outside systemd nobody reads it: no query for nothing.
        return await self.status() if self.notifier.enabled else None

    async def _refresh_status(self) -> None:
        last = None
        while self.notifier.enabled and not await wait_unless_stopped(self.stop, STATUS_INTERVAL):
            text = await self.status()
            if text != last:
                self.notifier.status(text)
                last = text

    async def shutdown(self) -> None:
        self._phase = "stopping"
        self.notifier.stopping(f"stopping; draining for up to {self.settings.shutdown_timeout:g}s")
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
        if self.worker is not None:
            try:
                await self.worker.retire()
            except Exception as exc:  # noqa: BLE001 - a store problem at stop: logged
                # Not fatal: the next start of this name retires it anyway.
                event(log, "retire-failed", logging.WARNING, exc_info=exc)
        if self.runtime is not None:
            await self.runtime.aclose()
        self._service_stop.set()
        await asyncio.gather(*self._service_tasks, return_exceptions=True)
        self.notifier.close()
        event(log, "stopped")

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        # Installed before start-up, so an early SIGHUP is a reload once ready, never the
        # default action (terminate).
        loop.add_signal_handler(signal.SIGHUP, self.reload_requested.set)
        try:
            await self.startup()
            await self.stop.wait()
        finally:
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)


def _address(sockname: Any) -> str:
    host, port = sockname[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
