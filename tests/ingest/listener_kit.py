"""What the SMTP/LMTP listener tests share: a config with both listeners, a deliberately raw
line client (so a test sees every reply line as sent), store reads and a daemon subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from helpers import subprocess_env
from mailrouter.config import Settings, load_from_text
from mailrouter.daemon import Daemon
from servers import free_port

ROOT = Path(__file__).resolve().parents[2]
ENHANCED = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3} ")
TIMEOUT = 10.0  # seconds for any one reply; every wait in these tests is bounded


def listener_settings(tmp_path: Path, **listener: Any) -> Settings:
    """Three accounts, SMTP and LMTP on free loopback ports; ``listener`` keys go into both
    ``[smtp]`` and ``[lmtp]`` (``max_recipients=2``), except ``shutdown_timeout``."""
    shutdown = listener.pop("shutdown_timeout", 30.0)
    extra = "".join(f"{k} = {_toml(v)}\n" for k, v in listener.items())
    text = f"""
state_dir = "{tmp_path / "state"}"
[templates]
directory = "{ROOT / "config" / "templates"}"
[smtp]
port = {free_port()}
{extra}[lmtp]
enabled = true
port = {free_port()}
{extra}[outbox]
poll_interval = 0.2
initial_backoff = 0.1
[daemon]
shutdown_timeout = {shutdown}
[accounts.sales]
address = "sales@example.test"
[accounts.support]
address = "support@example.test"
[accounts.billing]
address = "billing@example.test"
"""
    path = tmp_path / "mailrouter.toml"
    path.write_text(text)
    return load_from_text(text, path, env={})


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int | float) else f'"{value}"'


def message(msgid: str, body: bytes = b"Hello, about invoice 77.\r\n") -> bytes:
    """A small customer message to sales@, CRLF line endings as on the wire."""
    return (
        b"From: Carol Customer <carol@customer.test>\r\n"
        b"To: sales@example.test\r\n"
        b"Subject: Invoice question\r\n"
        b"Message-ID: <" + msgid.encode() + b">\r\n\r\n" + body
    )


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Daemon]:
    """The daemon's stages in this event loop, stopped (drained) on the way out unless the
    test stopped it itself (``d.stop.set(); await d.shutdown()``)."""
    d = Daemon(settings)
    await d.startup()
    try:
        yield d
    finally:
        if not d.stop.is_set():
            d.stop.set()
            await d.shutdown()


class Raw:
    """A raw SMTP/LMTP client: writes lines as given, returns replies as lists of lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.greeting: list[str] = []

    @classmethod
    async def open(cls, port: int, *, source: str | None = None) -> Raw:
        local = (source, 0) if source else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=local), TIMEOUT
        )
        raw = cls(reader, writer)
        raw.greeting = await raw.reply()
        return raw

    async def reply(self) -> list[str]:
        """One reply, all its lines; ``["<EOF>"]`` if the server closed instead."""
        lines: list[str] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), TIMEOUT)
            if not line:
                return [*lines, "<EOF>"]
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return lines

    def send(self, data: bytes | str) -> None:
        self.writer.write(data.encode() + b"\r\n" if isinstance(data, str) else data)

    async def cmd(self, line: str) -> str:
        """Send one command line; the last line of its reply."""
        self.send(line)
        return (await self.reply())[-1]

    async def closed(self) -> bool:
        """Whether the server hangs up (EOF) within the timeout, with nothing more said."""
        with contextlib.suppress(ConnectionError):
            return await asyncio.wait_for(self.reader.read(), TIMEOUT) == b""
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def raw_session(port: int, *, source: str | None = None) -> AsyncIterator[Raw]:
    raw = await Raw.open(port, source=source)
    try:
        yield raw
    finally:
        await raw.close()


def stored(settings: Settings) -> list[tuple[str, bytes]]:
    """(Message-ID, raw bytes) of every stored message, in arrival order."""
    db = settings.database_url.removeprefix("sqlite:///")
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT message_id, raw FROM messages ORDER BY id").fetchall()
    finally:
        conn.close()
    return [(str(m), bytes(r)) for m, r in rows]


@contextlib.contextmanager
def daemon_process(settings: Settings) -> Iterator[subprocess.Popen[str]]:
    """``mailrouter run`` on ``settings`` as its own process, up and ready; killed on the
    way out if it is still running."""
    exe = ROOT / ".venv" / "bin" / "mailrouter"
    cmd = [str(exe)] if exe.exists() else ["python", "-m", "mailrouter"]
    proc = subprocess.Popen(
        [*cmd, "-c", str(settings.config_path), "run"],
        env=subprocess_env(settings),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = ""
        for _ in range(200):  # bounded: the ready line comes within seconds
            line = proc.stderr.readline()
            if "event=ready" in line or not line:
                break
        assert "event=ready" in line, line
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def read_until(proc: subprocess.Popen[str], marker: str) -> str:
    """Read the daemon's stderr until a line containing ``marker`` (bounded)."""
    assert proc.stderr is not None
    for _ in range(500):
        line = proc.stderr.readline()
        if marker in line:
            return line
        if not line:
            break
    raise AssertionError(f"no {marker!r} in the daemon's log")
