"""The listener's abuse limits: connections per client, idle timeout, recipients per
message, refusals per session, and what happens to long lines — with real clients."""

from __future__ import annotations

import asyncio
import smtplib
import time
from pathlib import Path

import pytest
from listener_kit import Raw, listener_settings, message, raw_session, running, stored


async def test_one_client_over_its_connection_limit_gets_421_others_are_still_served(
    tmp_path: Path,
) -> None:
    """max_connections_per_client: a third session from 127.0.0.1 gets 421 4.7.0, while
    another client (127.0.0.2) is served, and a freed slot is reused."""
    s = listener_settings(tmp_path, max_connections_per_client=2)
    async with running(s):
        first, second = await Raw.open(s.smtp.port), await Raw.open(s.smtp.port)
        try:
            assert first.greeting[0].startswith("220") and second.greeting[0].startswith("220")
            async with raw_session(s.smtp.port) as third:
                assert third.greeting == ["421 4.7.0 Error: too many connections from your address"]
                assert await third.closed()
            async with raw_session(s.smtp.port, source="127.0.0.2") as other:
                assert other.greeting[0].startswith("220")
            assert await first.cmd("QUIT") == "221 2.0.0 Bye"
            await asyncio.sleep(0.2)  # the server sees the session end
            async with raw_session(s.smtp.port) as again:
                assert again.greeting[0].startswith("220")
        finally:
            await first.close()
            await second.close()


async def test_idle_session_is_closed_with_421_after_idle_timeout(tmp_path: Path) -> None:
    """A client that says nothing for idle_timeout seconds is told 421 4.4.2 and closed."""
    s = listener_settings(tmp_path, idle_timeout=0.5)
    async with running(s), raw_session(s.smtp.port) as quiet:
        started = time.monotonic()
        assert await quiet.reply() == ["421 4.4.2 Error: timeout exceeded"]
        assert await quiet.closed()
        assert 0.4 < time.monotonic() - started < 5


async def test_data_still_flowing_is_not_cut_by_the_idle_timeout(tmp_path: Path) -> None:
    """A slow sender whose DATA takes longer than idle_timeout, but never pauses that
    long, gets its 250 (aiosmtpd re-arms its timer only on commands)."""
    s = listener_settings(tmp_path, idle_timeout=0.6)
    async with running(s), raw_session(s.smtp.port) as slow:
        for line in ("HELO mta.example.test", "MAIL FROM:<carol@customer.test>"):
            assert (await slow.cmd(line)).startswith("250")
        assert (await slow.cmd("RCPT TO:<sales@example.test>")).startswith("250")
        assert (await slow.cmd("DATA")).startswith("354")
        slow.send(message("slow@customer.test", b""))
        for i in range(8):  # 8 x 0.25 s: three times the idle timeout in all
            await asyncio.sleep(0.25)
            slow.send(f"line {i}\r\n".encode())
        slow.send(b".\r\n")
        assert (await slow.reply())[-1].startswith("250 2.0.0")
    assert [m for m, _ in stored(s)] == ["slow@customer.test"]


def _sendmail(port: int, rcpts: list[str], data: bytes) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        return c.sendmail("carol@customer.test", rcpts, data)


async def test_recipients_over_max_recipients_get_452_4_5_3(tmp_path: Path) -> None:
    """max_recipients: the third RCPT gets 452 4.5.3 (the sender retries it later); the
    message is accepted for the first two."""
    s = listener_settings(tmp_path, max_recipients=2)
    rcpts = ["sales@example.test", "support@example.test", "billing@example.test"]
    async with running(s):
        refused = await asyncio.to_thread(_sendmail, s.smtp.port, rcpts, message("m@c.test"))
    assert refused == {"billing@example.test": (452, b"4.5.3 Error: too many recipients")}
    assert [m for m, _ in stored(s)] == ["m@c.test"]


async def test_error_flood_is_disconnected_with_421_after_hard_error_limit(
    tmp_path: Path,
) -> None:
    """hard_error_limit = 5: the fifth refusal in a session is followed by 421 4.7.0 and
    the server hangs up; a well-behaved session is never counted against."""
    s = listener_settings(tmp_path, hard_error_limit=5)
    async with running(s), raw_session(s.smtp.port) as prober:
        assert (await prober.cmd("EHLO prober.test")).startswith("250")
        assert (await prober.cmd("MAIL FROM:<x@prober.test>")).startswith("250 2.1.0")
        for i in range(4):
            assert (await prober.cmd(f"RCPT TO:<user{i}@elsewhere.test>")).startswith("550 5.1.1")
        prober.send("RCPT TO:<user4@elsewhere.test>")
        assert (await prober.reply())[-1].startswith("550 5.1.1")
        assert await prober.reply() == ["421 4.7.0 Error: too many errors"]
        assert await prober.closed()


@pytest.mark.parametrize("length", [1001, 5000, 200_000])
async def test_line_over_1000_bytes_is_accepted_and_stored_as_is(
    tmp_path: Path, length: int
) -> None:
    """RFC 5321 allows 1000 bytes a line, but senders send more: such a message is accepted
    (250) and stored byte for byte, not bounced with a permanent 500."""
    s = listener_settings(tmp_path)
    long_line = b"<p>" + b"x" * (length - 7) + b"</p>\r\n"
    # One starts with a dot: smtplib sends it doubled, and it must come back single.
    data = message("long@customer.test", b"Hi\r\n" + long_line + b"." + long_line + b"bye\r\n")
    async with running(s):
        assert await asyncio.to_thread(_sendmail, s.smtp.port, ["sales@example.test"], data) == {}
    [(msgid, raw)] = stored(s)
    assert msgid == "long@customer.test"
    assert raw == data
