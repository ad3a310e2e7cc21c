"""Talking to systemd: ``sd_notify`` datagrams to ``$NOTIFY_SOCKET``, and the watchdog.

Our own small client of the protocol in sd_notify(3) — one datagram of ``KEY=value``
lines to a UNIX socket (a path, or an abstract name written ``@name``) — so the daemon
needs no library for it.  Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op.

The watchdog pings come from :meth:`Notifier.keep_alive`, a task in the daemon's own event
loop: if the loop stalls, the pings stop and systemd restarts the service (``WatchdogSec=``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping

from mailrouter.log import event
from mailrouter.retry import wait_unless_stopped

__all__ = ["Notifier", "monotonic_usec", "status_text", "watchdog_interval"]

log = logging.getLogger("mailrouter.daemon")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as ``MONOTONIC_USEC=`` wants it beside ``RELOADING=1``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _address(value: str) -> str | None:
    """The socket address of ``$NOTIFY_SOCKET``; None when unset or not a UNIX socket."""
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace (Linux)
    if value.startswith("/"):
        return value
    return None  # unset, or a kind this client does not speak (vsock: in newer systemd)


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None for none.

    As sd_watchdog_enabled(3): ``WATCHDOG_PID``, when set, must name this process — a
    watchdog meant for another process (a wrapper that exec'd us, say) is not ours.
    """
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    return usec / 1_000_000 / 2


def _one_line(text: str) -> str:
    # A newline would start another assignment in the datagram.
    return " ".join(text.split())


class Notifier:
    """Sends service state to systemd; every method is a no-op outside systemd."""

    def __init__(self, env: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = (
            watchdog_interval(env, os.getpid() if pid is None else pid) if self.address else None
        )
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """One datagram of ``KEY=value`` lines; True if it was sent.

        The socket is non-blocking: if systemd does not read, a state update is dropped
        rather than stalling the event loop it is sent from.
        """
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as exc:
            if not self._warned:  # once: a broken socket would otherwise log every ping
                self._warned = True
                event(log, "sd-notify-failed", logging.WARNING, error=str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *self._status(status))

    def reloading(self, status: str = "reloading") -> bool:
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", *self._status(status))

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", *self._status(status))

    def status(self, text: str) -> bool:
        return self.send(*self._status(text))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    @staticmethod
    def _status(text: str | None) -> list[str]:
        return [f"STATUS={_one_line(text)}"] if text else []

    async def keep_alive(self, stop: asyncio.Event) -> None:
        """Ping the watchdog every half ``WATCHDOG_USEC`` until ``stop`` is set.

        Deliberately a task in the event loop, not a thread: the ping proves the loop
        still runs.  Returns at once when systemd set no watchdog for us.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        self.watchdog()
        while not await wait_unless_stopped(stop, interval):
            self.watchdog()

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


# IMAP watcher states that mean "the mailbox is being watched".
_WATCHING = frozenset({"idle", "polling", "catching-up"})


def status_text(
    phase: str,
    queue: Mapping[str, int] | None,
    imap: Mapping[str, str],
    *,
    reload_refused: bool = False,
) -> str:
    """``accepting; queue 3; failed 1; imap sales ok, support reconnect-backoff``.

    ``queue``: outbox rows by status (None: the store did not answer); ``imap``: each
    watcher's state by account.  Short, as ``systemctl status`` shows one line.
    """
    parts = [phase]
    if queue is None:
        parts.append("queue ?")
    else:
        parts.append(f"queue {queue.get('pending', 0) + queue.get('sending', 0)}")
        if queue.get("failed"):
            parts.append(f"failed {queue['failed']}")
    if imap:
        states = (f"{n} {'ok' if s in _WATCHING else s}" for n, s in sorted(imap.items()))
        parts.append("imap " + ", ".join(states))
    if reload_refused:
        parts.append("last reload refused (see log)")
    return "; ".join(parts)
