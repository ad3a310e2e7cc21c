"""Every refusal carries an RFC 3463 enhanced status code, and EHLO/LHLO say so; AUTH is
offered only when there are credentials to check."""

from __future__ import annotations

import asyncio
import re
import smtplib
from pathlib import Path

import aiosmtpd.lmtp
import aiosmtpd.smtp
from listener_kit import ENHANCED, listener_settings, message, raw_session, running, stored

from mailrouter.ingest.replies import enhance

# The greeting and the HELO/EHLO/LHLO replies are exempt (RFC 2034 §3); 354 and the 334
# challenges invite data rather than report a status.
EXEMPT = re.compile(r"^(220 mailrouter\.invalid |250[- ]|354 |334 )")


async def test_ehlo_and_lhlo_announce_enhancedstatuscodes(tmp_path: Path) -> None:
    """Both greetings list ENHANCEDSTATUSCODES, so Postfix records our DSN codes."""
    s = listener_settings(tmp_path)
    async with running(s):
        async with raw_session(s.smtp.port) as smtp:
            smtp.send("EHLO mta.example.test")
            assert "250-ENHANCEDSTATUSCODES" in await smtp.reply()
        async with raw_session(s.lmtp.port) as lmtp:
            lmtp.send("LHLO mta.example.test")
            assert "250-ENHANCEDSTATUSCODES" in await lmtp.reply()


async def test_auth_is_not_offered_without_credentials(tmp_path: Path) -> None:
    """No auth_users: EHLO does not list AUTH, and AUTH gets 503 5.5.1 (not 535)."""
    s = listener_settings(tmp_path)
    async with running(s), raw_session(s.smtp.port) as c:
        c.send("EHLO mta.example.test")
        assert not [line for line in await c.reply() if "AUTH" in line]
        assert await c.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==") == (
            "503 5.5.1 Error: authentication not enabled"
        )


OVER_SIZE = "MAIL FROM:<carol@customer.test> SIZE=999999999"
# Commands that provoke each refusal aiosmtpd or we can give in a plain session, in order.
PROBES = [
    "NOOP",
    "MAIL FROM:<carol@customer.test>",  # before HELO
    "FROBNICATE",
    "",
    "NOOP " + "x" * 600,
    "HELO",
    "EHLO",
    "EHLO mta.example.test",
    "AUTH LOGIN",
    "STARTTLS",
    "HELP",
    "HELP MAIL",
    "HELP NOSUCH",
    "VRFY sales@example.test",
    "VRFY <<>",
    "VRFY",
    "EXPN sales",
    "RCPT TO:<sales@example.test>",  # before MAIL
    "DATA",  # before RCPT
    OVER_SIZE,
    "MAIL FROM:<carol@customer.test> BODY=9BIT",
    "MAIL FROM:<carol@customer.test> SMTPUTF8=yes",
    "MAIL FROM:<carol@customer.test> FROB=1",
    "MAIL FROM:<<carol>",
    "MAIL FROM:",
    "MAIL carol@customer.test",
    "MAIL FROM:<carol@customer.test>",
    "MAIL FROM:<carol@customer.test>",  # nested
    "RCPT TO:",
    "RCPT TO:<<x>",
    "RCPT TO:<sales@example.test> FROB=1",
    "RCPT TO:<stranger@elsewhere.test>",
    "RCPT TO:<sales@example.test>",
    "RCPT TO:<support@example.test>",  # over max_recipients = 1
    "DATA now",
    "RSET x",
    "RSET",
    "QUIT x",
    "QUIT",
]


async def test_every_refusal_from_the_listener_carries_an_enhanced_code(tmp_path: Path) -> None:
    """A session provoking every refusal it can: each reply line but the exempt ones
    (greeting, EHLO, 354) starts with an RFC 3463 code; 552 says 5.3.4."""
    s = listener_settings(tmp_path, max_recipients=1, hard_error_limit=100)
    replies: dict[str, list[str]] = {}
    async with running(s), raw_session(s.smtp.port) as c:
        for probe in PROBES:
            c.send(probe)
            replies[probe] = await c.reply()
    missing = {
        p: r
        for p, r in replies.items()
        for line in r
        if not (ENHANCED.match(line) or EXEMPT.match(line))
    }
    assert not missing, missing
    assert replies[OVER_SIZE] == ["552 5.3.4 Message too big for system"]
    assert replies["MAIL FROM:<<carol>"] == ["553 5.1.7 Error: malformed sender address"]
    assert replies["RCPT TO:<support@example.test>"] == ["452 4.5.3 Error: too many recipients"]
    assert replies["RCPT TO:<stranger@elsewhere.test>"][0].startswith("550 5.1.1 ")
    assert replies["QUIT"] == ["221 2.0.0 Bye"]
    assert stored(s) == []


async def test_lmtp_refusals_carry_codes_and_oversized_data_gets_552_per_recipient(
    tmp_path: Path,
) -> None:
    """LMTP: HELO/EHLO are refused with a code, and a message over the size limit gets one
    552 5.3.4 per accepted recipient (RFC 2033), so the client stays in step."""
    s = listener_settings(tmp_path, max_message_size=2000)
    async with running(s), raw_session(s.lmtp.port) as c:
        assert await c.cmd("HELO mta.example.test") == (
            '500 5.5.2 Error: command "HELO" not recognized'
        )
        assert (await c.cmd("LHLO mta.example.test")).startswith("250 ")
        assert (await c.cmd("MAIL FROM:<carol@customer.test>")).startswith("250 2.1.0")
        for rcpt in ("sales@example.test", "support@example.test"):
            assert (await c.cmd(f"RCPT TO:<{rcpt}>")).startswith("250 2.1.5")
        assert (await c.cmd("DATA")).startswith("354")
        c.send(message("big@customer.test", b"x" * 76 + b"\r\n") * 30 + b".\r\n")
        assert [(await c.reply())[-1] for _ in range(2)] == [
            "552 5.3.4 Message too big for system"
        ] * 2
        assert (await c.cmd("NOOP")) == "250 2.0.0 OK"  # in step: the next reply is NOOP's
    assert stored(s) == []


def test_smtplib_sees_enhanced_codes_on_refusals(tmp_path: Path) -> None:
    """smtplib, a real client: its exceptions carry the enhanced code in the text."""
    s = listener_settings(tmp_path, max_message_size=2000)

    async def main() -> None:
        async with running(s):
            await asyncio.to_thread(session)

    def session() -> None:
        with smtplib.SMTP("127.0.0.1", s.smtp.port, timeout=10) as c:
            c.ehlo()
            assert c.has_extn("enhancedstatuscodes") and not c.has_extn("auth")
            assert c.mail("carol@customer.test") == (250, b"2.1.0 OK")
            assert c.rcpt("nobody@elsewhere.test")[1].startswith(b"5.1.1 ")
            assert c.rcpt("sales@example.test") == (250, b"2.1.5 OK")
            assert c.data((b"x" * 76 + b"\r\n") * 40) == (552, b"5.3.4 Message too big for system")
            assert c.rset() == (250, b"2.0.0 OK")

    asyncio.run(main())


def _aiosmtpd_literals() -> list[str]:
    """Every reply literal in aiosmtpd's SMTP and LMTP classes (f-strings with a sample)."""
    out: list[str] = []
    for module in (aiosmtpd.smtp, aiosmtpd.lmtp):
        source = Path(module.__file__ or "").read_text()
        for m in re.finditer(r"""[(=\s]f?(['"])([2-5]\d\d (?:(?!\1).)*)\1""", source):
            text = m.group(2).replace("{}", "X").replace("{command}", "FOO")
            out.append(re.sub(r"\{[^}]*\}", "X", text))
    return out


def test_every_reply_aiosmtpd_writes_itself_gets_an_enhanced_code() -> None:
    """A guard for aiosmtpd upgrades: each refusal literal in its source leaves through
    replies.enhance() with an RFC 3463 code (statuses too, but the exempt ones)."""
    literals = _aiosmtpd_literals()
    assert len(literals) > 50, literals  # the scan still finds aiosmtpd's replies
    bare = [
        lit
        for lit in literals
        if not ENHANCED.match(enhance(lit))
        and not re.match(r"^(220 X X|250 X|250 HELP|354 |334 )", lit)
    ]
    assert not bare, bare
