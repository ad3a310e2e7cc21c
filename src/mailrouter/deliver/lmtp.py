"""Deliver a message into a mailbox server (Dovecot) over LMTP, reading one reply per recipient.

A small client of our own: aiosmtplib has no LMTP, and ``smtplib.LMTP`` reads a single
reply after DATA, whereas RFC 2033 §4.2 gives one reply *per accepted recipient* — reading
only the first would report mail to the second recipient as delivered when it was not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
from collections.abc import Awaitable
from typing import Literal, TypeVar

from mailrouter.config import DeliverySettings, client_ssl_context
from mailrouter.deliver.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailrouter.log import event

__all__ = ["LOST_REPLY_CODE", "deliver_lmtp", "lmtp_deliver"]

log = logging.getLogger("mailrouter.deliver.lmtp")

T = TypeVar("T")

# The reply we record for a recipient whose DATA reply never came (connection lost or timed
# out after the final dot).  4xx: the outbox retries it — the server may already have
# delivered it, the classic SMTP duplicate window, which is better than losing it.
LOST_REPLY_CODE = 421

_EOL = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)
# Characters that would end or split a command line, or smuggle ESMTP parameters in.
_BAD_ADDRESS = re.compile(r"[\x00-\x20<>\x7f]")
_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -])(.*?)\r?\n?$", re.DOTALL)
_MAX_LINE = 64 * 1024  # far above RFC 5321's 512 octets; guards memory against a bad peer


class _ProtocolError(Exception):
    """The server said something that is not an SMTP/LMTP reply."""


class _Closing(_ProtocolError):
    """A 421 where a recipient's reply was due: the server is closing the channel."""


# What a broken peer or network looks like from here.  OSError covers refused and reset
# connections, TimeoutError and ssl.SSLError; ValueError is StreamReader's line limit.
_NETWORK_ERRORS = (OSError, asyncio.IncompleteReadError, _ProtocolError, ValueError)


class _Connection:
    """One LMTP session; every await is bounded by ``timeout``."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.reader, self.writer, self.timeout = reader, writer, timeout

    async def _bounded(self, aw: Awaitable[T]) -> T:
        return await asyncio.wait_for(aw, self.timeout)

    async def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) reply: ``250-...`` lines up to ``250 ...``."""
        texts: list[str] = []
        while True:
            line = await self._bounded(self.reader.readline())
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            m = _REPLY_LINE.match(line)
            if m is None:
                raise _ProtocolError(f"not a reply line: {line[:200]!r}")
            texts.append(m.group(3).decode("utf-8", "replace"))
            if m.group(2) == b" ":
                return int(m.group(1)), "\n".join(texts)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self._bounded(self.writer.drain())

    async def command(self, line: str) -> tuple[int, str]:
        # UTF-8 so that an internationalised address reaches a server that takes it; a
        # server that does not answers 5xx for that recipient, which is the truth.
        await self.send(line.encode("utf-8") + b"\r\n")
        return await self.reply()

    async def lhlo(self, name: str) -> set[str]:
        code, text = await self.command(f"LHLO {name}")
        _expect(code, text, "LHLO", 250)
        # The first line is the server's name; each further line is one extension keyword.
        return {line.split(" ", 1)[0].upper() for line in text.split("\n")[1:] if line}

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):  # closed on our side either way
            await self._bounded(self.writer.wait_closed())


def _expect(code: int, text: str, what: str, wanted: int) -> None:
    """Raise the class of DeliveryError that ``code`` calls for unless it is ``wanted``."""
    if code == wanted:
        return
    msg = f"LMTP {what} refused: {code} {text}"
    if 500 <= code < 600:
        raise PermanentDeliveryError(msg)
    raise TemporaryDeliveryError(msg)


def data_payload(raw: bytes) -> bytes:
    """``raw`` as DATA content: CRLF line ends, leading dots doubled, ``.`` terminator.

    Bare LF (how Python and Maildir files usually end lines) and bare CR both become CRLF;
    RFC 5321 §2.3.8 forbids sending them bare.  Dot-stuffing (§4.5.2) keeps a body line
    that is just ``.`` from ending the message early.
    """
    data = _EOL.sub(b"\r\n", raw)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return _LEADING_DOT.sub(b"..", data) + b".\r\n"


def _check_address(address: str) -> None:
    if _BAD_ADDRESS.search(address):
        # Retrying cannot make this address valid; the outbox records it as failed.
        raise PermanentDeliveryError(f"address {address!r} cannot be sent in an LMTP command")


async def lmtp_deliver(
    host: str,
    port: int,
    raw: bytes,
    *,
    mail_from: str,
    recipients: list[str],
    timeout: float,  # noqa: ASYNC109 - bounds each step, not the whole call
    tls: Literal["none", "starttls", "tls"] = "none",
    ssl_context: ssl.SSLContext | None = None,
    lhlo_name: str | None = None,
) -> dict[str, tuple[int, str]]:
    """Deliver ``raw`` to ``recipients``; return each recipient's final (code, text).

    A recipient refused at RCPT keeps that reply; an accepted one gets its own reply after
    DATA.  Anything that fails before the message is handed over (connection, greeting,
    LHLO, STARTTLS, MAIL FROM) raises :class:`TemporaryDeliveryError` or
    :class:`PermanentDeliveryError` by reply code, since nothing has been delivered.  Once
    the final dot is sent we never raise: a recipient whose reply does not arrive is
    reported with :data:`LOST_REPLY_CODE` so that the caller retries only those.
    ``mail_from`` may be ``""`` (null reverse-path).
    """
    if not recipients:
        raise ValueError("lmtp_deliver needs at least one recipient")
    for address in (mail_from, *recipients):
        _check_address(address)
    if tls != "none" and ssl_context is None:
        ssl_context = ssl.create_default_context()
    name = lhlo_name or socket.gethostname()
    where = f"{host}:{port}"

    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host,
                port,
                limit=_MAX_LINE,
                ssl=ssl_context if tls == "tls" else None,
                server_hostname=host if tls == "tls" else None,
            ),
            timeout,
        )
    except (OSError, TimeoutError) as exc:
        raise TemporaryDeliveryError(f"LMTP {where}: cannot connect: {_describe(exc)}") from exc

    conn = _Connection(reader, writer, timeout)
    results: dict[str, tuple[int, str]] = {}
    accepted: list[str] = []
    replied: set[str] = set()
    data_sent = False
    try:
        try:
            code, text = await conn.reply()
            _expect(code, text, "greeting", 220)
            extensions = await conn.lhlo(name)
            if tls == "starttls":
                if "STARTTLS" not in extensions:
                    # Configured for TLS: never fall back to cleartext.  Temporary because
                    # it is the server's (or the config's) to fix, not this message's.
                    raise TemporaryDeliveryError(f"LMTP {where}: server does not offer STARTTLS")
                code, text = await conn.command("STARTTLS")
                _expect(code, text, "STARTTLS", 220)
                assert ssl_context is not None
                await conn._bounded(writer.start_tls(ssl_context, server_hostname=host))
                extensions = await conn.lhlo(name)  # RFC 3207: forget what was said in clear

            params = ""
            if "8BITMIME" in extensions and any(b > 0x7F for b in raw):
                params += " BODY=8BITMIME"
            if "SMTPUTF8" in extensions and not all(a.isascii() for a in (mail_from, *recipients)):
                params += " SMTPUTF8"
            code, text = await conn.command(f"MAIL FROM:<{mail_from}>{params}")
            _expect(code, text, "MAIL FROM", 250)

            for rcpt in recipients:
                code, text = await conn.command(f"RCPT TO:<{rcpt}>")
                results[rcpt] = (code, text)
                if 200 <= code < 300:
                    accepted.append(rcpt)
            if accepted:  # else every recipient has its refusal and there is nothing to send
                code, text = await conn.command("DATA")
                _expect(code, text, "DATA", 354)
                data_sent = True  # from here a lost connection may mean "delivered"
                await conn.send(data_payload(raw))
                for rcpt in accepted:
                    code, text = await conn.reply()
                    if code == 421:
                        # RFC 5321 §3.8: the server is shutting down and says so instead
                        # of replying.  Dovecot does this when stopped after it saved the
                        # message: not a refusal but a lost reply, like a dropped line.
                        raise _Closing(f"{code} {text}")
                    results[rcpt] = (code, text)
                    replied.add(rcpt)
        except _NETWORK_ERRORS as exc:
            if not data_sent:
                raise TemporaryDeliveryError(f"LMTP {where}: {_describe(exc)}") from exc
            lost = f"4.4.2 no reply from {where} ({_describe(exc)}); may have been delivered"
            for rcpt in accepted:
                if rcpt not in replied:
                    results[rcpt] = (LOST_REPLY_CODE, lost)
            missing = ",".join(r for r in accepted if r not in replied)
            event(log, "lmtp-reply-lost", logging.WARNING, server=where, rcpts=missing)
            return results
        await _quit(conn)
        return results
    finally:
        await conn.close()


async def _quit(conn: _Connection) -> None:
    """Say goodbye politely; the delivery outcome is already known, so errors do not matter."""
    with contextlib.suppress(*_NETWORK_ERRORS):
        await conn.command("QUIT")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed by server"
    return str(exc) or type(exc).__name__


async def deliver_lmtp(
    settings: DeliverySettings, raw: bytes, *, recipient: str, mail_from: str = ""
) -> str:
    """Deliver ``raw`` into the mailbox of one account over LMTP, or raise a DeliveryError;
    returns the server's reply (``250 2.0.0 <…> Saved``).

    The LMTP recipient is ``settings.user`` (the config defaults it to the account's
    address) and else ``recipient``.  ``mail_from`` becomes Dovecot's ``Return-Path``; the
    default null sender also keeps Sieve vacation scripts from answering routed copies.
    """
    rcpt = settings.user or recipient
    results = await lmtp_deliver(
        settings.host,
        settings.port,
        raw,
        mail_from=mail_from,
        recipients=[rcpt],
        timeout=settings.timeout,
        tls=settings.tls,
        ssl_context=client_ssl_context(settings.tls_ca_file),
    )
    code, text = results[rcpt]
    if 200 <= code < 300:
        event(log, "lmtp-delivered", logging.DEBUG, rcpt=rcpt, reply=f"{code} {text}")
        return f"{code} {text}"
    msg = f"LMTP {settings.host}:{settings.port} <{rcpt}>: {code} {text}"
    if 500 <= code < 600:
        raise PermanentDeliveryError(msg)
    raise TemporaryDeliveryError(msg)
