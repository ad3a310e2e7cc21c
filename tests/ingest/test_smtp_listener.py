"""The SMTP and LMTP listeners, driven by real clients (smtplib, swaks, a raw LMTP socket)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import smtplib
import socket
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from helpers import subprocess_env
from mailrouter.config import Settings, load_from_text
from mailrouter.daemon import Daemon
from mailrouter.store.models import Message

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_settings(
    tmp_path: Path,
    *,
    max_size: int = 1_000_000,
    max_connections: int = 100,
    shutdown_timeout: float = 30.0,
) -> Settings:
    text = f"""
state_dir = "{tmp_path / "state"}"
[templates]
directory = "{ROOT / "config" / "templates"}"
[smtp]
port = {_free_port()}
max_message_size = {max_size}
max_connections = {max_connections}
[lmtp]
enabled = true
port = {_free_port()}
[outbox]
poll_interval = 0.2
initial_backoff = 0.1
[daemon]
shutdown_timeout = {shutdown_timeout}
[accounts.sales]
address = "sales@example.test"
[accounts.support]
address = "support@example.test"
[accounts.billing]
address = "billing@example.test"
"""
    path = tmp_path / "mailrouter.toml"
    path.write_text(text)
    return load_from_text(text, path)


MESSAGE = b"""From: Carol Customer <carol@customer.test>
To: sales@example.test
Subject: Invoice question
Date: Sat, 28 Nov 2026 09:00:00 +0000
Message-ID: <inv-1@customer.test>

Hello, about invoice 77.
""".replace(b"\n", b"\r\n")  # on the wire, as smtplib sends bytes unchanged


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    d = Daemon(make_settings(tmp_path))
    await d.startup()
    try:
        yield d
    finally:
        d.stop.set()
        await d.shutdown()


def _send(
    port: int, rcpts: list[str], data: bytes, sender: str = "carol@customer.test"
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        return c.sendmail(sender, rcpts, data)


def _stored(settings: Settings) -> int:
    db = settings.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        (n,) = conn.execute("SELECT count(*) FROM messages").fetchone()
    conn.close()
    return int(n)


def _maildir_files(settings: Settings, account: str) -> list[Path]:
    path = settings.account(account).delivery.path
    assert path is not None
    return sorted((path / "new").glob("*")) if (path / "new").is_dir() else []


async def _wait_for(predicate: object, within: float = 3.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.05)
    return bool(predicate())  # type: ignore[operator]


async def test_smtp_250_comes_after_commit_and_mail_reaches_maildir(daemon: Daemon) -> None:
    """A 250 means the message is already in the store; the outbox then delivers it."""
    s = daemon.settings
    refused = await asyncio.to_thread(_send, s.smtp.port, ["sales@example.test"], MESSAGE)
    assert refused == {}
    assert _stored(s) == 1  # committed before the client saw 250
    assert await _wait_for(lambda: len(_maildir_files(s, "sales")) == 1)
    body = _maildir_files(s, "sales")[0].read_bytes()
    assert b"Message-ID: <inv-1@customer.test>" in body
    assert body.startswith(
        b"Return-Path: <carol@customer.test>\nDelivered-To: sales@example.test\n"
        b"X-Mailrouter-Interaction: 1\n"
    )


async def test_unknown_recipient_refused_550_never_relayed(daemon: Daemon) -> None:
    """Only configured accounts are accepted; anything else is 550 5.1.1 and not stored."""
    s = daemon.settings
    with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
        await asyncio.to_thread(_send, s.smtp.port, ["someone@elsewhere.test"], MESSAGE)
    code, text = exc.value.recipients["someone@elsewhere.test"]
    assert code == 550 and b"5.1.1" in text
    assert _stored(s) == 0


async def test_partial_recipients_accepts_accounts_and_refuses_others(daemon: Daemon) -> None:
    """A mix of an account and a stranger: the account gets it, the stranger is refused."""
    s = daemon.settings
    refused = await asyncio.to_thread(
        _send, s.smtp.port, ["sales@example.test", "x@elsewhere.test"], MESSAGE
    )
    assert list(refused) == ["x@elsewhere.test"] and refused["x@elsewhere.test"][0] == 550
    assert _stored(s) == 1


async def test_oversized_message_refused_552_5_3_4(daemon: Daemon) -> None:
    """Mail larger than smtp.max_message_size is refused with 552 5.3.4, not stored."""
    s = daemon.settings
    big = MESSAGE + (b"x" * 76 + b"\r\n") * (s.smtp.max_message_size // 77 + 10)
    # smtplib announces SIZE=, so the refusal comes at MAIL FROM already...
    with pytest.raises(smtplib.SMTPSenderRefused) as early:
        await asyncio.to_thread(_send, s.smtp.port, ["sales@example.test"], big)
    assert early.value.smtp_code == 552
    assert early.value.smtp_error == b"5.3.4 Message too big for system"

    # ...and a client that does not announce it is refused after DATA.
    def without_size() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", s.smtp.port, timeout=10) as c:
            c.ehlo()
            c.mail("carol@customer.test")
            c.rcpt("sales@example.test")
            return c.data(big)

    code, text = await asyncio.to_thread(without_size)
    assert (code, text) == (552, b"5.3.4 Message too big for system")
    assert _stored(s) == 0


async def test_store_failure_answers_451_and_retry_lands_once(daemon: Daemon) -> None:
    """A failing store answers 451 (sender keeps the mail); the retry is stored exactly once."""
    s = daemon.settings
    db = s.database_url.removeprefix("sqlite:///")
    conn = sqlite3.connect(db)
    # A real failure inside the database, not a mock: inserts into messages abort.
    conn.execute(
        "CREATE TRIGGER fail_insert BEFORE INSERT ON messages "
        "BEGIN SELECT RAISE(ABORT, 'injected store failure'); END"
    )
    conn.commit()
    try:
        with pytest.raises(smtplib.SMTPDataError) as exc:
            await asyncio.to_thread(_send, s.smtp.port, ["sales@example.test"], MESSAGE)
        assert exc.value.smtp_code == 451 and b"4.3.0" in exc.value.smtp_error
        assert _stored(s) == 0
    finally:
        conn.execute("DROP TRIGGER fail_insert")
        conn.commit()
        conn.close()
    # The MTA retries the very same message, twice even (it never saw our answer once).
    for _ in range(2):
        assert await asyncio.to_thread(_send, s.smtp.port, ["sales@example.test"], MESSAGE) == {}
    assert _stored(s) == 1
    assert await _wait_for(lambda: len(_maildir_files(s, "sales")) == 1)


async def test_swaks_delivers_through_smtp_listener(daemon: Daemon, tmp_path: Path) -> None:
    """swaks, a real SMTP client, gets its message accepted and delivered."""
    swaks = shutil.which("swaks")
    if swaks is None:
        from conftest import need

        need(False, "swaks not installed: apt-get install -y swaks")
        return
    s = daemon.settings
    eml = tmp_path / "m.eml"
    eml.write_bytes(MESSAGE)
    proc = await asyncio.create_subprocess_exec(
        swaks,
        "--server",
        "127.0.0.1",
        "--port",
        str(s.smtp.port),
        "--from",
        "carol@customer.test",
        "--to",
        "support@example.test",
        "--data",
        f"@{eml}",
        "--silent",
        "2",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode() + out.decode()
    assert _stored(s) == 1
    assert await _wait_for(lambda: len(_maildir_files(s, "support")) == 1)


async def _lmtp_session(port: int, rcpts: list[str], data: bytes) -> list[str]:
    """A deliberately raw LMTP client: returns every reply line after the final dot."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:

        async def reply() -> list[str]:
            lines = []
            while True:
                line = (await asyncio.wait_for(reader.readline(), 10)).decode().rstrip("\r\n")
                lines.append(line)
                if len(line) < 4 or line[3] != "-":
                    return lines

        assert (await reply())[-1].startswith("220")
        for cmd in [b"LHLO test.example", b"MAIL FROM:<carol@customer.test>"]:
            writer.write(cmd + b"\r\n")
            assert (await reply())[-1].startswith("250"), cmd
        for r in rcpts:
            writer.write(f"RCPT TO:<{r}>\r\n".encode())
            assert (await reply())[-1].startswith("250")
        writer.write(b"DATA\r\n")
        assert (await reply())[-1].startswith("354")
        writer.write(data + b".\r\n")
        replies = [(await reply())[-1] for _ in rcpts]
        writer.write(b"QUIT\r\n")
        await writer.drain()
        return replies
    finally:
        writer.close()
        await writer.wait_closed()


async def test_lmtp_listener_replies_once_per_recipient(daemon: Daemon) -> None:
    """RFC 2033: three accepted recipients get three replies after DATA (aiosmtpd #517)."""
    s = daemon.settings
    rcpts = ["sales@example.test", "support@example.test", "billing@example.test"]
    replies = await _lmtp_session(s.lmtp.port, rcpts, MESSAGE)
    assert len(replies) == 3 and all(r.startswith("250 2.0.0") for r in replies), replies
    assert _stored(s) == 1  # one message, addressed to three accounts
    # The interaction's owner (first account in To) receives it once; the others do not.
    assert await _wait_for(lambda: len(_maildir_files(s, "sales")) == 1)
    await asyncio.sleep(0.3)
    assert _maildir_files(s, "support") == [] and _maildir_files(s, "billing") == []


async def test_crashed_stage_is_restarted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stage that raises is logged and started again; it never silently disappears."""
    d = Daemon(make_settings(tmp_path))
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("boom")

    caplog.set_level("ERROR", logger="mailrouter.daemon")
    await asyncio.wait_for(d.supervise("flaky", flaky), 5)
    assert runs == 2
    assert any("stage-crashed stage=flaky" in r.getMessage() for r in caplog.records)


async def test_crash_backoff_starts_afresh_after_a_stage_ran_well(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five quick crashes double the pause; a crash after a stable run waits ~1 s again."""
    d = Daemon(make_settings(tmp_path))
    waits: list[float] = []

    async def no_wait(*aws: object, seconds: float) -> None:
        waits.append(seconds)
        for aw in aws:  # never awaited: close the coroutines the supervisor made
            getattr(aw, "close", lambda: None)()

    monkeypatch.setattr("mailrouter.daemon.wait_first", no_wait)
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 6:
            d.stable_after = 0.0  # from now on, every run counts as a stable one
        if runs <= 7:
            raise RuntimeError("boom")

    caplog.set_level("ERROR", logger="mailrouter.daemon")
    await asyncio.wait_for(d.supervise("flaky", flaky), 5)
    assert runs == 8
    assert waits[4] >= 8.0  # fifth quick crash: 16 s step, at least half of it
    assert waits[5] <= 1.0 and waits[6] <= 1.0  # after stable runs: the first step again


def test_run_sigterm_drains_and_exits_zero(tmp_path: Path) -> None:
    """`mailrouter run` answers SMTP, and on SIGTERM stops accepting and exits 0."""
    settings = make_settings(tmp_path)
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
        for _ in range(200):  # bounded: the ready line comes within seconds
            line = proc.stderr.readline()
            if "event=ready" in line or not line:
                break
        assert "event=ready" in line, line
        assert f"smtp=127.0.0.1:{settings.smtp.port}" in line
        assert _send(settings.smtp.port, ["sales@example.test"], MESSAGE) == {}
        proc.terminate()
        rc = proc.wait(timeout=30)
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    assert rc == 0, rest
    assert "event=stopped" in rest
    assert _stored(settings) == 1
    assert len(_maildir_files(settings, "sales")) == 1
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", settings.smtp.port), timeout=1).close()


def test_count_helper_matches_orm(tmp_path: Path) -> None:
    """The raw-SQLite counter used above agrees with the ORM (guards the helper itself)."""
    from mailrouter.pipeline import Pipeline
    from mailrouter.runtime import Runtime

    settings = make_settings(tmp_path)
    p = Pipeline(Runtime.open(settings))
    try:
        p.accept(MESSAGE, [settings.account("sales")], source="test")
        with p.db.read() as s:
            assert s.scalar(select(func.count()).select_from(Message)) == _stored(settings) == 1
    finally:
        p.rt.close()


async def test_connections_over_the_cap_get_421_and_a_freed_slot_is_reused(
    tmp_path: Path,
) -> None:
    """smtp.max_connections bounds concurrent sessions (and so memory): extra ones get 421."""
    d = Daemon(make_settings(tmp_path, max_connections=2))
    await d.startup()
    port = d.settings.smtp.port

    async def greeting() -> tuple[bytes, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return await asyncio.wait_for(reader.readline(), 5), writer

    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(2):
            line, w = await greeting()
            writers.append(w)
            assert line.startswith(b"220")
        line, w = await greeting()
        writers.append(w)
        assert line.startswith(b"421 4.3.2")
        writers[0].write(b"QUIT\r\n")
        await writers[0].drain()
        await asyncio.sleep(0.2)  # the server notices the session ended
        line, w = await greeting()
        writers.append(w)
        assert line.startswith(b"220")
    finally:
        for w in writers:
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()
        d.stop.set()
        await d.shutdown()


async def _open_session(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"220")
    for cmd in (b"HELO test", b"MAIL FROM:<carol@customer.test>", b"RCPT TO:<sales@example.test>"):
        writer.write(cmd + b"\r\n")
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"250"), cmd
    return reader, writer


async def test_shutdown_lets_a_session_in_flight_finish_with_250(tmp_path: Path) -> None:
    """SIGTERM while a client is in DATA: it still gets its 250, and the message is stored."""
    d = Daemon(make_settings(tmp_path))
    await d.startup()
    reader, writer = await _open_session(d.settings.smtp.port)
    writer.write(b"DATA\r\n")
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"354")
    writer.write(MESSAGE)  # ... and the client is still sending when the signal comes
    d.stop.set()
    stopping = asyncio.ensure_future(d.shutdown())
    await asyncio.sleep(0.2)
    assert not stopping.done()  # waits for the session
    writer.write(b".\r\n")
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"250 2.0.0")
    # ... and then no next transaction: the session is told so and closed.
    assert await asyncio.wait_for(reader.readline(), 5) == b"421 4.3.2 Service shutting down\r\n"
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    await asyncio.wait_for(stopping, 10)
    assert _stored(d.settings) == 1
    assert len(_maildir_files(d.settings, "sales")) == 1  # delivered on the way out


@pytest.mark.parametrize(
    "raw", [b"", b"no header fields, just text\r\n"], ids=["empty", "headerless"]
)
async def test_the_same_unroutable_message_twice_is_held_once_and_acknowledged_twice(
    daemon: Daemon, raw: bytes
) -> None:
    """An MTA retrying a held message gets 250, not a 451 from a unique-key clash."""
    port = daemon.settings.smtp.port
    for _ in range(2):
        refused = await asyncio.to_thread(_send, port, ["sales@example.test"], raw)
        assert refused == {}
    assert _stored(daemon.settings) == 1
    # ... and once more for a second account: recorded beside the held copy.
    refused = await asyncio.to_thread(_send, port, ["support@example.test"], raw)
    assert refused == {}
    assert _stored(daemon.settings) == 1


def _reuse_port_settings(tmp_path: Path, port: int) -> Settings:
    text = f"""
state_dir = "{tmp_path / "state"}"
[templates]
directory = "{ROOT / "config" / "templates"}"
[smtp]
port = {port}
reuse_port = true
[accounts.sales]
address = "sales@example.test"
"""
    path = tmp_path / "mailrouter.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return load_from_text(text, path)


async def test_two_listeners_with_reuse_port_share_one_port_and_both_accept(
    tmp_path: Path,
) -> None:
    """With ``reuse_port`` two daemons bind the same port; the kernel gives each sessions."""
    port = _free_port()
    settings = [_reuse_port_settings(tmp_path / name, port) for name in ("one", "two")]
    daemons = [Daemon(s) for s in settings]
    for d in daemons:
        await d.startup()  # the second bind would fail with EADDRINUSE without SO_REUSEPORT
    try:
        # Each connection comes from a new source port, which the kernel hashes to one of
        # the two sockets: 64 sessions all landing on one daemon happens with p = 2**-63.
        for k in range(64):
            data = MESSAGE.replace(b"<inv-1@", f"<reuse-{k}@".encode())
            assert await asyncio.to_thread(_send, port, ["sales@example.test"], data) == {}
            if all(_stored(s) > 0 for s in settings):
                break
        counts = [_stored(s) for s in settings]
        assert all(n > 0 for n in counts), counts
    finally:
        for d in daemons:
            d.stop.set()
            await d.shutdown()
