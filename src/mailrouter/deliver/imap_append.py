"""Deliver a message into an account's IMAP mailbox with APPEND, at most once per Message-ID.

Also home of :func:`imap_connect`, the one place that opens an aioimaplib session (TLS,
STARTTLS, LOGIN) with every await bounded — the IMAP watcher reuses it.

aioimaplib traps handled here (DESIGN §6): it never fails a pending command when the
connection drops, so every await also races a "connection lost" future; its own timeout
also covers a big APPEND, so it is set to ``settings.timeout`` rather than its 10 s
default; and it has no STARTTLS, so :func:`_starttls` upgrades the transport itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any, Literal, TypeVar

import aioimaplib

from mailrouter.config import DeliverySettings, client_ssl_context
from mailrouter.deliver.errors import PermanentDeliveryError, TemporaryDeliveryError

__all__ = ["deliver_imap", "encode_mailbox", "imap_connect", "imap_disconnect"]

log = logging.getLogger("mailrouter.deliver.imap")

T = TypeVar("T")
Tls = Literal["none", "starttls", "tls"]

_EOL = re.compile(rb"\r\n|\r|\n")
_CODE = re.compile(rb"^\[([A-Z-]+)")
# Response codes (RFC 5530, RFC 7889) that say "this message can never be stored": the
# message is at fault, so retrying is pointless and the outbox should record a failure.
# Not CANNOT: Dovecot answers APPEND to an invalid mailbox name with it, and a mailbox name
# is the account's setup, which ops can fix.
_PERMANENT_CODES = {b"TOOBIG", b"LIMIT", b"PARSE"}


# --------------------------------------------------------------------------- one session


class _Session:
    """An aioimaplib client plus what aioimaplib does not track for us.

    ``lost`` completes when the socket closes, so a pending command fails at once instead
    of waiting forever.  ``abandoned`` holds the awaits we gave up on: cancelling one may
    not finish while aioimaplib's welcome task holds its state lock (it waits for a
    CAPABILITY reply that a dead server never sends), so :meth:`close` cancels those
    internal tasks too and only then waits for everything to wind down.
    """

    def __init__(self, client: aioimaplib.IMAP4, timeout: float, lost: asyncio.Future[None]):
        self.client, self.timeout, self.lost = client, timeout, lost
        self.abandoned: set[asyncio.Future[Any]] = set()

    async def call(self, aw: Awaitable[T], what: str) -> T:
        """Await ``aw`` for at most ``timeout`` seconds, giving up early if the connection drops.

        Every failure that a new connection might not have — timeouts, a lost connection,
        socket and TLS errors, aioimaplib's own exceptions — becomes a TemporaryDeliveryError.
        """
        task = asyncio.ensure_future(aw)
        waiters: set[asyncio.Future[Any]] = {task, self.lost}
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=self.timeout, return_when="FIRST_COMPLETED"
            )
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        if task not in done:
            self._abandon(task)
            if self.lost.done():
                raise TemporaryDeliveryError(f"IMAP connection lost during {what}")
            raise TemporaryDeliveryError(f"IMAP {what} timed out after {self.timeout:g} s")
        try:
            return task.result()
        except TimeoutError as exc:  # aioimaplib's own wait_for fired first
            raise TemporaryDeliveryError(f"IMAP {what} timed out after {self.timeout:g} s") from exc
        except (OSError, aioimaplib.AioImapException) as exc:
            raise TemporaryDeliveryError(f"IMAP {what}: {exc or type(exc).__name__}") from exc

    def _abandon(self, task: asyncio.Future[Any]) -> None:
        task.cancel()
        # Retrieve whatever it ends with, so asyncio does not log "never retrieved".
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self.abandoned.add(task)

    async def close(self) -> None:
        """LOGOUT politely (bounded) if still usable, then tear everything down.

        Not CLOSE: that would silently expunge messages an agent marked \\Deleted.
        """
        client = self.client
        if not self.lost.done() and client.get_state() in ("NONAUTH", "AUTH", "SELECTED"):
            with contextlib.suppress(TemporaryDeliveryError):
                await self.call(client.logout(), "LOGOUT")
        # Our abandoned awaits, aioimaplib's own tasks, and the connect itself.
        every = (*self.abandoned, *client.tasks, *client.protocol.tasks, client._client_task)
        pending: set[asyncio.Future[Any]] = {t for t in every if not t.done()}
        for t in pending:
            t.cancel()
        transport = client.protocol.transport
        if transport is not None:
            # After LOGOUT or a failure there is nothing left to say: abort rather than
            # wait for a TLS close_notify that a peer may never send, so the socket is
            # really closed when we return (else: ResourceWarning when the loop closes).
            transport.abort()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        await asyncio.sleep(0)  # the transport closes its socket in the next loop turn


# --------------------------------------------------------------------------- connecting


async def imap_connect(
    host: str,
    port: int,
    tls: Tls,
    user: str,
    password: str,
    timeout: float,  # noqa: ASYNC109 - aioimaplib's per-command timeout, and ours per step
    *,
    ssl_context: ssl.SSLContext | None = None,
    on_connection_lost: Callable[[Exception | None], None] | None = None,
) -> aioimaplib.IMAP4:
    """A logged-in aioimaplib client, or a TemporaryDeliveryError.

    ``tls``: ``"tls"`` connects with TLS (IMAPS), ``"starttls"`` upgrades before LOGIN and
    refuses to go on in clear text, ``"none"`` is for loopback.  ``ssl_context`` defaults to
    the system trust store.  ``on_connection_lost`` is called when the socket closes —
    aioimaplib itself would leave pending commands waiting forever, so a caller that keeps
    the client should race every await against it.  Close with :func:`imap_disconnect`.

    A rejected LOGIN is *temporary*: the password is the operator's to fix, and mail
    must wait for that fix rather than be recorded as undeliverable.  It is logged at
    ERROR so that it is fixed soon.
    """
    session = await _connect(
        host, port, tls, user, password, timeout, ssl_context, on_connection_lost
    )
    return session.client


async def _connect(
    host: str,
    port: int,
    tls: Tls,
    user: str,
    password: str,
    timeout: float,  # noqa: ASYNC109
    ssl_context: ssl.SSLContext | None = None,
    on_connection_lost: Callable[[Exception | None], None] | None = None,
) -> _Session:
    if tls != "none" and ssl_context is None:
        ssl_context = ssl.create_default_context()
    lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(exc: Exception | None) -> None:
        if not lost.done():
            lost.set_result(None)
        if on_connection_lost is not None:
            on_connection_lost(exc)

    # IMAP4 with ssl_context rather than IMAP4_SSL: only IMAP4 takes conn_lost_cb.
    client = aioimaplib.IMAP4(
        host=host,
        port=port,
        timeout=timeout,
        conn_lost_cb=connection_lost,
        ssl_context=ssl_context if tls == "tls" else None,
    )
    session = _Session(client, timeout, lost)
    where = f"{host}:{port}"
    try:
        await session.call(client.wait_hello_from_server(), f"connect {where}")
        if tls == "starttls":
            assert ssl_context is not None
            await _starttls(session, host, ssl_context)
        # aioimaplib quotes the password but sends the user name as is.
        response = await session.call(client.login(aioimaplib.quoted(user), password), "LOGIN")
        if response.result != "OK":
            text = _text(response)
            log.error("event=imap-login-failed server=%s user=%s reply=%r", where, user, text)
            raise TemporaryDeliveryError(f"IMAP {where}: LOGIN as {user} refused: {text}")
    except BaseException:
        await session.close()
        raise
    return session


async def _starttls(session: _Session, host: str, ctx: ssl.SSLContext) -> None:
    """RFC 3501 §6.2.1 STARTTLS, which aioimaplib lacks: upgrade the transport in place."""
    protocol = session.client.protocol
    if "STARTTLS" not in protocol.capabilities:
        # Configured for TLS: never fall back to sending the password in clear.
        raise TemporaryDeliveryError(f"IMAP {host}: server does not offer STARTTLS")
    command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
    response = await session.call(protocol.execute(command), "STARTTLS")
    if response.result != "OK":
        raise TemporaryDeliveryError(f"IMAP {host}: STARTTLS refused: {_text(response)}")
    loop = asyncio.get_running_loop()
    protocol.transport = await session.call(
        loop.start_tls(protocol.transport, protocol, ctx, server_hostname=host), "TLS handshake"
    )
    # Capabilities learnt in clear text must be forgotten (a man in the middle could have
    # stripped or added some); ask again over TLS.
    await session.call(protocol.capability(), "CAPABILITY")


async def imap_disconnect(client: aioimaplib.IMAP4, timeout: float) -> None:  # noqa: ASYNC109
    """LOGOUT (bounded) and close a client from :func:`imap_connect` for good; never raises.

    Use it instead of a bare ``logout()``: aioimaplib leaves the socket to close whenever
    the server gets round to it, and its internal tasks pending.
    """
    lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    transport = client.protocol.transport
    if transport is None or transport.is_closing():
        lost.set_result(None)
    await _Session(client, timeout, lost).close()


# --------------------------------------------------------------------------- delivering


async def deliver_imap(
    settings: DeliverySettings, raw: bytes, *, message_id: str, flags: str = ""
) -> None:
    """APPEND ``raw`` to ``settings.mailbox`` unless a message with ``message_id`` is there.

    Idempotent so that a crash between APPEND and the outbox bookkeeping never stores a
    second copy: the mailbox is searched for the Message-ID first and the hits are compared
    exactly (IMAP SEARCH matches substrings, case-insensitively).  The mailbox is created
    when missing.  ``flags`` is an IMAP flag list such as ``\\Seen`` (empty: unread).
    Two deliveries of the same message running *at the same time* can still both append;
    the outbox's lease makes that rare.

    Classification, by whose fault the failure is:

    * the message's — BAD, or NO with TOOBIG/LIMIT/PARSE: permanent, since no
      retry can store it;
    * the account's or server's — LOGIN refused, mailbox neither selectable nor
      creatable, quota full, other NO, timeouts, lost connections: temporary, so queued
      mail flows by itself once ops fix the password, mailbox or quota (the outbox
      lifetime still bounds the wait).  Such failures are logged loudly.
    """
    if not settings.user or settings.password is None:
        raise TemporaryDeliveryError("IMAP delivery has no user/password configured")
    where = f"{settings.host}:{settings.port}"
    mailbox = aioimaplib.quoted(encode_mailbox(settings.mailbox))
    # IMAP literals are RFC 5322 messages: CRLF line ends (Cyrus rejects bare LF).
    message = _EOL.sub(b"\r\n", raw)
    key = _id_core(message_id)
    if not key:
        log.warning("event=imap-no-message-id mailbox=%s: duplicates cannot be detected", mailbox)
    elif _id_core(_header(message, "Message-ID")) != key:
        log.warning(
            "event=imap-message-id-mismatch msgid=%s: not the message's own Message-ID, "
            "duplicates cannot be detected later",
            message_id,
        )

    session = await _connect(
        settings.host,
        settings.port,
        settings.tls,
        settings.user,
        settings.password.get(),
        settings.timeout,
        client_ssl_context(settings.tls_ca_file),
    )
    client = session.client
    try:
        response = await session.call(client.select(mailbox), f"SELECT {mailbox}")
        if response.result == "OK":
            if key and await _already_there(session, key):
                log.info("event=imap-duplicate-skipped mailbox=%s msgid=%s", mailbox, message_id)
                return
        else:
            # Dovecot answers a plain NO for a missing mailbox (no [NONEXISTENT]), so try
            # to create it; a new mailbox cannot hold a copy, so no search is needed.
            await _create(session, mailbox, _text(response))

        append = client.append(message, mailbox=mailbox, flags=flags or None)
        response = await session.call(append, "APPEND")
        if response.result == "NO" and _code(response) == b"TRYCREATE":
            # Deleted between SELECT and APPEND (RFC 3501 §6.3.11): create once, retry once.
            await _create(session, mailbox, _text(response))
            append = client.append(message, mailbox=mailbox, flags=flags or None)
            response = await session.call(append, "APPEND")
        _classify_append(response, where, mailbox)
        log.info(
            "event=imap-appended mailbox=%s msgid=%s reply=%r", mailbox, message_id, _text(response)
        )
    finally:
        await session.close()


async def _create(session: _Session, mailbox: str, why: str) -> None:
    response = await session.call(session.client.create(mailbox), f"CREATE {mailbox}")
    if response.result == "OK":
        log.info("event=imap-mailbox-created mailbox=%s", mailbox)
        return
    # It exists but cannot be selected, or cannot be created: the account's setup is wrong
    # (name, permissions).  Temporary — see deliver_imap — and loud.
    text = _text(response)
    log.error("event=imap-mailbox-unusable mailbox=%s select=%r create=%r", mailbox, why, text)
    raise TemporaryDeliveryError(f"IMAP mailbox {mailbox} unusable: {why}; CREATE: {text}")


async def _already_there(session: _Session, key: str) -> bool:
    """Whether the selected mailbox holds a message whose Message-ID is exactly ``key``."""
    client = session.client
    search = client.uid_search("HEADER", "Message-ID", aioimaplib.quoted(key))
    response = await session.call(search, "UID SEARCH")
    if response.result != "OK":
        # Appending blindly could duplicate; the server is unwell anyway, so retry later.
        raise TemporaryDeliveryError(f"IMAP UID SEARCH failed: {_text(response)}")
    # aioimaplib strips "* SEARCH" and hands over the numbers; the last line is the
    # tagged OK text.
    uids = [
        token.decode()
        for line in response.lines[:-1]
        if isinstance(line, bytes | bytearray)
        for token in bytes(line).split()
        if token.isdigit()
    ]
    if not uids:
        return False
    # SEARCH HEADER is a case-insensitive substring match: <a@b> also finds <A@B.c>.
    # Skipping delivery on such a near miss would lose mail, so compare exactly.
    fetch = client.uid("fetch", ",".join(uids), "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    response = await session.call(fetch, "UID FETCH")
    if response.result != "OK":
        raise TemporaryDeliveryError(f"IMAP UID FETCH failed: {_text(response)}")
    return any(
        _id_core(_header(bytes(part), "Message-ID")) == key
        for part in response.lines
        if isinstance(part, bytearray)  # aioimaplib hands literals over as bytearray
    )


def _classify_append(response: Any, where: str, mailbox: str) -> None:
    if response.result == "OK":
        return
    text = _text(response)
    msg = f"IMAP {where} APPEND to {mailbox}: {response.result} {text}"
    if response.result == "BAD" or _code(response) in _PERMANENT_CODES:
        # BAD: the server rejects our command as sent (size, syntax) — deterministic.
        raise PermanentDeliveryError(msg)
    if _code(response) == b"OVERQUOTA":
        log.error("event=imap-over-quota server=%s mailbox=%s reply=%r", where, mailbox, text)
    raise TemporaryDeliveryError(msg)


# --------------------------------------------------------------------------- helpers


def encode_mailbox(name: str) -> str:
    """A mailbox name in IMAP's modified UTF-7 (RFC 3501 §5.1.3), e.g. ``Entw&APw-rfe``."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            b64 = base64.b64encode("".join(pending).encode("utf-16-be")).decode()
            out.append("&" + b64.rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def _text(response: Any) -> str:
    """The text of a tagged reply (aioimaplib puts it last in ``lines``)."""
    lines = getattr(response, "lines", None) or [b""]
    last = lines[-1]
    return bytes(last).decode("utf-8", "replace") if isinstance(last, bytes | bytearray) else ""


def _code(response: Any) -> bytes | None:
    """The response code of a tagged reply: ``TRYCREATE`` for ``NO [TRYCREATE] ...``."""
    lines = getattr(response, "lines", None) or [b""]
    last = lines[-1]
    m = _CODE.match(bytes(last)) if isinstance(last, bytes | bytearray) else None
    return m.group(1) if m else None


def _header(message: bytes, name: str) -> str:
    """One header of ``message``, parsed leniently (compat32 never raises on odd ids)."""
    value = BytesHeaderParser(policy=compat32).parsebytes(message).get(name)
    return str(value) if value is not None else ""


def _id_core(message_id: str) -> str:
    """``<abc@example>`` -> ``abc@example``: unfolded, trimmed, without the angle brackets."""
    core = re.sub(r"\s+", "", message_id)
    if core.startswith("<") and core.endswith(">"):
        core = core[1:-1]
    return core
