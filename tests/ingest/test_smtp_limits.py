"""The listener's limits, and what happens to long lines — with real clients."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

import pytest
from listener_kit import listener_settings, message, running, stored


def _sendmail(port: int, rcpts: list[str], data: bytes) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        return c.sendmail("carol@customer.test", rcpts, data)


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
