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
from dataclasses import dataclass
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from mailrouter.config import AccountSettings, ListenerSettings, Settings
from mailrouter.log import event
from mailrouter.net import is_loopback
from mailrouter.pipeline import Pipeline, StoreUnavailable

__all__ = ["IngestHandler", "LMTPServer", "Listener", "SMTPServer", "start_listener"]

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
        self.settings: Settings = pipeline.settings
        self.lmtp = lmtp
        self.on_accepted = on_accepted
        self.proto = "lmtp" if lmtp else "smtp"

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
            )
            reply = f"550 5.1.1 <{address}>: Recipient address rejected: not a mailrouter account"
            return _logged(server, reply)
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
            event(log, "tempfail", logging.ERROR, proto=self.proto, error=str(exc))
            return _logged(server, self._per_recipient(envelope, TEMPFAIL))
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


def _logged(server: SMTP, reply: str) -> str:
    """``reply``, marked as already logged by the handler (see _TellsListener.push)."""
    if isinstance(server, _TellsListener):
        server.logged_reply = reply
    return reply


class _TellsListener(asyncio.Protocol):
    """Tells the listener when a session ends, so the connection cap and drain know; and
    logs the refusals aiosmtpd sends by itself."""

    on_close: Callable[[], None] | None = None
    logged_reply: str | None = None  # a refusal IngestHandler has logged with its details

    async def push(self, status: str | bytes) -> None:
        # aiosmtpd answers some things without asking the handler — "500 Line too long"
        # and "552 Too much mail data" after DATA, syntax and sequence errors — and logs
        # none of them.  Every refusal must leave a line for the operator.
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        if text[:1] in ("4", "5") and text != self.logged_reply:
            session = getattr(self, "session", None)
            peer = getattr(session, "peer", None)
            event(
                log,
                "refused",
                logging.INFO,
                proto="lmtp" if isinstance(self, LMTP) else "smtp",
                peer=peer[0] if peer else None,
                reply=text[:200],
            )
        self.logged_reply = None
        await super().push(status)  # type: ignore[misc]

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            _closed(self)


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


def _tls_context(listener: ListenerSettings) -> ssl.SSLContext | None:
    if listener.tls_cert is None or listener.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(listener.tls_cert, listener.tls_key)
    return ctx


@dataclass
class Listener:
    """A bound listener and a way to wait for the sessions it still serves."""

    server: asyncio.Server
    sessions: set[SMTPServer | LMTPServer]
    idle: asyncio.Event  # set while no session is open

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
    listener: ListenerSettings,
    *,
    lmtp: bool = False,
    on_accepted: Callable[[], None] | None = None,
) -> Listener:
    """Bind and start serving; :meth:`Listener.drain` stops it gracefully."""
    handler = IngestHandler(pipeline, lmtp=lmtp, on_accepted=on_accepted)
    tls = _tls_context(listener)
    loopback = is_loopback(listener.host)
    cls: type[SMTPServer] | type[LMTPServer] = LMTPServer if lmtp else SMTPServer
    sessions: set[SMTPServer | LMTPServer] = set()
    idle = asyncio.Event()
    idle.set()

    def protocol() -> asyncio.Protocol:
        # Each session may hold up to max_message_size bytes during DATA: capping the
        # sessions caps the memory, like Postfix's smtpd process limit.
        if len(sessions) >= listener.max_connections:
            event(
                log, "busy", logging.WARNING, proto="lmtp" if lmtp else "smtp", active=len(sessions)
            )
            return _Busy()
        server = factory()

        def ended() -> None:
            sessions.discard(server)
            if not sessions:
                idle.set()

        server.on_close = ended
        sessions.add(server)
        idle.clear()
        return server

    hostname = pipeline.settings.hostname

    # AUTH in clear text is acceptable only on loopback without a certificate; with one,
    # STARTTLS is required before anything else anyway.
    auth_require_tls = tls is not None or not loopback

    def factory() -> SMTPServer | LMTPServer:
        with warnings.catch_warnings():
            # aiosmtpd warns on every connection when AUTH is required without TLS; on a
            # loopback listener that is the operator's documented choice, not news.
            warnings.simplefilter("ignore", UserWarning)
            return make()

    def make() -> SMTPServer | LMTPServer:
        return cls(
            handler,
            data_size_limit=listener.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,
            ident="mailrouter",
            tls_context=tls,
            require_starttls=tls is not None and not lmtp,
            auth_required=listener.require_auth,
            auth_require_tls=auth_require_tls,
            authenticator=_Authenticator(listener) if listener.auth_users else None,
            timeout=300,
        )

    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol, host=listener.host, port=listener.port)
    return Listener(server, sessions, idle)
