"""SMTP and LMTP listeners: thin aiosmtpd handlers that only check, persist and answer.

A recipient must be a configured account (550 otherwise: never an open relay).  ``250``
is sent only after :meth:`Pipeline.accept` has committed; a store failure, or any other
internal error, answers ``451 4.3.0`` so the sending MTA keeps the mail and retries —
aiosmtpd's default would answer 500 and make the sender bounce it.  The servers run in
the daemon's own event loop (no threaded ``Controller``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import warnings
from collections.abc import Callable
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mailrouter.config import AccountSettings, ListenerSettings, Settings
from mailrouter.log import event
from mailrouter.net import is_loopback
from mailrouter.pipeline import Pipeline, StoreUnavailable

__all__ = [
    "IngestHandler",
    "LMTPServer",
    "Listener",
    "SMTPServer",
    "start_listener",
    "tls_context",
]

log = logging.getLogger("mailrouter.ingest")

TEMPFAIL = "451 4.3.0 Temporary failure storing the message; try again later"


class IngestHandler:
    """aiosmtpd hooks for both protocols; ``lmtp`` changes only the reply after DATA."""

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

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self.settings.account_for_address(address) is None:
            event(
                log,
                "reject",
                logging.INFO,
                proto=self.proto,
                peer=session.peer[0] if session.peer else None,
                rcpt=address,
                code=550,
                dsn="5.1.1",
            )
            return f"550 5.1.1 <{address}>: Recipient address rejected: not a mailrouter account"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
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
            return self._per_recipient(envelope, TEMPFAIL)
        if self.on_accepted is not None:
            self.on_accepted()
        d = result.decision
        status = f"250 2.0.0 OK {d.action} interaction={result.interaction_id or '-'}"
        return self._per_recipient(envelope, status)

    def _per_recipient(self, envelope: Envelope, status: str) -> str:
        if not self.lmtp:
            return status
        # RFC 2033 §4.2: one reply per accepted recipient after DATA.  aiosmtpd's LMTP
        # sends a single one (aiosmtpd #517); the lines pushed here are the replies.
        return "\r\n".join(status for _ in envelope.rcpt_tos)

    async def handle_exception(self, error: Exception) -> str:
        event(log, "internal-error", logging.ERROR, exc_info=error, proto=self.proto)
        return TEMPFAIL


class _TellsListener(asyncio.Protocol):
    """Tells the listener when a session ends (connection cap, drain), and the metrics
    every reply it sends (aiosmtpd's own 5xx included)."""

    on_close: Callable[[], None] | None = None
    on_reply: Callable[[str], None] | None = None

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            _closed(self)

    async def push(self, status: Any) -> None:
        if self.on_reply is not None:
            self.on_reply(
                status if isinstance(status, str) else bytes(status).decode("ascii", "replace")
            )
        await super().push(status)  # type: ignore[misc]


class SMTPServer(_TellsListener, SMTP):
    """aiosmtpd's SMTP, telling the listener when its session ends (connection cap)."""


class LMTPServer(_TellsListener, LMTP):
    """aiosmtpd's LMTP with the handler's per-recipient DATA replies (see IngestHandler)."""


def _closed(server: _TellsListener) -> None:
    callback, server.on_close = server.on_close, None
    if callback is not None:
        callback()


class _Busy(asyncio.Protocol):
    """Answers a connection over the cap with 421 and hangs up (RFC 5321 §3.8)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"421 4.3.2 Too many connections, try again later\r\n")
        transport.close()


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

    The address is bound once (changing it needs a restart).  The connection cap, the
    size limit, AUTH and its users and the hostname are read from the pipeline's current
    settings for each new session, and a reload hands over a freshly read certificate
    (:meth:`use_tls`): a reload applies from the next connection on, while sessions in
    flight finish as they began.
    """

    def __init__(self, pipeline: Pipeline, *, lmtp: bool, on_accepted: Callable[[], None] | None):
        self.p = pipeline
        self.lmtp = lmtp
        self.proto = "lmtp" if lmtp else "smtp"
        self.handler = IngestHandler(pipeline, lmtp=lmtp, on_accepted=on_accepted)
        self.tls = tls_context(self.settings)
        self.loopback = is_loopback(self.settings.host)
        self.sessions: set[SMTPServer | LMTPServer] = set()
        self.idle = asyncio.Event()  # set while no session is open
        self.idle.set()
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
        self._server = await loop.create_server(self.protocol, host=cfg.host, port=cfg.port)

    def use_tls(self, tls: ssl.SSLContext | None) -> None:
        """Serve new sessions with ``tls`` (a reload: a renewed or changed certificate)."""
        self.tls = tls

    def protocol(self) -> asyncio.Protocol:
        # Each session may hold up to max_message_size bytes during DATA: capping the
        # sessions caps the memory, like Postfix's smtpd process limit.
        cfg = self.settings
        if len(self.sessions) >= cfg.max_connections:
            event(log, "busy", logging.WARNING, proto=self.proto, active=len(self.sessions))
            return _Busy()
        with warnings.catch_warnings():
            # aiosmtpd warns on every connection when AUTH is required without TLS; on a
            # loopback listener that is the operator's documented choice, not news.
            warnings.simplefilter("ignore", UserWarning)
            server = self._make(cfg)

        def ended() -> None:
            self.sessions.discard(server)
            if not self.sessions:
                self.idle.set()

        server.on_close = ended
        server.on_reply = self._count_reply
        self.sessions.add(server)
        self.idle.clear()
        return server

    def _count_reply(self, reply: str) -> None:
        self.p.rt.metrics.smtp_reply(self.proto, reply)

    def _make(self, cfg: ListenerSettings) -> SMTPServer | LMTPServer:
        tls = self.tls
        cls: type[SMTPServer] | type[LMTPServer] = LMTPServer if self.lmtp else SMTPServer
        return cls(
            self.handler,
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
            timeout=300,
        )

    async def drain(self) -> None:
        """Stop accepting, then wait until every open session has ended."""
        self.server.close()
        await self.idle.wait()

    def abort(self) -> None:
        """Hang up on sessions still open (after the drain timeout).  Nothing they sent
        was acknowledged, so their clients keep the mail and retry."""
        for session in list(self.sessions):
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
