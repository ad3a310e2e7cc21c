"""Stage 1 over IMAP: watch one account's mailbox (IDLE, polling fallback) and hand every new
message to the pipeline — persist first, then touch the server.

A message is read with ``BODY.PEEK[]`` (the watcher never sets ``\\Seen``), committed by
:meth:`Pipeline.accept`, and only after that commit, when its conversation now belongs to
another account, moved into the routed folder (the outbox puts the copy into the owner's
mailbox).  The UID high-water mark is stored last, so a crash anywhere re-reads the message
and ingest's idempotency (Message-ID + content hash) makes the second read a no-op.

The session itself — timeouts on every await, TLS, LOGIN, BYE and lost connections, the
aioimaplib workarounds — is :mod:`mailrouter.imapclient`; a session is never reused after an
error: the watcher abandons it and reconnects with a fresh one after a capped, jittered
backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from mailrouter import imapclient
from mailrouter.config import AccountSettings, ImapWatchSettings
from mailrouter.imapclient import ImapError, ImapSession
from mailrouter.log import event
from mailrouter.parse import format_id, parse_ids
from mailrouter.pipeline import Accepted, Pipeline, StoreUnavailable
from mailrouter.retry import backoff, wait_first, wait_unless_stopped
from mailrouter.store import imap_state, leases
from mailrouter.store.models import utcnow

__all__ = ["ImapWatcher"]

log = logging.getLogger("mailrouter.ingest.imap")

T = TypeVar("T")

RECONNECT_INITIAL = 1.0
RECONNECT_CAP = 60.0
# aioimaplib's own FETCH timer restarts with every chunk received, so it catches a stalled
# transfer after ``timeout`` seconds; this outer bound only has to let a large message
# finish on a slow link (25 MB at 100 kB/s).
FETCH_DEADLINE = 300.0

# An untagged NO or BAD outside a command's reply is the server telling us its side of the
# session is broken — Dovecot answers a watched mailbox deleted and re-created under an IDLE
# with "* NO Internal error occurred" and then keeps serving the old, stale view.  This
# session cannot be trusted any more (BYE the client notices by itself).
_SESSION_BROKEN_RE = re.compile(rb"^\* (NO|BAD)\b", re.IGNORECASE)


def _end_on_untagged_no(session: ImapSession, line: bytes) -> None:
    if _SESSION_BROKEN_RE.match(line):
        session.end("server said " + line[2:].decode("utf-8", "replace").strip())


class ImapWatcher:
    """Watches ``account.imap.mailbox`` until ``stop`` is set; one per watched account."""

    def __init__(
        self,
        pipeline: Pipeline,
        account: AccountSettings,
        *,
        on_accepted: Callable[[], None] | None = None,
        holder: Callable[[], str | None] | None = None,
    ) -> None:
        """``holder`` names the instance this watcher works for: the mailbox is then
        watched only while that instance holds its lease (one watcher among several
        instances sharing a PostgreSQL store).  Without it, no lease is taken."""
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
        self.holder = holder
        self.lease_name = f"imap:{account.name}:{account.imap.mailbox}"

    # ------------------------------------------------------------------ the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, catch up, IDLE (or poll); on any failure reconnect with backoff."""
        loop = asyncio.get_running_loop()
        failures = 0
        since = 0.0
        while not stop.is_set():
            session: ImapSession | None = None
            renewing: asyncio.Task[None] | None = None
            healthy = clean = False
            error: str | None = None
            try:
                if not await self._hold_lease(stop):
                    break
                self.state = "connecting"
                session = await self._connect(stop)
                if session is None or stop.is_set():
                    clean = True
                    break
                if self.holder is not None:
                    renewing = asyncio.create_task(self._keep_lease(session, stop))
                await self._select(session)
                self.sessions += 1
                healthy, since = True, loop.time()
                await self._watch(session, stop)
                clean = True
            except (ImapError, StoreUnavailable) as exc:
                error = str(exc)
            except Exception as exc:  # noqa: BLE001 - logged with its traceback
                # A bug, not the network: keep the traceback, but the watcher goes on.
                event(
                    log,
                    "imap-watcher-failed",
                    logging.ERROR,
                    exc_info=exc,
                    account=self.account.address,
                )
                error = f"{type(exc).__name__}: {exc}"
            finally:
                if renewing is not None:
                    renewing.cancel()
                    await asyncio.gather(renewing, return_exceptions=True)
                if session is not None:
                    # LOGOUT only from a healthy session that we end: not after an error,
                    # and not when cancelled (the daemon's drain time is already up).
                    await session.close(logout=clean)
            if stop.is_set():
                break
            # A server that drops every session soon after SELECT must not be hammered:
            # only a session that lived a while ends a run of failures.
            if healthy and loop.time() - since >= RECONNECT_CAP:
                failures = 0
            failures += 1
            delay = backoff(failures, RECONNECT_INITIAL, RECONNECT_CAP)
            self.state = "reconnect-backoff"
            self.p.rt.metrics.imap_reconnect(self.account.name)
            event(
                log,
                "imap-disconnected",
                logging.WARNING,
                account=self.account.address,
                host=f"{self.cfg.host}:{self.cfg.port}",
                error=error or "session ended",
                was_watching=healthy,
                reconnect_in=f"{delay:.1f}s",
            )
            await wait_unless_stopped(stop, delay)
        self.state = "stopped"
        await self._release_lease()
        event(log, "imap-stopped", account=self.account.address)

    # ------------------------------------------------------------------ the lease

    async def _hold_lease(self, stop: asyncio.Event) -> bool:
        """Wait until this instance holds the mailbox's lease; False if stopped first."""
        if self.holder is None:
            return True
        ttl, beat = self.p.settings.outbox.dead_after, self.p.settings.outbox.heartbeat
        standby_logged = False
        while not stop.is_set():
            me = self.holder()
            if me is not None and await self._write(
                functools.partial(
                    leases.acquire, name=self.lease_name, holder=me, now=utcnow(), ttl=ttl
                )
            ):
                if standby_logged:
                    event(log, "imap-lease-taken", account=self.account.name, instance=me)
                return True
            if not standby_logged:
                # Another instance watches this mailbox; take over if it stops renewing.
                event(log, "imap-standby", account=self.account.name, lease=self.lease_name)
                standby_logged = True
            self.state = "standby"
            await wait_unless_stopped(stop, beat)
        return False

    async def _keep_lease(self, session: ImapSession, stop: asyncio.Event) -> None:
        """Renew the lease while the session lives; end the session if it was lost."""
        assert self.holder is not None
        ttl, beat = self.p.settings.outbox.dead_after, self.p.settings.outbox.heartbeat
        while not await wait_unless_stopped(stop, beat):
            me = self.holder()
            kept = me is not None and await self._write(
                functools.partial(
                    leases.renew, name=self.lease_name, holder=me, now=utcnow(), ttl=ttl
                )
            )
            if not kept:
                # We were taken for dead and another instance watches now: two watchers
                # would only read twice (ingest is idempotent), but one is the design.
                session.end("IMAP lease lost to another instance")
                return

    async def _release_lease(self) -> None:
        me = self.holder() if self.holder is not None else None
        if me is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._write(lambda s: leases.release(s, self.lease_name, me))

    async def _connect(self, stop: asyncio.Event) -> ImapSession | None:
        """A logged-in session, or None if ``stop`` was set first."""
        # Every step of connect() is bounded by ``timeout``; only ``stop`` needs racing here.
        opening = asyncio.ensure_future(
            imapclient.connect(self.cfg, on_untagged=_end_on_untagged_no)
        )
        await wait_first(opening, stop.wait(), seconds=None)
        if opening.cancelled():
            return None  # stopped while connecting; connect() closed what it had opened
        return opening.result()

    async def _select(self, session: ImapSession) -> None:
        """SELECT the mailbox, and compare its UIDVALIDITY with the one we stored."""
        resp = await session.ok(
            session.client.select(imapclient.mailbox_arg(self.cfg.mailbox)),
            f"SELECT {self.cfg.mailbox}",
        )
        found = imapclient.uidvalidity(resp)
        if found is None:
            raise ImapError(f"IMAP SELECT {self.cfg.mailbox}: server sent no UIDVALIDITY")
        self._uidvalidity = found
        self._last_uid = await self._store(self._load_state, found)
        event(
            log,
            "imap-connected",
            account=self.account.address,
            host=f"{self.cfg.host}:{self.cfg.port}",
            user=self.cfg.user,
            mailbox=self.cfg.mailbox,
            uidvalidity=found,
            last_uid=self._last_uid,
            mode="idle" if session.has("IDLE") else f"poll/{self.cfg.poll_interval:g}s",
        )

    async def _watch(self, session: ImapSession, stop: asyncio.Event) -> None:
        """Catch up, then wait for news; returns only when ``stop`` is set."""
        store_failures = 0
        while not stop.is_set():
            try:
                self.state = "catching-up"
                await self._catch_up(session, stop)
                await self._store(self._synced)
                store_failures = 0
            except StoreUnavailable as exc:
                # Nothing was flagged or moved; the same UIDs are read again after a pause.
                store_failures += 1
                delay = backoff(store_failures, RECONNECT_INITIAL, RECONNECT_CAP)
                event(
                    log,
                    "imap-store-unavailable",
                    logging.WARNING,
                    account=self.account.address,
                    error=str(exc),
                    retry_in=f"{delay:.1f}s",
                )
                self.state = "store-backoff"
                await self._pause(session, stop, delay)
                if not stop.is_set():
                    await session.ok(session.client.noop(), "NOOP")  # is the session still alive?
                continue
            if stop.is_set():
                return
            if session.has("IDLE"):
                await self._idle(session, stop)
            else:
                self.state = "polling"
                await self._pause(session, stop, self.cfg.poll_interval)
                if not stop.is_set():
                    # NOOP lets the server report new messages (EXISTS) before we search.
                    await session.ok(session.client.noop(), "NOOP")

    async def _pause(self, session: ImapSession, stop: asyncio.Event, seconds: float) -> None:
        """Sleep ``seconds`` unless stopped or the session ends (the next command says so)."""
        await wait_first(stop.wait(), session.ended.wait(), seconds=seconds)

    async def _idle(self, session: ImapSession, stop: asyncio.Event) -> None:
        """One IDLE round: until new mail, ``stop``, or ``idle_timeout`` (then re-IDLE)."""
        if session.new_mail.is_set():
            return  # reported since the last search: catch up first
        session.drain_pushes()
        client = session.client
        # aioimaplib's own IDLE timer only queues a marker we do not read; ours is below.
        idle = await session.run(client.idle_start(timeout=self.cfg.idle_timeout * 2), "IDLE")
        self.state = "idle"
        await wait_first(
            stop.wait(),
            session.new_mail.wait(),
            session.ended.wait(),
            seconds=self.cfg.idle_timeout,
        )
        if not session.ended.is_set():
            client.idle_done()
        await session.ok(idle, "IDLE")  # fails at once if the session ended meanwhile
        session.drain_pushes()

    # ------------------------------------------------------------------ catch-up

    async def _catch_up(self, session: ImapSession, stop: asyncio.Event) -> None:
        """Ingest every UID above the stored mark, oldest first, until nothing new arrived."""
        while not stop.is_set():
            session.new_mail.clear()  # anything reported from here on means "search again"
            low = self._last_uid + 1
            resp = await session.ok(
                session.client.uid_search("UID", f"{low}:*", charset=None), f"UID SEARCH {low}:*"
            )
            # "n:*" always matches the highest UID, even one below n (RFC 3501 §6.4.8).
            uids = sorted(u for u in imapclient.search_uids(resp) if u > self._last_uid)
            for uid in uids:
                if stop.is_set():
                    return
                await self._ingest(session, uid)
            if not session.new_mail.is_set():
                return

    async def _ingest(self, session: ImapSession, uid: int) -> None:
        raw = await self._fetch(session, uid)
        if raw is None:
            # Expunged by someone else between SEARCH and FETCH: nothing to ingest.
            event(log, "imap-vanished", account=self.account.address, uid=uid)
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
            moved = await self._move(session, uid)
        await self._store(self._save_uid, uid)
        d = result.decision
        ids = parse_ids(_header(raw, b"message-id"))
        event(
            log,
            "imap-message",
            account=self.account.address,
            mailbox=self.cfg.mailbox,
            uid=uid,
            msgid=format_id(ids[0]) if ids else None,
            size=len(raw),
            action=d.action,
            interaction=result.interaction_id,
            owner=self.p.settings.account(d.owner).address if d.owner else None,
            moved_to=moved,
        )

    async def _fetch(self, session: ImapSession, uid: int) -> bytes | None:
        resp = await session.ok(
            session.client.uid("fetch", str(uid), "(UID BODY.PEEK[])"),
            f"UID FETCH {uid}",
            limit=max(self.cfg.timeout, FETCH_DEADLINE),
        )
        return imapclient.fetched_literals(resp).get(uid)

    async def _move(self, session: ImapSession, uid: int) -> str | None:
        """Move ``uid`` into the routed folder (never delete); the folder is made on demand."""
        folder = self.cfg.routed_folder
        for attempt in (1, 2):
            resp = await self._move_once(session, uid, imapclient.mailbox_arg(folder))
            if resp.result == "OK":
                return folder
            if attempt == 1 and imapclient.response_code(resp) == "TRYCREATE":
                await self._create_folder(session, folder)
                continue
            # The message is committed and its copy queued for the owner; leaving it where
            # it is costs an agent a look, not a message.  Retrying forever would stall
            # the mailbox behind it.
            event(
                log,
                "imap-move-failed",
                logging.WARNING,
                account=self.account.address,
                uid=uid,
                folder=folder,
                error=f"{resp.result} {imapclient.response_text(resp)}",
            )
            return None
        return None

    async def _move_once(self, session: ImapSession, uid: int, target: str) -> Any:
        client = session.client
        if session.has("MOVE"):
            return await session.run(client.uid("move", str(uid), target), f"UID MOVE {uid}")
        resp = await session.run(client.uid("copy", str(uid), target), f"UID COPY {uid}")
        if resp.result != "OK":
            return resp
        await session.ok(
            client.uid("store", str(uid), "+FLAGS.SILENT", r"(\Deleted)"), f"UID STORE {uid}"
        )
        if session.has("UIDPLUS"):
            await session.ok(client.uid("expunge", str(uid)), f"UID EXPUNGE {uid}")
        # Without UIDPLUS a plain EXPUNGE would also remove what the account's users
        # flagged \Deleted themselves; the copy is safe, the original waits for them.
        return resp

    async def _create_folder(self, session: ImapSession, folder: str) -> None:
        name = imapclient.mailbox_arg(folder)
        resp = await session.run(session.client.create(name), f"CREATE {folder}")
        if resp.result == "OK":
            event(log, "imap-folder-created", account=self.account.address, folder=folder)
            # Subscribed, so the account's mail clients show where routed mail went.
            await session.run(session.client.subscribe(name), f"SUBSCRIBE {folder}")

    # ------------------------------------------------------------------ store (sync, in a thread)

    async def _write(self, op: Callable[[Session], T]) -> T:
        """``op(session)`` through the daemon's group-commit writer, after its commit."""
        try:
            return await self.p.rt.writes.submit(op)
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"imap lease: {exc}") from exc

    async def _store(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"imap state: {exc}") from exc

    def _load_state(self, uidvalidity: int) -> int:
        """The stored mark for this mailbox; a new UIDVALIDITY starts again from 0."""
        with self.p.db.write() as s:
            mark = imap_state.read_mark(s, self.account_id, self.cfg.mailbox)
            if mark is not None and mark.uidvalidity == uidvalidity:
                return mark.last_uid
            if mark is not None:
                # Every UID we knew is meaningless now.  Reading the whole mailbox again is
                # safe: ingest recognises what it has already stored.
                event(
                    log,
                    "imap-uidvalidity-changed",
                    logging.WARNING,
                    account=self.account.address,
                    mailbox=self.cfg.mailbox,
                    old=mark.uidvalidity,
                    new=uidvalidity,
                    old_last_uid=mark.last_uid,
                )
            imap_state.reset_mark(s, self.account_id, self.cfg.mailbox, uidvalidity)
            return 0

    def _synced(self) -> None:
        """The mailbox is caught up now (``mailrouter status`` shows when that last was)."""
        with self.p.db.write() as s:
            imap_state.mark_synced(s, self.account_id, self.cfg.mailbox)

    def _save_uid(self, uid: int) -> None:
        with self.p.db.write() as s:
            imap_state.advance_mark(s, self.account_id, self.cfg.mailbox, self._uidvalidity, uid)
        self._last_uid = max(self._last_uid, uid)

    def _belongs_elsewhere(self, result: Accepted) -> bool:
        """Does this message now live in another account's mailbox (so it leaves ours)?"""
        if result.decision.action == "route":
            return True
        if result.decision.action == "duplicate" and result.message_pk is not None:
            # Read again after a crash between commit and MOVE: the stored row remembers
            # that it was routed away from this account.
            with self.p.db.read() as s:
                owner = imap_state.routed_to(s, result.message_pk)
            return owner is not None and owner != self.account_id
        return False


# ---------------------------------------------------------------------- helpers


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
