"""The one hardened IMAP client: open a logged-in session (TLS, STARTTLS, LOGIN), run commands
with every await bounded, tear the session down for good — for the IMAP watcher (ingest) and
IMAP APPEND delivery alike, plus the helpers that read aioimaplib's responses.

aioimaplib traps handled here (DESIGN §6):

* it never fails a pending command when the connection drops, and it can hang in IDLE when
  the server says BYE (#110): so every await races a timeout and the session's ``ended``
  event, which the socket closing and an untagged ``BYE`` both set;
* it hands an untagged line only to a pending command of the same name and drops the rest
  (an ``EXISTS`` that comes with a SEARCH or FETCH reply is lost): so every untagged line is
  looked at first, and ``new_mail`` remembers each ``EXISTS``;
* its default 10 s timeout also covers a big FETCH or APPEND: so it is set to the session's
  timeout instead;
* it has no STARTTLS: so the transport is upgraded here.

A session is never reused after an error: the caller closes it and opens a new one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import aioimaplib

from mailrouter.config import DeliverySettings, ImapWatchSettings, Secret, client_ssl_context
from mailrouter.log import event

__all__ = [
    "ImapError",
    "ImapServer",
    "ImapSession",
    "Tls",
    "connect",
    "encode_mailbox",
    "fetched_literals",
    "imap_connect",
    "imap_disconnect",
    "mailbox_arg",
    "quoted",
    "response_code",
    "response_text",
    "search_uids",
    "uidvalidity",
]

log = logging.getLogger("mailrouter.imapclient")

T = TypeVar("T")
Tls = Literal["none", "starttls", "tls"]
# Where and as whom to log in: an account's [delivery] table (APPEND) or its [imap] table
# (the watcher) — both carry host, port, tls, user, password, timeout and tls_ca_file.
ImapServer = DeliverySettings | ImapWatchSettings

# LOGOUT on the way out is a courtesy: never let it hold up a shutdown or a reconnect.
LOGOUT_TIMEOUT = 5.0
# How long teardown waits for aioimaplib's cancelled tasks and for the socket to close.
TEARDOWN_WAIT = 1.0

_EXISTS_RE = re.compile(rb"^\* \d+ EXISTS\b", re.IGNORECASE)
_BYE_RE = re.compile(rb"^\* BYE\b", re.IGNORECASE)
_CODE_RE = re.compile(r"^\[([A-Za-z-]+)")
_UIDVALIDITY_RE = re.compile(rb"\[UIDVALIDITY (\d+)\]", re.IGNORECASE)
_FETCH_LITERAL_RE = re.compile(rb"^\d+ FETCH \(.*\{(\d+)\}$", re.IGNORECASE)
_UID_ITEM_RE = re.compile(rb"\bUID (\d+)\b", re.IGNORECASE)


class ImapError(Exception):
    """The session cannot go on (timed out, connection lost, BYE, refused): a new one may work.

    Callers classify it at their edge: the watcher reconnects, delivery retries later.
    """


# --------------------------------------------------------------------------- the session


class ImapSession:
    """An aioimaplib client plus what aioimaplib does not track for us.

    ``ended`` is set when the socket closes, on an untagged ``BYE``, or by :meth:`end`; from
    then on every command fails at once.  ``closed`` is set when the socket has closed.
    ``new_mail`` by every untagged ``EXISTS``, whichever command it came with (the caller
    clears it).  ``abandoned`` holds the awaits we gave up on: cancelling one may not finish
    while aioimaplib's welcome task holds its state lock (it waits for a CAPABILITY reply a
    dead server never sends), so :meth:`close` cancels aioimaplib's own tasks too and only
    then waits, bounded, for everything to wind down.

    Constructing one takes the client over (its connection-lost callback and its untagged
    line handler); :func:`connect` does that before the connection is even made.
    """

    def __init__(
        self,
        client: Any,
        timeout: float,
        *,
        on_untagged: Callable[[ImapSession, bytes], None] | None = None,
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.ended = asyncio.Event()
        self.closed = asyncio.Event()
        self.new_mail = asyncio.Event()
        self.reason = "closed by the server"
        # A command was abandoned or failed: aioimaplib's state is unknown, say nothing more.
        self.broken = False
        self.abandoned: set[asyncio.Future[Any]] = set()
        # The same as ``ended``, as a future that commands can be raced against directly.
        self._ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        protocol = client.protocol
        protocol.conn_lost_cb = self._connection_lost
        original = protocol._untagged_response

        def untagged(line: bytes) -> Any:
            if _EXISTS_RE.match(line):
                self.new_mail.set()
            elif _BYE_RE.match(line):
                self.end("server said " + line[2:].decode("utf-8", "replace").strip())
            if on_untagged is not None:
                on_untagged(self, line)
            return original(line)

        protocol._untagged_response = untagged

    def end(self, reason: str) -> None:
        """Mark the session over (the first reason wins): pending and later commands fail."""
        if not self.ended.is_set():
            self.reason = reason
            self.ended.set()
            self._ended.set_result(None)

    def _connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        self.end(str(exc) if exc else "closed by the server")

    def has(self, capability: str) -> bool:
        return bool(self.client.has_capability(capability))

    @property
    def usable(self) -> bool:
        """Logged in or about to, no command failed, and the server is still there."""
        return (
            not self.ended.is_set()
            and not self.broken
            and self.client.get_state() in ("NONAUTH", "AUTH", "SELECTED")
        )

    def _lost(self, what: str) -> ImapError:
        return ImapError(f"IMAP connection lost during {what}: {self.reason}")

    async def run(self, aw: Awaitable[T], what: str, limit: float | None = None) -> T:
        """Await ``aw`` for at most ``limit`` seconds (default: the session's timeout).

        Gives up at once when the session ends.  Every failure that a new session might not
        have — timeouts, a lost connection, BYE, socket and TLS errors, aioimaplib's own
        exceptions — is an :class:`ImapError`.
        """
        task = asyncio.ensure_future(aw)
        if self.ended.is_set():
            self._abandon(task)
            raise self._lost(what)
        limit = self.timeout if limit is None else limit
        waiters: set[asyncio.Future[Any]] = {task, self._ended}
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        if task not in done:
            self._abandon(task)
            if self.ended.is_set():
                raise self._lost(what)
            raise ImapError(f"IMAP {what} timed out after {limit:g} s")
        try:
            return task.result()
        except TimeoutError as exc:  # aioimaplib's own wait_for (self.timeout) fired first
            self.broken = True
            raise ImapError(f"IMAP {what} timed out after {self.timeout:g} s") from exc
        except (OSError, aioimaplib.AioImapException) as exc:
            # aioimaplib's Abort/Error/CommandTimeout and socket errors all mean the same
            # here: this client cannot be trusted any more.
            self.broken = True
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise ImapError(f"IMAP {what}: {detail}") from exc

    async def ok(self, aw: Awaitable[Any], what: str, limit: float | None = None) -> Any:
        """Like :meth:`run`, and the tagged response must be OK."""
        resp = await self.run(aw, what, limit)
        if resp.result != "OK":
            raise ImapError(f"IMAP {what}: {resp.result} {response_text(resp)}")
        return resp

    def _abandon(self, task: asyncio.Future[Any]) -> None:
        self.broken = True
        task.cancel()
        # Retrieve whatever it ends with, so asyncio does not log "never retrieved".
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self.abandoned.add(task)

    def drain_pushes(self) -> None:
        """Forget what aioimaplib queued during IDLE (``new_mail`` tracks EXISTS for us)."""
        queue = self.client.protocol.idle_queue
        while not queue.empty():
            queue.get_nowait()

    async def close(self, *, logout: bool = True) -> None:
        """LOGOUT (bounded) if asked and still :attr:`usable`, then tear everything down.

        Never raises.  Not CLOSE: that would silently expunge messages marked ``\\Deleted``.
        """
        client = self.client
        if logout and self.usable:
            with contextlib.suppress(ImapError):
                await self.run(client.logout(), "LOGOUT", limit=min(self.timeout, LOGOUT_TIMEOUT))
        # aioimaplib's IDLE timer and command timers would otherwise fire into a dead session.
        if client._idle_waiter is not None:
            client._idle_waiter.cancel()
        protocol = client.protocol
        for cmd in (protocol.pending_sync_command, *protocol.pending_async_commands.values()):
            if cmd is not None:
                cmd._timer.cancel()
        # Our abandoned awaits, aioimaplib's own tasks, and the connect itself.
        every = (*self.abandoned, *client.tasks, *protocol.tasks, client._client_task)
        pending: set[asyncio.Future[Any]] = {t for t in every if not t.done()}
        for t in pending:
            t.cancel()
        transport = protocol.transport
        if transport is not None and not self.closed.is_set():
            # After LOGOUT or a failure there is nothing left to say: abort rather than wait
            # for a TLS close_notify that a peer may never send.
            transport.abort()
        if pending:
            await asyncio.wait(pending, timeout=TEARDOWN_WAIT)
        if transport is not None:
            # Let connection_lost run (it closes the socket) before anyone closes the loop,
            # else: ResourceWarning.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), timeout=TEARDOWN_WAIT)

    async def _starttls(self, host: str, ctx: ssl.SSLContext) -> None:
        """RFC 3501 §6.2.1 STARTTLS, which aioimaplib lacks: upgrade the transport in place."""
        protocol = self.client.protocol
        if "STARTTLS" not in protocol.capabilities:
            # Configured for TLS: never fall back to sending the password in clear.
            raise ImapError(f"IMAP {host}: server does not offer STARTTLS")
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        response = await self.run(protocol.execute(command), "STARTTLS")
        if response.result != "OK":
            raise ImapError(f"IMAP {host}: STARTTLS refused: {response_text(response)}")
        loop = asyncio.get_running_loop()
        protocol.transport = await self.run(
            loop.start_tls(protocol.transport, protocol, ctx, server_hostname=host),
            "TLS handshake",
        )
        # Capabilities learnt in clear text must be forgotten (a man in the middle could have
        # stripped or added some); ask again over TLS.
        await self.run(protocol.capability(), "CAPABILITY")


# --------------------------------------------------------------------------- connecting


async def connect(
    server: ImapServer,
    *,
    ssl_context: ssl.SSLContext | None = None,
    on_untagged: Callable[[ImapSession, bytes], None] | None = None,
) -> ImapSession:
    """A session logged in to ``server``, or an :class:`ImapError`; every step is bounded by
    ``server.timeout``, which also becomes aioimaplib's per-command timeout.

    ``server.tls``: ``"tls"`` connects with TLS (IMAPS), ``"starttls"`` upgrades before LOGIN
    and refuses to go on in clear text, ``"none"`` is for loopback.  Certificates are checked
    with ``ssl_context`` if given, else against ``server.tls_ca_file`` if set, else against
    the system trust store.
    ``on_untagged`` sees every untagged line first (the watcher ends a session on an
    untagged NO).  Close with :meth:`ImapSession.close`.

    A rejected LOGIN is logged at ERROR: the password is the operator's to fix, soon.
    """
    tls, timeout = server.tls, server.timeout
    if ssl_context is None and tls != "none":
        ssl_context = client_ssl_context(server.tls_ca_file) or ssl.create_default_context()
    # IMAP4 with ssl_context rather than IMAP4_SSL: the same class for all three modes.
    client = aioimaplib.IMAP4(
        host=server.host,
        port=server.port,
        timeout=timeout,
        ssl_context=ssl_context if tls == "tls" else None,
    )
    # Taken over before the first await, so before the connection is made.
    session = ImapSession(client, timeout, on_untagged=on_untagged)
    where, user = f"{server.host}:{server.port}", server.user or ""
    try:
        await session.run(client.wait_hello_from_server(), f"connect {where}")
        if tls == "starttls":
            assert ssl_context is not None
            await session._starttls(server.host, ssl_context)
        password = server.password.get() if server.password is not None else ""
        # aioimaplib quotes the password but sends the user name as is.
        response = await session.run(client.login(quoted(user), password), "LOGIN")
        if response.result != "OK":
            text = response_text(response)
            event(log, "imap-login-failed", logging.ERROR, server=where, user=user, reply=text)
            raise ImapError(f"IMAP {where}: LOGIN as {user} refused: {text}")
    except BaseException:
        await session.close()
        raise
    return session


async def imap_connect(
    host: str,
    port: int,
    tls: Tls,
    user: str,
    password: str,
    timeout: float,  # noqa: ASYNC109 - aioimaplib's per-command timeout, and ours per step
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> Any:
    """A logged-in plain aioimaplib client (see :func:`connect`); close it with
    :func:`imap_disconnect`.  For code that drives aioimaplib itself: its awaits are no longer
    bounded, so prefer an :class:`ImapSession`."""
    server = DeliverySettings(
        type="imap",
        host=host,
        port=port,
        tls=tls,
        user=user,
        password=Secret("inline", password),
        timeout=timeout,
    )
    return (await connect(server, ssl_context=ssl_context)).client


async def imap_disconnect(client: Any, timeout: float) -> None:  # noqa: ASYNC109
    """LOGOUT (bounded) and close a client from :func:`imap_connect` for good; never raises.

    Use it instead of a bare ``logout()``: aioimaplib leaves the socket to close whenever
    the server gets round to it, and its internal tasks pending.
    """
    await ImapSession(client, timeout).close()


# --------------------------------------------------------------------------- responses


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


def quoted(text: str) -> str:
    """``text`` as an IMAP quoted string (aioimaplib quotes only the LOGIN password)."""
    return str(aioimaplib.quoted(text))


def mailbox_arg(name: str) -> str:
    """``name`` as an IMAP mailbox argument: modified UTF-7, quoted (aioimaplib does not)."""
    return quoted(encode_mailbox(name))


def response_text(response: Any) -> str:
    """The server's words in a tagged reply (aioimaplib puts them last in ``lines``)."""
    lines = getattr(response, "lines", None) or [b""]
    last = lines[-1]
    return bytes(last).decode("utf-8", "replace") if isinstance(last, bytes | bytearray) else ""


def response_code(response: Any) -> str | None:
    """The response code of a tagged reply: ``TRYCREATE`` for ``NO [TRYCREATE] ...``."""
    m = _CODE_RE.match(response_text(response))
    return m.group(1).upper() if m else None


def search_uids(response: Any) -> list[int]:
    """UIDs in a SEARCH reply (aioimaplib leaves "1 2 3" after stripping ``* SEARCH``)."""
    out: list[int] = []
    for line in response.lines[:-1]:  # the last line is the tagged status text
        if isinstance(line, bytes | bytearray):
            out += [int(tok) for tok in bytes(line).split() if tok.isdigit()]
    return out


def uidvalidity(response: Any) -> int | None:
    """The ``[UIDVALIDITY n]`` a SELECT reply carries, if any."""
    found = None
    for line in response.lines:
        if isinstance(line, bytes | bytearray):
            m = _UIDVALIDITY_RE.search(bytes(line))
            if m:
                found = int(m.group(1))
    return found


def fetched_literals(response: Any) -> dict[int, bytes]:
    """The literal (body or header section) of each message in a UID FETCH reply, by UID.

    aioimaplib hands a literal over as the item after its ``n FETCH (... {size}`` line, as a
    bytearray; the UID item may come before or after it.  Unsolicited FETCH responses (flag
    changes by another client) can share the reply: they carry no literal and are skipped.
    """
    out: dict[int, bytes] = {}
    lines = response.lines
    for i, line in enumerate(lines[:-2]):
        m = _FETCH_LITERAL_RE.search(line) if isinstance(line, bytes) else None
        literal = lines[i + 1]
        if m is None or not isinstance(literal, bytes | bytearray):
            continue
        rest = lines[i + 2] if isinstance(lines[i + 2], bytes) else b""
        found = _UID_ITEM_RE.search(line) or _UID_ITEM_RE.search(rest)
        if found is None:
            continue
        uid = int(found.group(1))
        if len(literal) != int(m.group(1)):
            raise ImapError(f"IMAP UID FETCH {uid}: literal shorter than announced")
        out[uid] = bytes(literal)
    return out
