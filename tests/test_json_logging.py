"""`mailrouter run` with ``[log] format = "json"``: every stderr line is one JSON event.

A real daemon subprocess, driven by smtplib from start to stop: the schema upgrade, the
ready line, an accepted message, a refused recipient, a line from aiosmtpd's own logger,
the delivery into the Maildir, and the drain after SIGTERM.
"""

from __future__ import annotations

import json
import queue
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import config_text, maildir_messages, subprocess_env
from mailrouter.config import Settings, load

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = (
    b"From: Carol Customer <carol@customer.test>\r\n"
    b"To: sales@example.test\r\n"
    b"Subject: Invoice question\r\n"
    b"Message-ID: <json-1@customer.test>\r\n"
    b"\r\n"
    b"Hello, about invoice 77.\r\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _settings(tmp_path: Path) -> Settings:
    text = config_text(tmp_path).replace(
        "[smtp]\nenabled = false\n", f"[smtp]\nport = {_free_port()}\n"
    )
    text += '\n[log]\nformat = "json"\n\n[outbox]\npoll_interval = 0.2\n'
    path = tmp_path / "mailrouter.toml"
    path.write_text(text, "utf-8")
    return load(path, env={})


class Stderr:
    """The daemon's stderr, read line by line on a thread so waits can have a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        self._stream = proc.stderr
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stream:
            self._queue.put(line)
        self._queue.put(None)

    def _take(self, timeout: float) -> bool:
        """Move one line (or EOF) into ``lines``; False on EOF."""
        line = self._queue.get(timeout=timeout)
        if line is None:
            self._queue.put(None)  # EOF stays EOF for later callers
            return False
        self.lines.append(line)
        return True

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    def wait_for(self, what: Callable[[dict[str, Any]], bool], within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while not any(what(e) for e in self.events()):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"not logged within {within}s; got:\n{''.join(self.lines)}")
            try:
                if not self._take(left):
                    pytest.fail(f"daemon stderr closed; got:\n{''.join(self.lines)}")
            except queue.Empty:
                continue

    def rest(self, within: float = 10.0) -> None:
        """Everything up to EOF (the process has exited)."""
        deadline = time.monotonic() + within
        while self._take(max(0.01, deadline - time.monotonic())):
            pass
        self._thread.join(timeout=within)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Settings, subprocess.Popen[str], Stderr]]:
    settings = _settings(tmp_path)
    exe = Path(sys.executable).parent / "mailrouter"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mailrouter"]
    proc = subprocess.Popen(
        [*cmd, "-c", str(settings.config_path), "run"],
        env=subprocess_env(settings),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield settings, proc, Stderr(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


def _wait_until(predicate: Callable[[], bool], within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_json_log_is_one_object_per_line_from_start_to_stop(
    daemon: tuple[Settings, subprocess.Popen[str], Stderr],
) -> None:
    """start, 250, 550, delivery, SIGTERM: each stderr line is a JSON object with an event."""
    settings, proc, err = daemon
    err.wait_for(lambda e: e["event"] == "ready")

    with smtplib.SMTP("127.0.0.1", settings.smtp.port, timeout=10) as client:
        # aiosmtpd itself logs an unknown command (mail.log, WARNING): a foreign record.
        assert client.docmd("XYZZY")[0] == 500
        assert client.sendmail("carol@customer.test", ["sales@example.test"], MESSAGE) == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("carol@customer.test", ["nobody@elsewhere.test"], MESSAGE)
    assert refused.value.recipients["nobody@elsewhere.test"][0] == 550

    assert _wait_until(lambda: len(maildir_messages(settings, "sales")) == 1)
    err.wait_for(lambda e: e["event"] == "outbox" and e["status"] == "sent")
    err.wait_for(lambda e: e["event"] == "reject")
    err.wait_for(lambda e: e["logger"] == "mail.log")

    proc.terminate()
    assert proc.wait(timeout=30) == 0
    err.rest()

    assert err.lines, "the daemon wrote nothing"
    for line in err.lines:
        obj = json.loads(line)  # every line, not only the ones we looked for
        assert isinstance(obj, dict) and isinstance(obj.get("event"), str), line
        assert {"ts", "level", "logger"} <= obj.keys(), line
    events = err.events()
    names = [e["event"] for e in events]
    assert names[0] == "schema-upgrade" and names[-2:] == ["stopping", "stopped"], names

    [ready] = [e for e in events if e["event"] == "ready"]
    assert ready["listening"] == f"smtp=127.0.0.1:{settings.smtp.port}"
    assert (ready["accounts"], ready["database"]) == (3, "sqlite")
    [decision] = [e for e in events if e["event"] == "decision"]
    assert (
        decision["msgid"],
        decision["account"],
        decision["action"],
        decision["interaction"],
    ) == (
        "<json-1@customer.test>",
        "sales@example.test",
        "deliver",
        1,
    )
    [reject] = [e for e in events if e["event"] == "reject"]
    assert (reject["rcpt"], reject["code"], reject["proto"]) == (
        "nobody@elsewhere.test",
        550,
        "smtp",
    )
    [foreign] = [e for e in events if e["logger"] == "mail.log"]
    assert foreign["event"] == "log" and "unrecognised: XYZZY" in foreign["message"]
    assert not [e for e in events if "exc" in e or e["level"] in ("error", "critical")]
