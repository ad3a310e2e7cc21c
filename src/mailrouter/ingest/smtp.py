"""SMTP and LMTP listeners: thin aiosmtpd handlers that only check, persist and answer.

A recipient must be a configured account (550 otherwise: never an open relay).  ``250``
is sent only after :meth:`Pipeline.accept` has committed; a store failure, or any other
internal error, answers ``451 4.3.0`` so the sending MTA keeps the mail and retries —
aiosmtpd's default would answer 500 and make the sender bounce it.  Every reply carries an
RFC 3463 enhanced status code (:mod:`mailrouter.ingest.replies`).  The servers run in the
daemon's own event loop (no threaded ``Controller``).

Around aiosmtpd's session the listener adds what an MTA facing the network needs: caps on
sessions in total and per client address, an idle timeout, a recipients-per-message limit,
a limit on refusals per session, and a drain that stops every new transaction at once
while one already in DATA completes.  DATA is read into one buffer, and freed buffers go
back to the operating system (:func:`return_big_buffers`).
"""

from __future__ import annotations

import asyncio
import ctypes
import io
import logging
import os
import ssl
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import Any, ClassVar

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from mailrouter.config import AccountSettings, ListenerSettings, Settings
from mailrouter.ingest.replies import (
    AUTH_NOT_ENABLED,
    IDLE_TIMEOUT,
    MAIL_OK,
    RCPT_OK,
    SHUTTING_DOWN,
    TEMPFAIL,
    TOO_BIG,
    TOO_MANY_CONNECTIONS,
    TOO_MANY_ERRORS,
    TOO_MANY_FROM_CLIENT,
    TOO_MANY_RECIPIENTS,
    counts_as_error,
    enhance,
    not_an_account,
)
from mailrouter.log import event
from mailrouter.net import is_loopback
from mailrouter.pipeline import Pipeline, StoreUnavailable

__all__ = [
    "IngestHandler",
    "LMTPServer",
    "Listener",
    "SMTPServer",
    "return_big_buffers",
    "start_listener",
    "tls_context",
]

log = logging.getLogger("mailrouter.ingest")


class IngestHandler:
    """aiosmtpd hooks for both protocols: announce, check recipients, persist, answer."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        lmtp: bool = False,
        on_accepted: Callable[[], None] | None = None,
    ) -> None:
        self.p = pipeline
        self.lmtp = lmtp
        self.on_accepted = on_accepted
        self.proto = "lmtp" if lmtp else "smtp"

    @property
    def settings(self) -> Settings:
        # Never a copy taken at start: an account added by a reload is accepted at RCPT at
        # once, also in a session that was open across the reload.
        return self.p.settings

    @property
    def listener(self) -> ListenerSettings:
        return self.settings.lmtp if self.lmtp else self.settings.smtp

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """EHLO and LHLO: announce enhanced codes (RFC 2034), and AUTH only with users."""
        session.host_name = hostname  # aiosmtpd leaves this to a handle_EHLO hook
        if not self.listener.auth_users:
            responses = [r for r in responses if not r[4:].startswith("AUTH")]
        return [*responses[:-1], "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        # What aiosmtpd does without a hook, answered with the sender's status code (2.1.0).
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return MAIL_OK

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.listener.max_recipients:
            self._reject(session, address, 452)
            return _logged(server, TOO_MANY_RECIPIENTS)
        if self.settings.account_for_address(address) is None:
            self._reject(session, address, 550)
            return _logged(server, not_an_account(address))
        envelope.rcpt_tos.append(address)
        return RCPT_OK

    def _reject(self, session: Session, address: str, code: int) -> None:
        peer = session.peer[0] if session.peer else None
        dsn = "5.1.1" if code == 550 else "4.5.3"
        event(
            log,
            "reject",
            logging.INFO,
            proto=self.proto,
            peer=peer,
            rcpt=address,
            code=code,
            dsn=dsn,
        )

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Persist, then answer: one status (the LMTP server repeats it per recipient)."""
        accounts: list[AccountSettings] = []
        for rcpt in envelope.rcpt_tos:
            acc = self.settings.account_for_address(rcpt)
            if acc is not None and acc not in accounts:
                accounts.append(acc)
        raw = envelope.original_content or b""
        try:
            result = await self.p.accept_async(
                raw,
                accounts,
                source=self.proto,
                envelope_sender=envelope.mail_from if envelope.mail_from != "<>" else "",
            )
        except StoreUnavailable as exc:
            event(
                log,
                "tempfail",
                logging.ERROR,
                proto=self.proto,
                account=accounts[0].address if accounts else None,
                code=451,
                dsn="4.3.0",
                error=str(exc),
            )
            return _logged(server, TEMPFAIL)
        if self.on_accepted is not None:
            self.on_accepted()
        d = result.decision
        return f"250 2.0.0 OK {d.action} interaction={result.interaction_id or '-'}"

    async def handle_exception(self, error: Exception) -> str:
        event(log, "internal-error", logging.ERROR, exc_info=error, proto=self.proto)
        return TEMPFAIL


def _logged(server: SMTP, reply: str) -> str:
    """``reply``, marked as logged by the handler already (see _Server.push)."""
    if isinstance(server, _Server):
        server.logged_reply = reply
    return reply


class _Sessions:
    """The open sessions of one listener: the caps they share and the drain state."""

    def __init__(
        self,
        current: Callable[[], ListenerSettings],
        proto: str,
        on_reply: Callable[[str], None] | None = None,
    ) -> None:
        self._current = current
        self.proto = proto
        self.on_reply = on_reply
        self.open: set[_Server] = set()
        self.per_client: Counter[str] = Counter()
        self.idle = asyncio.Event()  # set while no session is open
        self.idle.set()
        self.draining = False

    @property
    def settings(self) -> ListenerSettings:
        """The listener's settings now: a reload's limits apply from the next session on."""
        return self._current()

    def refusal(self, client: str) -> str | None:
        """Why a new connection from ``client`` is not admitted, or None."""
        if self.draining:
            return SHUTTING_DOWN
        # Each session may hold up to max_message_size bytes during DATA: capping the
        # sessions caps the memory, like Postfix's smtpd process limit.
        if len(self.open) >= self.settings.max_connections:
            return TOO_MANY_CONNECTIONS
        if self.per_client[client] >= self.settings.max_connections_per_client:
            return TOO_MANY_FROM_CLIENT
        return None

    def add(self, server: _Server) -> None:
        self.open.add(server)
        self.per_client[server.client] += 1
        self.idle.clear()

    def discard(self, server: _Server) -> None:
        if server not in self.open:
            return
        self.open.discard(server)
        self.per_client[server.client] -= 1
        if self.per_client[server.client] <= 0:
            del self.per_client[server.client]
        if not self.open:
            self.idle.set()

    def stop_accepting(self) -> None:
        self.draining = True
        for server in list(self.open):
            server.stop_accepting()


class _Door(asyncio.Protocol):
    """Admits a new connection into a session, or answers 421 and hangs up (RFC 5321 §3.8).

    The decision needs the client's address, which a protocol factory is not given; the
    door learns it in ``connection_made`` and hands the transport on to the session.
    """

    def __init__(self, sessions: _Sessions, make: Callable[[str], _Server]) -> None:
        self.sessions = sessions
        self.make = make

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if peer else "-"
        refusal = self.sessions.refusal(client)
        if refusal is None:
            server = self.make(client)
            self.sessions.add(server)
            transport.set_protocol(server)
            server.connection_made(transport)
            return
        event(
            log,
            "busy",
            logging.WARNING,
            proto=self.sessions.proto,
            peer=client,
            active=len(self.sessions.open),
            from_client=self.sessions.per_client[client],
            reply=refusal[:9],
        )
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(refusal.encode() + b"\r\n")
        transport.close()


class _Server(SMTP):
    """aiosmtpd's session with the listener's limits, enhanced codes, drain and DATA."""

    # RFC 2033 §4.2: LMTP answers DATA once per accepted recipient.
    per_recipient: ClassVar[bool] = False

    def __init__(self, handler: IngestHandler, sessions: _Sessions, client: str, **kw: Any):
        super().__init__(handler, **kw)
        self.sessions = sessions
        self.client = client
        self.offers_auth = bool(sessions.settings.auth_users)
        self.errors = 0
        self.in_data = False  # from an accepted DATA command until its reply is sent
        self.receiving = False  # ... and of that, while the client is sending the message
        self.last_input = 0.0
        self.command: str | None = None  # set where a reply's text alone is ambiguous
        self.logged_reply: str | None = None  # a refusal the handler has logged already

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            self.sessions.discard(self)

    # ------------------------------------------------------------------ replies

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, bytes):  # an AUTH challenge
            await super().push(status)
            return
        lines = [enhance(line, self.command) for line in status.split("\r\n")]
        if lines[0][:1] in ("4", "5") and status != self.logged_reply:
            # aiosmtpd answers some things without asking the handler (line too long,
            # syntax and sequence errors) and logs none of them: every refusal must leave
            # a line for the operator.  The handler logs its own, with their details.
            peer = self.session.peer if self.session is not None else None
            event(
                log,
                "refused",
                logging.INFO,
                proto=self.sessions.proto,
                peer=peer[0] if peer else self.client,
                reply=lines[0][:200],
            )
        self.logged_reply = None
        await super().push("\r\n".join(lines))
        if self.sessions.on_reply is not None:
            for line in lines:
                self.sessions.on_reply(line)
        if counts_as_error(lines[0]):
            self.errors += 1
            if self.errors >= self.sessions.settings.hard_error_limit:
                proto, peer = self.sessions.proto, self.client
                event(
                    log, "error-limit", logging.WARNING, proto=proto, peer=peer, errors=self.errors
                )
                await self._hang_up(TOO_MANY_ERRORS)

    def close_with(self, reply: str) -> None:
        """Send ``reply`` (a 421), close the connection and end the command loop."""
        if self.transport is None or self.transport.is_closing():
            return
        self._writer.write(reply.encode() + b"\r\n")
        self.transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    async def _hang_up(self, reply: str) -> None:
        """:meth:`close_with` from inside a command: not one more command is read."""
        self.close_with(reply)
        await asyncio.sleep(0)  # the cancellation of this very loop is raised here

    # ------------------------------------------------------------------ drain

    def stop_accepting(self) -> None:
        """Shutdown: a session between transactions is told 421 now; one in DATA first
        finishes its transaction (its 250 means the message is stored), then is told."""
        if not self.in_data:
            self.close_with(SHUTTING_DOWN)

    async def _refused_while_draining(self) -> bool:
        # A command read just before the drain began: no new transaction either way.
        if not self.sessions.draining:
            return False
        await self._hang_up(SHUTTING_DOWN)
        return True

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._refused_while_draining():
            return
        self.command = "MAIL"
        try:
            await super().smtp_MAIL(arg)
        finally:
            self.command = None

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if not await self._refused_while_draining():
            await super().smtp_RCPT(arg)

    @syntax("AUTH <mechanism>", when="offers_auth")
    async def smtp_AUTH(self, arg: str) -> None:
        if not self.offers_auth:
            await self.push(AUTH_NOT_ENABLED)
            return
        await super().smtp_AUTH(arg)

    # ------------------------------------------------------------------ timeout

    def _timeout_cb(self) -> None:
        # aiosmtpd re-arms the timer only when a command arrives.  A message still flowing
        # in is not idle, and while we store one it is our turn, not the client's.
        if self.in_data:
            waited = self.loop.time() - self.last_input
            if not self.receiving:
                self._reset_timeout()
                return
            if waited < self._timeout_duration:
                self._reset_timeout(self._timeout_duration - waited)
                return
        event(log, "idle-timeout", logging.INFO, proto=self.sessions.proto, peer=self.client)
        self.close_with(IDLE_TIMEOUT)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's own parse of a MAIL/RCPT address, without its per-call class.

        aiosmtpd 1.4 defines a ``typing.Protocol`` inside this method, so every MAIL and
        RCPT command created (and ABC-registered) a class: ~4% of the daemon's CPU under
        load (py-spy, docs/benchmarks.md).  Same parsers, same answers.
        """
        if not arg:
            return "", ""
        parser = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
        try:
            address, rest = parser(arg)
        except HeaderParseError:
            return None, None
        addr: str = address.addr_spec
        localpart, _, _ = addr.rpartition("@")
        if self.local_part_limit and len(localpart) > self.local_part_limit:
            return None, None
        return addr, rest

    # ------------------------------------------------------------------ DATA

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        # aiosmtpd's checks, then our own reading of the message (see _receive).
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        if await self._refused_while_draining():
            return
        replies = len(self.envelope.rcpt_tos) if self.per_recipient else 1
        self.in_data = True
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            content = await self._receive()
            if content is None:
                proto, peer, limit = self.sessions.proto, self.client, self.data_size_limit
                event(log, "reject", logging.INFO, proto=proto, peer=peer, code=552, limit=limit)
                status = TOO_BIG
            else:
                self.envelope.content = self.envelope.original_content = content
                del content  # the envelope's is the only copy
                status = await self._call_handler_hook("DATA")
            self.envelope = self._create_envelope()  # aiosmtpd's post-DATA state
            await self.push("\r\n".join([status] * replies))
        finally:
            self.in_data = False
        if self.sessions.draining:
            await self._hang_up(SHUTTING_DOWN)

    async def _receive(self) -> bytes | None:
        """The message up to the final dot, dot-unstuffed (RFC 5321 §4.5.2); None if over
        the size limit (read to its end all the same, so the session stays in step).

        Lines end at CRLF only, as in aiosmtpd >= 1.4.5: a bare LF or CR is data, so
        ``\\n.\\n`` or ``\\r.\\n`` never ends the message (SMTP smuggling).  A line longer
        than the reader's 1001-byte limit is kept, in pieces, rather than refused: RFC 5321
        §4.5.3.1 asks receivers to accept what they can, and size is the limit that counts.
        The message grows in one buffer whose bytes become the result without a copy;
        aiosmtpd's DATA keeps a bytearray per line and joins them, ~4x the message size.
        """
        limit = self.data_size_limit
        buf: io.BytesIO | None = io.BytesIO()
        size = 0
        line_start = True
        self.receiving = True
        self.last_input = self.loop.time()
        try:
            while True:
                try:
                    chunk = await self._reader.readuntil(b"\r\n")
                except asyncio.LimitOverrunError as exc:
                    # The reader leaves a CR at the end of its buffer in place, so a CRLF
                    # is never split between two pieces.
                    chunk = await self._reader.read(exc.consumed)
                self.last_input = self.loop.time()
                if line_start and chunk == b".\r\n":
                    break
                size += len(chunk)
                if buf is not None:
                    if limit and size > limit:
                        buf.close()
                        buf = None  # nothing more is kept
                    elif line_start and chunk.startswith(b"."):
                        buf.write(memoryview(chunk)[1:])
                    else:
                        buf.write(chunk)
                line_start = chunk.endswith(b"\r\n")
        finally:
            self.receiving = False
        if buf is None:
            return None
        content = buf.getvalue()
        buf.close()
        return content


# glibc's M_MMAP_THRESHOLD (malloc.h) and its documented default.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 128 * 1024


def return_big_buffers() -> bool:
    """Make freed message buffers go back to the operating system (glibc only).

    glibc serves a block of 128 KiB or more from a mapping of its own, returned when it is
    freed, but the first such free raises that threshold to the block's size (up to
    32 MiB): after one 25 MB message, every later buffer below that size comes from the
    heap, and a heap gives little back.  The daemon then stayed ~2x a big message larger
    after it, and the Maildir delivery's copies came on top.  Fixing the threshold at its
    default turns the adjustment off.  ``MALLOC_MMAP_THRESHOLD_`` in the environment (the
    operator's choice) is left alone.  True if the threshold was set.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # a C library without mallopt (musl's exists and answers 0)
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))


class SMTPServer(_Server):
    """An SMTP session of the listener."""


class LMTPServer(_Server, LMTP):
    """An LMTP session: one reply per recipient after DATA (aiosmtpd #517 sends one)."""

    per_recipient = True


class _Authenticator:
    def __init__(self, listener: ListenerSettings) -> None:
        self.users = listener.auth_users

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", "replace")
            secret = self.users.get(user)
            if secret is not None and auth_data.password.decode("utf-8", "replace") == secret.get():
                return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)


def tls_context(listener: ListenerSettings) -> ssl.SSLContext | None:
    """The server TLS context of ``listener`` (None without a certificate), read from disk.

    Raises OSError or ssl.SSLError when the certificate or key cannot be loaded; a reload
    checks the new settings with it before applying them.
    """
    if listener.tls_cert is None or listener.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(listener.tls_cert, listener.tls_key)
    return ctx


class Listener:
    """A bound listener: serves sessions with the current settings, drains on stop.

    The address is bound once (changing it needs a restart).  The caps, the size limit,
    AUTH and its users, the idle timeout and the hostname are read from the pipeline's
    current settings for each new session, and a reload hands over a freshly read
    certificate (:meth:`use_tls`): a reload applies from the next connection on, while
    sessions in flight finish as they began.
    """

    def __init__(self, pipeline: Pipeline, *, lmtp: bool, on_accepted: Callable[[], None] | None):
        self.p = pipeline
        self.lmtp = lmtp
        self.proto = "lmtp" if lmtp else "smtp"
        self.handler = IngestHandler(pipeline, lmtp=lmtp, on_accepted=on_accepted)
        self.tls = tls_context(self.settings)
        self.loopback = is_loopback(self.settings.host)
        self.sessions = _Sessions(lambda: self.settings, self.proto, self._count_reply)
        self._server: asyncio.Server | None = None

    @property
    def settings(self) -> ListenerSettings:
        return self.p.settings.lmtp if self.lmtp else self.p.settings.smtp

    @property
    def server(self) -> asyncio.Server:
        assert self._server is not None, "start() first"
        return self._server

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.settings
        self._server = await loop.create_server(
            lambda: _Door(self.sessions, self._make),
            host=cfg.host,
            port=cfg.port,
            # None, not False: asyncio refuses reuse_port on platforms without it even when
            # asked for False, and the default must work everywhere.
            reuse_port=True if cfg.reuse_port else None,
        )

    def use_tls(self, tls: ssl.SSLContext | None) -> None:
        """Serve new sessions with ``tls`` (a reload: a renewed or changed certificate)."""
        self.tls = tls

    def _count_reply(self, reply: str) -> None:
        self.p.rt.metrics.smtp_reply(self.proto, reply)

    def _make(self, client: str) -> _Server:
        cfg, tls = self.settings, self.tls
        cls: type[_Server] = LMTPServer if self.lmtp else SMTPServer
        with warnings.catch_warnings():
            # aiosmtpd warns on every connection when AUTH is required without TLS; on a
            # loopback listener that is the operator's documented choice, not news.
            warnings.simplefilter("ignore", UserWarning)
            return cls(
                self.handler,
                self.sessions,
                client,
                data_size_limit=cfg.max_message_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                hostname=self.p.settings.hostname,
                ident="mailrouter",
                tls_context=tls,
                require_starttls=tls is not None and not self.lmtp,
                auth_required=cfg.require_auth,
                # AUTH in clear text is acceptable only on loopback without a certificate;
                # with one, STARTTLS is required before anything else anyway.
                auth_require_tls=tls is not None or not self.loopback,
                authenticator=_Authenticator(cfg) if cfg.auth_users else None,
                timeout=cfg.idle_timeout,
            )

    async def drain(self) -> None:
        """Stop accepting connections and transactions, then wait for the sessions to end.

        Sessions between transactions get ``421 4.3.2`` at once; one in DATA completes its
        transaction (stored, then 250) and gets the 421 after it.
        """
        self.server.close()
        self.sessions.stop_accepting()
        await self.sessions.idle.wait()

    def abort(self) -> None:
        """Hang up on sessions still open (after the drain timeout).  Nothing they sent
        was acknowledged, so their clients keep the mail and retry."""
        for session in list(self.sessions.open):
            if session.transport is not None:
                session.transport.close()


async def start_listener(
    pipeline: Pipeline,
    *,
    lmtp: bool = False,
    on_accepted: Callable[[], None] | None = None,
) -> Listener:
    """Bind ``[lmtp]`` or ``[smtp]`` and start serving; :meth:`Listener.drain` stops it."""
    listener = Listener(pipeline, lmtp=lmtp, on_accepted=on_accepted)
    await listener.start()
    return listener
