"""What held up in the hostile probe, kept tested: no open relay (with swaks, in the address
forms relays get fooled by) and no SMTP smuggling (raw sockets, all six end-of-data tricks)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from listener_kit import ENHANCED, listener_settings, message, raw_session, running, stored

from conftest import need
from mailrouter.config import Settings


@pytest.fixture
async def settings(tmp_path: Path) -> AsyncIterator[Settings]:
    s = listener_settings(tmp_path)
    async with running(s):
        yield s


async def _swaks(port: int, to: str, *extra: str) -> tuple[int, str]:
    """Run swaks to ``to``; (exit status, its transcript)."""
    swaks = shutil.which("swaks")
    need(swaks is not None, "swaks not installed: apt-get install -y swaks")
    assert swaks is not None
    proc = await asyncio.create_subprocess_exec(
        swaks,
        *("--server", "127.0.0.1", "--port", str(port), "--from", "carol@customer.test"),
        *("--to", to, "--h-To", "sales@example.test", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace")


def _rcpt_reply(transcript: str) -> str:
    """The server's reply to the (one) RCPT in a swaks transcript."""
    lines = transcript.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(" -> RCPT TO:"))
    return next(line[4:] for line in lines[at + 1 :] if line.startswith(("<- ", "<**")))


# Addresses an open relay would pass on.  None is a configured account, whatever part of
# it looks like one; each must be refused at RCPT with a 5xx and an enhanced code.
NOT_OURS = [
    "victim@elsewhere.test",
    "VICTIM@ELSEWHERE.TEST",  # odd case
    "sales@EXAMPLE.TEST.elsewhere.test",
    "@example.test:victim@elsewhere.test",  # source route (RFC 5321 Appendix C)
    "victim%elsewhere.test@example.test",  # the percent hack
    "elsewhere.test!victim@example.test",  # a UUCP bang path
    '"victim@elsewhere.test"@example.test',  # quoted local part
    '"sales@example.test"@elsewhere.test',
    "victim@elsewhere.test@example.test",
    "sales@exämple.test",  # IDN look-alike (U-label)
    "sales@xn--exmple-cua.test",  # ... and its A-label
    "sales@[127.0.0.1]",  # an address literal
    "postmaster",
]


@pytest.mark.parametrize("address", NOT_OURS)
async def test_swaks_recipient_outside_the_accounts_is_refused_never_relayed(
    settings: Settings, address: str
) -> None:
    """swaks to an address outside the configured accounts: refused at RCPT (5xx with an
    enhanced code), so there is nothing to relay."""
    status, transcript = await _swaks(settings.smtp.port, address, "--quit-after", "RCPT")
    reply = _rcpt_reply(transcript)
    assert reply.startswith("5") and ENHANCED.match(reply), transcript
    assert status != 0
    assert stored(settings) == []


async def test_source_route_with_two_hops_is_refused_for_a_stranger(settings: Settings) -> None:
    """``<@a,@b:victim@x>`` (swaks would split it at the comma; sent raw): the route is
    ignored, as RFC 5321 asks, and the stranger behind it refused."""
    async with raw_session(settings.smtp.port) as c:
        for line in ("EHLO prober.test", "MAIL FROM:<carol@customer.test>"):
            assert (await c.cmd(line)).startswith("250")
        reply = await c.cmd("RCPT TO:<@relay.test,@example.test:victim@elsewhere.test>")
        assert reply.startswith("550 5.1.1 <victim@elsewhere.test>"), reply


@pytest.mark.parametrize(
    "address", ["SALES@EXAMPLE.TEST", "Sales@Example.Test", "@relay.test:sales@example.test"]
)
async def test_swaks_odd_forms_of_an_account_address_reach_that_account(
    settings: Settings, address: str
) -> None:
    """Case and a source route do not make an account's address foreign: swaks's message
    is stored once, for sales@ (and only because sales@ is ours)."""
    status, transcript = await _swaks(settings.smtp.port, address)
    assert status == 0, transcript
    assert _rcpt_reply(transcript).startswith("250 2.1.5")
    assert len(stored(settings)) == 1


# The six end-of-data look-alikes of "SMTP smuggling" (SEC Consult, 2023).  Only CRLF . CRLF
# ends DATA; with any of these the rest is data of the first message.
FAKE_ENDS = {
    "lf-dot-lf": b"\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "cr-dot-lf": b"\r.\n",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "crlf-dot-cr": b"\r\n.\r",
}


@pytest.mark.parametrize("fake_end", FAKE_ENDS.values(), ids=FAKE_ENDS.keys())
async def test_smuggled_second_message_is_never_stored(settings: Settings, fake_end: bytes) -> None:
    """One DATA carrying a fake end of data, then MAIL/RCPT/DATA and a second message: the
    session answers the first message and QUIT, nothing else; the second is never stored."""
    smuggled = (
        b"MAIL FROM:<ceo@example.test>\r\nRCPT TO:<support@example.test>\r\nDATA\r\n"
        + b"From: ceo@example.test\r\nTo: support@example.test\r\n"
        + b"Message-ID: <smuggled@example.test>\r\nSubject: wire the money\r\n\r\nNow.\r\n"
    )
    async with raw_session(settings.smtp.port) as c:
        for line in ("EHLO attacker.test", "MAIL FROM:<carol@customer.test>"):
            assert (await c.cmd(line)).startswith("250")
        assert (await c.cmd("RCPT TO:<sales@example.test>")).startswith("250 2.1.5")
        assert (await c.cmd("DATA")).startswith("354")
        c.send(message("first@customer.test", b"Hello") + fake_end + smuggled + b"\r\n.\r\n")
        c.send("QUIT")
        replies = [(await c.reply())[-1] for _ in range(3)]
        # No reply to a smuggled MAIL, RCPT or DATA: the 250 for the first message, 221
        # for QUIT, then the end of the session.
        assert [r.split(" ")[0] for r in replies] == ["250", "221", "<EOF>"], replies
    [(msgid, raw)] = stored(settings)
    assert msgid == "first@customer.test"
    assert b"<smuggled@example.test>" in raw  # kept as the first message's data
