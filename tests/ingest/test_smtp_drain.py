"""Stop accepting means stop accepting: after SIGTERM no new transaction is taken on any
session, while one already in DATA completes with its 250."""

from __future__ import annotations

import asyncio
import signal
import smtplib
import time
from pathlib import Path

from listener_kit import (
    daemon_process,
    listener_settings,
    message,
    raw_session,
    read_until,
    running,
    stored,
)

SHUTTING_DOWN = "421 4.3.2 Service shutting down"


async def test_after_sigterm_new_transactions_get_421_and_data_in_flight_gets_its_250(
    tmp_path: Path,
) -> None:
    """SIGTERM: MAIL on an open SMTP session and on an open LMTP session, and RCPT on an
    LMTP transaction begun before the signal, get 421 4.3.2 and are closed; an LMTP
    transaction in DATA completes (250 per recipient, stored); the daemon exits 0."""
    s = listener_settings(tmp_path)
    with daemon_process(s) as proc:
        lmtp, smtp = s.lmtp.port, s.smtp.port
        async with (
            raw_session(lmtp) as kept,  # an LMTP connection the MTA keeps open
            raw_session(lmtp) as begun,  # a transaction begun, no recipient yet
            raw_session(lmtp) as in_data,  # a transaction in DATA
            raw_session(smtp) as smtp_kept,
        ):
            for session in (kept, begun, in_data):
                assert (await session.cmd("LHLO mta.example.test")).startswith("250 ")
            assert (await kept.cmd("MAIL FROM:<a@customer.test>")).startswith("250 2.1.0")
            assert (await kept.cmd("RCPT TO:<sales@example.test>")).startswith("250 2.1.5")
            assert (await kept.cmd("DATA")).startswith("354")
            kept.send(message("before@customer.test") + b".\r\n")
            assert (await kept.reply())[-1].startswith("250 2.0.0")
            assert (await begun.cmd("MAIL FROM:<b@customer.test>")).startswith("250 2.1.0")
            assert (await in_data.cmd("MAIL FROM:<c@customer.test>")).startswith("250")
            for rcpt in ("sales@example.test", "support@example.test"):
                assert (await in_data.cmd(f"RCPT TO:<{rcpt}>")).startswith("250 2.1.5")
            assert (await in_data.cmd("DATA")).startswith("354")
            in_data.send(message("in-flight@customer.test"))  # ... still sending
            assert (await smtp_kept.cmd("EHLO mta.example.test")).startswith("250 ")
            await in_data.writer.drain()
            await asyncio.sleep(0.2)  # the daemon has read the start of the message

            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.to_thread(read_until, proc, "event=stopping"), 10)

            assert await kept.cmd("MAIL FROM:<d@customer.test>") == SHUTTING_DOWN
            assert await kept.closed()
            assert await begun.cmd("RCPT TO:<sales@example.test>") == SHUTTING_DOWN
            assert await begun.closed()
            assert await smtp_kept.cmd("MAIL FROM:<e@customer.test>") == SHUTTING_DOWN
            assert await smtp_kept.closed()

            in_data.send(b"More of it.\r\n.\r\n")
            replies = [(await in_data.reply())[-1] for _ in range(2)]
            assert all(r.startswith("250 2.0.0") for r in replies), replies
            # ... and then it is told, and closed: no transaction after that one.
            assert (await in_data.reply()) == [SHUTTING_DOWN]
            assert await in_data.closed()
        assert await asyncio.to_thread(proc.wait, 30) == 0
    assert [m for m, _ in stored(s)] == ["before@customer.test", "in-flight@customer.test"]


async def test_shutdown_tells_idle_sessions_421_at_once_instead_of_waiting(
    tmp_path: Path,
) -> None:
    """Sessions between transactions (idle, or with MAIL and RCPT given) get 421 4.3.2 the
    moment the drain starts: the daemon does not wait shutdown_timeout for them."""
    s = listener_settings(tmp_path, shutdown_timeout=20.0)
    async with (
        running(s) as d,
        raw_session(s.smtp.port) as idle,
        raw_session(s.smtp.port) as mid,
    ):
        assert (await mid.cmd("HELO mta.example.test")).startswith("250")
        assert (await mid.cmd("MAIL FROM:<a@customer.test>")).startswith("250")
        assert (await mid.cmd("RCPT TO:<sales@example.test>")).startswith("250")
        started = time.monotonic()
        d.stop.set()
        stopping = asyncio.ensure_future(d.shutdown())
        assert await idle.reply() == [SHUTTING_DOWN]
        assert await mid.reply() == [SHUTTING_DOWN]
        assert await idle.closed() and await mid.closed()
        await asyncio.wait_for(stopping, 10)
        assert time.monotonic() - started < 5  # not the 20 s drain bound
    assert stored(s) == []


async def test_shutdown_hangs_up_on_a_session_stuck_in_data_past_the_timeout(
    tmp_path: Path,
) -> None:
    """A client that never finishes its DATA is disconnected after daemon.shutdown_timeout;
    nothing it sent was acknowledged, so nothing is stored and its MTA retries."""
    s = listener_settings(tmp_path, shutdown_timeout=0.5)
    async with running(s) as d, raw_session(s.smtp.port) as stuck:
        for line in ("HELO mta.example.test", "MAIL FROM:<a@customer.test>"):
            assert (await stuck.cmd(line)).startswith("250")
        assert (await stuck.cmd("RCPT TO:<sales@example.test>")).startswith("250")
        assert (await stuck.cmd("DATA")).startswith("354")
        stuck.send(message("never-finished@customer.test"))
        d.stop.set()
        await asyncio.wait_for(d.shutdown(), 10)
        assert await stuck.closed()
    assert stored(s) == []


def test_smtplib_sender_sees_421_after_shutdown_began(tmp_path: Path) -> None:
    """smtplib, a real client, on a session opened before SIGTERM: its sendmail fails with
    421 4.3.2 (a temporary failure: the mail stays with the sender), nothing stored."""
    s = listener_settings(tmp_path)
    with daemon_process(s) as proc, smtplib.SMTP("127.0.0.1", s.smtp.port, timeout=10) as c:
        c.ehlo()
        proc.send_signal(signal.SIGTERM)
        read_until(proc, "event=stopping")
        try:
            c.sendmail("carol@customer.test", ["sales@example.test"], message("late@x.test"))
        except smtplib.SMTPSenderRefused as exc:
            assert exc.smtp_code == 421 and exc.smtp_error == b"4.3.2 Service shutting down"
        except smtplib.SMTPServerDisconnected:
            raise AssertionError("closed without telling the client 421") from None
        else:
            raise AssertionError("accepted after SIGTERM")
        assert proc.wait(30) == 0
    assert stored(s) == []
