"""Stage 1 over IMAP: watch one account's mailbox (IDLE, polling fallback) and hand every new
message to the pipeline — persist first, then touch the server.

A message is read with ``BODY.PEEK[]`` (the watcher never sets ``\\Seen``), committed by
:meth:`Pipeline.accept`, and only after that commit, when its conversation now belongs to
another account, moved into the routed folder (the outbox puts the copy into the owner's
mailbox).  The UID high-water mark is stored last, so a crash anywhere re-reads the message
and ingest's idempotency (Message-ID + content hash) makes the second read a no-op.

aioimaplib is used defensively (DESIGN §6): it can hang in IDLE when the server says BYE,
never fails pending commands when the connection drops, and drops ``EXISTS`` that arrive
with another command's response.  So every await is raced against a timeout and against
our own "connection gone" event, ``EXISTS``/``BYE`` are watched at the protocol level, and a
client is never reused after an error: the watcher abandons it and reconnects with a fresh
one after a capped, jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aioimaplib
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from mailrouter.config import AccountSettings, ImapWatchSettings, client_ssl_context
from mailrouter.deliver.errors import DeliveryError
from mailrouter.deliver.imap_append import encode_mailbox, imap_connect
from mailrouter.log import event
from mailrouter.parse import format_id, parse_ids
from mailrouter.pipeline import Accepted, Pipeline, StoreUnavailable
from mailrouter.retry import backoff, wait_first
from mailrouter.store.models import ImapState, Message, utcnow

__all__ = ["ImapWatcher", "WatchError"]

log = logging.getLogger("mailrouter.ingest.imap")

T = TypeVar("T")

RECONNECT_INITIAL = 1.0
RECONNECT_CAP = 60.0
# aioimaplib's own FETCH timer restarts with every chunk received, so it catches a stalled
# transfer after ``timeout`` seconds; this outer bound only has to let a large message
# finish on a slow link (25 MB at 100 kB/s).
FETCH_DEADLINE = 300.0
# LOGOUT on the way out is a courtesy: never let it hold up a shutdown or a reconnect.
LOGOUT_TIMEOUT = 5.0

_EXISTS_RE = re.compile(rb"^\* \d+ EXISTS\b", re.IGNORECASE)
# BYE ends the session; an untagged NO or BAD outside a command's reply is the server
# telling us its side of the session is broken — Dovecot answers a watched mailbox
# deleted and re-created under an IDLE with "* NO Internal error occurred" and then keeps
# serving the old, stale view.  Either way this session cannot be trusted any more.
_SESSION_OVER_RE = re.compile(rb"^\* (BYE|NO|BAD)\b", re.IGNORECASE)
_UIDVALIDITY_RE = re.compile(rb"\[UIDVALIDITY (\d+)\]", re.IGNORECASE)
_FETCH_LITERAL_RE = re.compile(rb"^\d+ FETCH \(.*\{(\d+)\}$", re.IGNORECASE)
_UID_ITEM_RE = re.compile(rb"\bUID (\d+)\b", re.IGNORECASE)


class WatchError(Exception):
    """The IMAP session cannot go on (refused, timed out, lost, BYE, NO): reconnect."""


def _mailbox_arg(name: str) -> str:
    """``name`` as an IMAP mailbox argument: modified UTF-7, quoted (aioimaplib does not)."""
    return str(aioimaplib.quoted(encode_mailbox(name)))


def _text(resp: Any) -> str:
    """The server's words from a response (its last line is the tagged status text)."""
    lines = getattr(resp, "lines", None) or [b""]
    last = lines[-1]
    return bytes(last).decode("utf-8", "replace") if isinstance(last, bytes | bytearray) else ""


class _Connection:
    """One logged-in aioimaplib client and what we know about it; never reused after an error.

    ``closed`` is set when the transport's socket is closed; ``gone`` then too, and already
    by an untagged ``BYE``, ``NO`` or ``BAD`` (after which a server may keep the socket open
    and say nothing more);
    ``new_mail`` by every untagged ``EXISTS``, whichever command it came with.
    """

    def __init__(self, cfg: ImapWatchSettings) -> None:
        self.cfg = cfg
        self.client: Any = None
        self.gone = asyncio.Event()
        self.closed = asyncio.Event()
        self.new_mail = asyncio.Event()
        self.reason = "connection lost"

    def attach(self, client: Any) -> None:
        """Take over a logged-in client (its connection-lost callback is already ours)."""
        self.client = client
        protocol = client.protocol
        # aioimaplib hands an untagged line to the pending command with the same name, or
        # drops it; an EXISTS sent with a SEARCH or FETCH response (Dovecot does) would be
        # lost and a message delivered just before IDLE would wait for the next re-IDLE.
        # Looking at every untagged line first means no EXISTS and no BYE goes unnoticed.
        original = protocol._untagged_response

        def untagged(line: bytes) -> Any:
            if _EXISTS_RE.match(line):
                self.new_mail.set()
            elif _SESSION_OVER_RE.match(line) and not self.gone.is_set():
                self.reason = "server said " + line[2:].decode("utf-8", "replace").strip()
                self.gone.set()
            return original(line)

        protocol._untagged_response = untagged

    def lost(self, exc: Exception | None) -> None:
        self.closed.set()
        if not self.gone.is_set():
            self.reason = f"connection lost: {exc}" if exc else "connection closed by server"
            self.gone.set()

    def has(self, capability: str) -> bool:
        return bool(self.client.has_capability(capability))

    async def run(self, aw: Awaitable[T], what: str, limit: float | None = None) -> T:
        """Await ``aw``, but give up when it times out or the connection goes away."""
        task = asyncio.ensure_future(aw)
        if self.gone.is_set():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise WatchError(f"{what}: {self.reason}")
        gone = asyncio.ensure_future(self.gone.wait())
        limit = self.cfg.timeout if limit is None else limit
        try:
            done, _ = await asyncio.wait(
                {task, gone}, timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for t in (task, gone):
                if not t.done():
                    t.cancel()
            await asyncio.gather(task, gone, return_exceptions=True)
        if task in done:
            try:
                return task.result()
            except (TimeoutError, OSError, aioimaplib.AioImapException) as exc:
                # aioimaplib's Abort/Error/CommandTimeout and socket errors all mean the
                # same here: this client cannot be trusted any more.
                raise WatchError(f"{what}: {type(exc).__name__}: {exc}") from exc
        if gone in done:
            raise WatchError(f"{what}: {self.reason}")
        raise WatchError(f"{what}: no answer within {limit:g}s")

    async def ok(self, aw: Awaitable[Any], what: str, limit: float | None = None) -> Any:
        """Like :meth:`run`, and the tagged response must be OK."""
        resp = await self.run(aw, what, limit)
        if resp.result != "OK":
            raise WatchError(f"{what}: {resp.result} {_text(resp)}")
        return resp

    def drain_pushes(self) -> None:
        """Forget what aioimaplib queued during IDLE (we track EXISTS ourselves)."""
        queue = self.client.protocol.idle_queue
        while not queue.empty():
            queue.get_nowait()

    async def close(self, *, logout: bool) -> None:
        """LOGOUT if the session is healthy, then close the socket and cancel leftovers."""
        client = self.client
        if client is None:
            return  # imap_connect failed and has cleaned up after itself
        if logout and not self.gone.is_set():
            with contextlib.suppress(WatchError):
                await self.run(client.logout(), "LOGOUT", limit=LOGOUT_TIMEOUT)
        waiter = getattr(client, "_idle_waiter", None)
        if waiter is not None:
            waiter.cancel()
        protocol = client.protocol
        commands = [protocol.pending_sync_command, *protocol.pending_async_commands.values()]
        for cmd in commands:
            if cmd is not None:
                cmd._timer.cancel()
        leftovers = [t for t in (*client.tasks, *protocol.tasks) if not t.done()]
        connecting = getattr(client, "_client_task", None)
        if connecting is not None and not connecting.done():
            leftovers.append(connecting)
        for t in leftovers:
            t.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)
        transport = protocol.transport
        if transport is not None and not transport.is_closing():
            transport.close()
        if transport is not None:
            # Let connection_lost run (it closes the socket) before anyone closes the loop;
            # a TLS peer that never answers our close_notify is cut off.
            try:
                await asyncio.wait_for(self.closed.wait(), timeout=1.0)
            except TimeoutError:
                transport.abort()


class ImapWatcher:
    """Watches ``account.imap.mailbox`` until ``stop`` is set; one per watched account."""

    def __init__(
        self,
        pipeline: Pipeline,
        account: AccountSettings,
        *,
        on_accepted: Callable[[], None] | None = None,
    ) -> None:
        if account.imap is None:
            raise ValueError(f"account {account.name} has no [accounts.{account.name}.imap]")
        self.p = pipeline
        self.account = account
        self.cfg: ImapWatchSettings = account.imap
        self.on_accepted = on_accepted
        self.account_id = pipeline.accounts.id(account.name)
        self._uidvalidity = 0
        self._last_uid = 0
        # What the watcher is doing now (connecting, catching-up, idle, polling,
        # store-backoff, reconnect-backoff, stopped) and how many sessions reached SELECT:
        # for logs, health checks and tests.
        self.state = "new"
        self.sessions = 0

    # ------------------------------------------------------------------ the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, catch up, IDLE (or poll); on any failure reconnect with backoff."""
        loop = asyncio.get_running_loop()
        failures = 0
        since = 0.0
        while not stop.is_set():
            conn: _Connection | None = None
            healthy = clean = False
            error: str | None = None
            try:
                self.state = "connecting"
                conn = await self._connect(stop)
                if conn is None or stop.is_set():
                    clean = True
                    break
                await self._select(conn)
                self.sessions += 1
                healthy, since = True, loop.time()
                await self._watch(conn, stop)
                clean = True
            except (WatchError, StoreUnavailable) as exc:
                error = str(exc)
            except Exception as exc:
                # A bug, not the network: keep the traceback, but the watcher goes on.
                log.exception("imap watcher %s failed unexpectedly", self.account.name)
                error = f"{type(exc).__name__}: {exc}"
            finally:
                if conn is not None:
                    # LOGOUT only from a healthy session that we end: not after an error,
                    # and not when cancelled (the daemon's drain time is already up).
                    await conn.close(logout=clean)
            if stop.is_set():
                break
            # A server that drops every session soon after SELECT must not be hammered:
            # only a session that lived a while ends a run of failures.
            if healthy and loop.time() - since >= RECONNECT_CAP:
                failures = 0
            failures += 1
            delay = backoff(failures, RECONNECT_INITIAL, RECONNECT_CAP)
            self.state = "reconnect-backoff"
            event(
                log,
                "imap-disconnected",
                logging.WARNING,
                account=self.account.name,
                host=f"{self.cfg.host}:{self.cfg.port}",
                error=error or "session ended",
                was_watching=healthy,
                reconnect_in=f"{delay:.1f}s",
            )
            await wait_first(stop.wait(), seconds=delay)
        self.state = "stopped"
        event(log, "imap-stopped", account=self.account.name)

    async def _connect(self, stop: asyncio.Event) -> _Connection | None:
        """A logged-in session, or None if ``stop`` was set first."""
        c = self.cfg
        conn = _Connection(c)
        where = f"{c.host}:{c.port}"
        # Each step inside imap_connect is bounded by ``timeout``; this bounds them all.
        login = asyncio.ensure_future(
            asyncio.wait_for(
                imap_connect(
                    c.host,
                    c.port,
                    c.tls,
                    c.user,
                    c.password.get() if c.password else "",
                    c.timeout,
                    ssl_context=client_ssl_context(c.tls_ca_file),
                    on_connection_lost=conn.lost,
                ),
                timeout=c.timeout * 5,
            )
        )
        await wait_first(login, stop.wait(), seconds=None)
        if login.cancelled():
            return None  # stopped while connecting; imap_connect closed what it had opened
        try:
            client = login.result()
        except DeliveryError as exc:
            raise WatchError(str(exc)) from exc
        except (TimeoutError, OSError) as exc:
            raise WatchError(f"connect {where}: {type(exc).__name__}: {exc}") from exc
        conn.attach(client)
        return conn

    async def _select(self, conn: _Connection) -> None:
        """SELECT the mailbox, and compare its UIDVALIDITY with the one we stored."""
        resp = await conn.ok(
            conn.client.select(_mailbox_arg(self.cfg.mailbox)), f"SELECT {self.cfg.mailbox}"
        )
        found = None
        for line in resp.lines:
            if isinstance(line, bytes | bytearray):
                m = _UIDVALIDITY_RE.search(bytes(line))
                if m:
                    found = int(m.group(1))
        if found is None:
            raise WatchError(f"SELECT {self.cfg.mailbox}: server sent no UIDVALIDITY")
        self._uidvalidity = found
        self._last_uid = await self._store(self._load_state, found)
        event(
            log,
            "imap-connected",
            account=self.account.name,
            host=f"{self.cfg.host}:{self.cfg.port}",
            user=self.cfg.user,
            mailbox=self.cfg.mailbox,
            uidvalidity=found,
            last_uid=self._last_uid,
            mode="idle" if conn.has("IDLE") else f"poll/{self.cfg.poll_interval:g}s",
        )

    async def _watch(self, conn: _Connection, stop: asyncio.Event) -> None:
        """Catch up, then wait for news; returns only when ``stop`` is set."""
        store_failures = 0
        while not stop.is_set():
            try:
                self.state = "catching-up"
                await self._catch_up(conn, stop)
                store_failures = 0
            except StoreUnavailable as exc:
                # Nothing was flagged or moved; the same UIDs are read again after a pause.
                store_failures += 1
                delay = backoff(store_failures, RECONNECT_INITIAL, RECONNECT_CAP)
                event(
                    log,
                    "imap-store-unavailable",
                    logging.WARNING,
                    account=self.account.name,
                    error=str(exc),
                    retry_in=f"{delay:.1f}s",
                )
                self.state = "store-backoff"
                await self._pause(conn, stop, delay)
                if not stop.is_set():
                    await conn.ok(conn.client.noop(), "NOOP")  # is the session still alive?
                continue
            if stop.is_set():
                return
            if conn.has("IDLE"):
                await self._idle(conn, stop)
            else:
                self.state = "polling"
                await self._pause(conn, stop, self.cfg.poll_interval)
                if not stop.is_set():
                    # NOOP lets the server report new messages (EXISTS) before we search.
                    await conn.ok(conn.client.noop(), "NOOP")

    async def _pause(self, conn: _Connection, stop: asyncio.Event, seconds: float) -> None:
        """Sleep ``seconds`` unless stopped; a connection lost meanwhile is an error."""
        await wait_first(stop.wait(), conn.gone.wait(), seconds=seconds)
        if conn.gone.is_set() and not stop.is_set():
            raise WatchError(f"while waiting: {conn.reason}")

    async def _idle(self, conn: _Connection, stop: asyncio.Event) -> None:
        """One IDLE round: until new mail, ``stop``, or ``idle_timeout`` (then re-IDLE)."""
        if conn.new_mail.is_set():
            return  # reported since the last search: catch up first
        conn.drain_pushes()
        client = conn.client
        # aioimaplib's own IDLE timer only queues a marker we do not read; ours is below.
        idle = await conn.run(client.idle_start(timeout=self.cfg.idle_timeout * 2), "IDLE")
        self.state = "idle"
        await wait_first(
            stop.wait(), conn.new_mail.wait(), conn.gone.wait(), seconds=self.cfg.idle_timeout
        )
        if conn.gone.is_set():
            raise WatchError(f"IDLE: {conn.reason}")
        client.idle_done()
        resp = await conn.run(idle, "IDLE DONE")
        if resp.result != "OK":
            raise WatchError(f"IDLE: {resp.result} {_text(resp)}")
        conn.drain_pushes()

    # ------------------------------------------------------------------ catch-up

    async def _catch_up(self, conn: _Connection, stop: asyncio.Event) -> None:
        """Ingest every UID above the stored mark, oldest first, until nothing new arrived."""
        while not stop.is_set():
            conn.new_mail.clear()  # anything reported from here on means "search again"
            low = self._last_uid + 1
            resp = await conn.ok(
                conn.client.uid_search("UID", f"{low}:*", charset=None), f"UID SEARCH {low}:*"
            )
            # "n:*" always matches the highest UID, even one below n (RFC 3501 §6.4.8).
            uids = sorted(u for u in _search_uids(resp) if u > self._last_uid)
            for uid in uids:
                if stop.is_set():
                    return
                await self._ingest(conn, uid)
            if not conn.new_mail.is_set():
                return

    async def _ingest(self, conn: _Connection, uid: int) -> None:
        raw = await self._fetch(conn, uid)
        if raw is None:
            # Expunged by someone else between SEARCH and FETCH: nothing to ingest.
            event(log, "imap-vanished", account=self.account.name, uid=uid)
            await self._store(self._save_uid, uid)
            return
        # accept_async: group-committed on the daemon's writer thread with the other stages.
        result: Accepted = await self.p.accept_async(
            raw, [self.account], source="imap", in_mailbox_of=self.account.name
        )
        # Committed.  From here on a crash only means reading this UID again, which the
        # pipeline recognises as a duplicate.
        if self.on_accepted is not None:
            self.on_accepted()
        moved = None
        if await self._store(self._belongs_elsewhere, result):
            moved = await self._move(conn, uid)
        await self._store(self._save_uid, uid)
        d = result.decision
        ids = parse_ids(_header(raw, b"message-id"))
        event(
            log,
            "imap-message",
            account=self.account.name,
            mailbox=self.cfg.mailbox,
            uid=uid,
            msgid=format_id(ids[0]) if ids else None,
            size=len(raw),
            action=d.action,
            interaction=result.interaction_id,
            owner=d.owner,
            moved_to=moved,
        )

    async def _fetch(self, conn: _Connection, uid: int) -> bytes | None:
        resp = await conn.ok(
            conn.client.uid("fetch", str(uid), "(UID BODY.PEEK[])"),
            f"UID FETCH {uid}",
            limit=max(self.cfg.timeout, FETCH_DEADLINE),
        )
        lines = resp.lines
        for i, line in enumerate(lines[:-2]):
            m = _FETCH_LITERAL_RE.search(line) if isinstance(line, bytes) else None
            literal = lines[i + 1]
            if m is None or not isinstance(literal, bytes | bytearray):
                continue
            # The UID item may come before or after the body.  Unsolicited FETCH responses
            # (flag changes by another client) can share the reply: only ours counts.
            rest = lines[i + 2] if isinstance(lines[i + 2], bytes) else b""
            found = _UID_ITEM_RE.search(line) or _UID_ITEM_RE.search(rest)
            if found is None or int(found.group(1)) != uid:
                continue
            if len(literal) != int(m.group(1)):
                raise WatchError(f"UID FETCH {uid}: short literal")
            return bytes(literal)
        return None

    async def _move(self, conn: _Connection, uid: int) -> str | None:
        """Move ``uid`` into the routed folder (never delete); the folder is made on demand."""
        folder = self.cfg.routed_folder
        for attempt in (1, 2):
            resp = await self._move_once(conn, uid, _mailbox_arg(folder))
            if resp.result == "OK":
                return folder
            if attempt == 1 and "TRYCREATE" in _text(resp).upper():
                await self._create_folder(conn, folder)
                continue
            # The message is committed and its copy queued for the owner; leaving it where
            # it is costs an agent a look, not a message.  Retrying forever would stall
            # the mailbox behind it.
            event(
                log,
                "imap-move-failed",
                logging.WARNING,
                account=self.account.name,
                uid=uid,
                folder=folder,
                error=f"{resp.result} {_text(resp)}",
            )
            return None
        return None

    async def _move_once(self, conn: _Connection, uid: int, target: str) -> Any:
        client = conn.client
        if conn.has("MOVE"):
            return await conn.run(client.uid("move", str(uid), target), f"UID MOVE {uid}")
        resp = await conn.run(client.uid("copy", str(uid), target), f"UID COPY {uid}")
        if resp.result != "OK":
            return resp
        await conn.ok(
            client.uid("store", str(uid), "+FLAGS.SILENT", r"(\Deleted)"), f"UID STORE {uid}"
        )
        if conn.has("UIDPLUS"):
            await conn.ok(client.uid("expunge", str(uid)), f"UID EXPUNGE {uid}")
        # Without UIDPLUS a plain EXPUNGE would also remove what the account's users
        # flagged \Deleted themselves; the copy is safe, the original waits for them.
        return resp

    async def _create_folder(self, conn: _Connection, folder: str) -> None:
        name = _mailbox_arg(folder)
        resp = await conn.run(conn.client.create(name), f"CREATE {folder}")
        if resp.result == "OK":
            event(log, "imap-folder-created", account=self.account.name, folder=folder)
            # Subscribed, so the account's mail clients show where routed mail went.
            await conn.run(conn.client.subscribe(name), f"SUBSCRIBE {folder}")

    # ------------------------------------------------------------------ store (sync, in a thread)

    async def _store(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"imap state: {exc}") from exc

    def _load_state(self, uidvalidity: int) -> int:
        """The stored mark for this mailbox; a new UIDVALIDITY starts again from 0."""
        with self.p.db.write() as s:
            row = s.get(ImapState, (self.account_id, self.cfg.mailbox))
            if row is None:
                s.add(
                    ImapState(
                        account_id=self.account_id,
                        mailbox=self.cfg.mailbox,
                        uidvalidity=uidvalidity,
                        last_uid=0,
                        updated_at=utcnow(),
                    )
                )
                return 0
            if row.uidvalidity != uidvalidity:
                # Every UID we knew is meaningless now.  Reading the whole mailbox again is
                # safe: ingest recognises what it has already stored.
                event(
                    log,
                    "imap-uidvalidity-changed",
                    logging.WARNING,
                    account=self.account.name,
                    mailbox=self.cfg.mailbox,
                    old=row.uidvalidity,
                    new=uidvalidity,
                    old_last_uid=row.last_uid,
                )
                row.uidvalidity, row.last_uid, row.updated_at = uidvalidity, 0, utcnow()
                return 0
            return int(row.last_uid)

    def _save_uid(self, uid: int) -> None:
        with self.p.db.write() as s:
            s.execute(
                update(ImapState)
                .where(
                    ImapState.account_id == self.account_id,
                    ImapState.mailbox == self.cfg.mailbox,
                    ImapState.uidvalidity == self._uidvalidity,
                    ImapState.last_uid < uid,
                )
                .values(last_uid=uid, updated_at=utcnow())
            )
        self._last_uid = max(self._last_uid, uid)

    def _belongs_elsewhere(self, result: Accepted) -> bool:
        """Does this message now live in another account's mailbox (so it leaves ours)?"""
        if result.decision.action == "route":
            return True
        if result.decision.action == "duplicate" and result.message_pk is not None:
            # Read again after a crash between commit and MOVE: the stored row remembers
            # that it was routed away from this account.
            with self.p.db.read() as s:
                row = s.execute(
                    select(Message.account_id, Message.routed_to_account_id).where(
                        Message.id == result.message_pk
                    )
                ).first()
            return (
                row is not None
                and row.routed_to_account_id is not None
                and row.routed_to_account_id != self.account_id
            )
        return False


# ---------------------------------------------------------------------- helpers


def _search_uids(resp: Any) -> list[int]:
    """UIDs in a SEARCH response (aioimaplib leaves "1 2 3" after stripping ``* SEARCH``)."""
    out: list[int] = []
    for line in resp.lines[:-1]:  # the last line is the tagged status text
        if isinstance(line, bytes | bytearray):
            out += [int(tok) for tok in bytes(line).split() if tok.isdigit()]
    return out


def _header(raw: bytes, name: bytes) -> str:
    """First ``name`` header of ``raw`` (unfolded), for the log line only."""
    head = raw.replace(b"\r\n", b"\n").partition(b"\n\n")[0]
    value: list[bytes] = []
    for line in head.split(b"\n"):
        if value and line[:1] in (b" ", b"\t"):
            value.append(line.strip())
            continue
        if value:
            break
        key, sep, rest = line.partition(b":")
        if sep and key.strip().lower() == name:
            value.append(rest.strip())
    return b" ".join(value).decode("utf-8", "replace")
