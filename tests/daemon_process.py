"""A real ``mailrouter run`` subprocess, and systemd's side of its ``$NOTIFY_SOCKET``.

Every wait here is on a condition with a deadline (a log event, a datagram), never a
fixed sleep: the daemon's stderr and the notify socket are read on threads into queues.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import config_text, subprocess_env
from mailrouter.config import Settings, load
from servers import free_port

Event = dict[str, Any]


def daemon_config(tmp_path: Path, extra: str = "") -> str:
    """The helpers' three accounts, SMTP on a free port, JSON logs, a quick outbox."""
    text = config_text(tmp_path).replace(
        "[smtp]\nenabled = false\n", f"[smtp]\nport = {free_port()}\n"
    )
    return text + '\n[log]\nformat = "json"\n\n[outbox]\npoll_interval = 0.2\n' + extra


def write_config(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "mailrouter.toml"
    # Written whole and renamed, as an editor or config management would: the daemon
    # never reads half a file.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, "utf-8")
    tmp.replace(path)
    return load(path, env={})


@dataclass
class Datagram:
    at: float  # time.monotonic() when it arrived
    fields: dict[str, str]


class FakeSystemd:
    """Binds a datagram socket and collects what the daemon sends to it (sd_notify)."""

    def __init__(self, directory: Path) -> None:
        path = directory / "notify.sock"
        if len(os.fsencode(path)) >= 100:  # sun_path is 108 bytes
            path = Path(tempfile.mkdtemp(prefix="mr-notify-")) / "notify.sock"
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[Datagram] = []
        self._queue: queue.Queue[Datagram | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                self._queue.put(None)
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self._queue.put(Datagram(time.monotonic(), fields))

    def _take(self, timeout: float) -> None:
        item = self._queue.get(timeout=max(timeout, 0.001))
        if item is None:
            self._queue.put(None)
            raise queue.Empty
        self.messages.append(item)

    def wait_for(
        self, what: Callable[[Datagram], bool], within: float = 20.0, after: int = 0
    ) -> Datagram:
        """The first message from index ``after`` on that satisfies ``what``."""
        deadline = time.monotonic() + within
        while True:
            for m in self.messages[after:]:
                if what(m):
                    return m
            left = deadline - time.monotonic()
            if left <= 0:
                got = [m.fields for m in self.messages]
                pytest.fail(f"no such datagram within {within}s; got {got}")
            try:
                self._take(left)
            except queue.Empty:
                continue

    def collect(self, seconds: float) -> list[Datagram]:
        """Everything that arrives during the next ``seconds`` (a measured window)."""
        start = len(self.messages)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self._take(left)
            except queue.Empty:
                break
        return self.messages[start:]

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


class Stderr:
    """The daemon's stderr (JSON lines), read on a thread so waits can have a deadline."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            self._queue.put(line)
        self._queue.put(None)

    def _take(self, timeout: float) -> bool:
        line = self._queue.get(timeout=max(timeout, 0.001))
        if line is None:
            self._queue.put(None)
            return False
        self.lines.append(line)
        return True

    def events(self) -> list[Event]:
        # From the first "{": a line may carry journald's "<6>" in front.
        return [json.loads(line[line.index("{") :]) for line in self.lines]

    def wait_for(self, what: Callable[[Event], bool], within: float = 20.0) -> Event:
        deadline = time.monotonic() + within
        while True:
            for e in self.events():
                if what(e):
                    return e
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"not logged within {within}s; got:\n{''.join(self.lines)}")
            try:
                if not self._take(left):
                    pytest.fail(f"daemon stderr closed; got:\n{''.join(self.lines)}")
            except queue.Empty:
                continue

    def rest(self, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while self._take(deadline - time.monotonic()):
            pass


@dataclass
class Daemon:
    settings: Settings
    proc: subprocess.Popen[str]
    err: Stderr
    systemd: FakeSystemd

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        self.proc.terminate()
        code = self.proc.wait(timeout=30)
        self.err.rest()
        return code


def mailrouter_command() -> list[str]:
    exe = Path(sys.executable).parent / "mailrouter"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mailrouter"]


@contextmanager
def running_daemon(
    tmp_path: Path,
    text: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    wrap: list[str] | None = None,
    stderr: int | None = None,
) -> Iterator[Daemon]:
    """``mailrouter run`` on ``text`` (default :func:`daemon_config`), its NOTIFY_SOCKET
    bound here; waits for READY=1.  ``wrap`` prefixes the command (a shell that exec's
    it); ``stderr`` is a file descriptor to write the log to instead of a pipe we read."""
    settings = write_config(tmp_path, daemon_config(tmp_path) if text is None else text)
    systemd = FakeSystemd(tmp_path)
    full_env = {**subprocess_env(settings), "NOTIFY_SOCKET": str(systemd.path), **(env or {})}
    proc = subprocess.Popen(
        [*(wrap or []), *mailrouter_command(), "-c", str(settings.config_path), "run"],
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if stderr is None else stderr,
        text=True,
    )
    err = Stderr(proc.stderr if proc.stderr is not None else iter(()))
    d = Daemon(settings, proc, err, systemd)
    try:
        try:
            systemd.wait_for(lambda m: m.fields.get("READY") == "1")
        except pytest.fail.Exception:
            if proc.poll() is not None:
                err.rest()
            pytest.fail(f"no READY=1; exit {proc.poll()}; stderr:\n{''.join(err.lines)}")
        yield d
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()
        systemd.close()
