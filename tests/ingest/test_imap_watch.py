"""The IMAP watcher against a real Dovecot: ingest, route out of the old mailbox, survive
restarts, UIDVALIDITY changes and store failures — plus scripted servers for the
aioimaplib traps (a server that never greets, BYE during IDLE) and prompt stops."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from mailrouter.config import Settings, load_from_text
from mailrouter.daemon import Daemon
from mailrouter.deliver.lmtp import lmtp_deliver
from mailrouter.deliver.outbox import OutboxWorker
from mailrouter.ingest.imap import ImapWatcher
from mailrouter.pipeline import Pipeline, StoreUnavailable
from mailrouter.runtime import Runtime
from mailrouter.store.models import ImapState, Interaction, Message
from mailrouter.transfer import transfer
from servers import Dovecot

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures" / "imap"
SALES, SUPPORT = "sales@example.test", "support@example.test"
QUESTION = (FIXTURES / "01-customer-question.eml").read_bytes()
REPLY = (FIXTURES / "02-customer-reply-to-old-address.eml").read_bytes()


# --------------------------------------------------------------------------- set-up


def make_settings(
    tmp_path: Path, host: str, port: int, password: str, *, sales_mailbox: str = "INBOX"
) -> Settings:
    """sales and support both watched on Dovecot; support's mail is delivered by IMAP APPEND."""
    secret = tmp_path / "imap-password"
    secret.write_text(password + "\n")
    text = f"""
state_dir = "{tmp_path / "state"}"
[templates]
directory = "{ROOT / "config" / "templates"}"
[smtp]
enabled = false
[outbox]
poll_interval = 0.2
initial_backoff = 0.2
[daemon]
shutdown_timeout = 5
[accounts.sales]
address = "{SALES}"
[accounts.sales.transfer]
enabled = true
[accounts.sales.imap]
host = "{host}"
port = {port}
password_file = "{secret}"
mailbox = "{sales_mailbox}"
timeout = 5
poll_interval = 0.3
[accounts.support]
address = "{SUPPORT}"
[accounts.support.delivery]
type = "imap"
host = "{host}"
port = {port}
user = "{SUPPORT}"
password_file = "{secret}"
timeout = 5
[accounts.support.imap]
host = "{host}"
port = {port}
password_file = "{secret}"
timeout = 5
"""
    path = tmp_path / "mailrouter.toml"
    path.write_text(text)
    return load_from_text(text, path)


@pytest.fixture
def settings(tmp_path: Path, dovecot_clean: Dovecot) -> Settings:
    return make_settings(
        tmp_path, dovecot_clean.host, dovecot_clean.imap_port, dovecot_clean.password
    )


class Stage:
    """The daemon's IMAP watchers and outbox worker, running in the test's event loop."""

    def __init__(self, pipeline: Pipeline, watcher_class: type[ImapWatcher] = ImapWatcher):
        self.p = pipeline
        self.stop = asyncio.Event()
        self.worker = OutboxWorker(pipeline.rt)
        self.watchers = {
            a.name: watcher_class(pipeline, a, on_accepted=self.worker.wake)
            for a in pipeline.settings.accounts
            if a.imap is not None
        }
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.tasks.append(asyncio.create_task(self.worker.run(self.stop)))
        self.tasks += [asyncio.create_task(w.run(self.stop)) for w in self.watchers.values()]

    async def shutdown(self) -> None:
        """Stop, and insist on a prompt stop: IDLE and backoff waits must wake up."""
        self.stop.set()
        done, pending = await asyncio.wait(self.tasks, timeout=5)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        assert not pending, "a stage did not stop within 5 s of the stop event"
        for t in done:
            t.result()  # a crashed stage fails the test


def open_pipeline(settings: Settings) -> Pipeline:
    return Pipeline(Runtime.open(settings))


@asynccontextmanager
async def running(
    settings: Settings,
    pipeline: Pipeline | None = None,
    watcher_class: type[ImapWatcher] = ImapWatcher,
) -> AsyncIterator[Stage]:
    own = pipeline is None
    p = pipeline or await asyncio.to_thread(open_pipeline, settings)
    stage = Stage(p, watcher_class)
    stage.start()
    try:
        yield stage
    finally:
        try:
            await stage.shutdown()
        finally:
            if own:
                p.rt.close()


async def eventually(predicate: Callable[[], Any], within: float = 5.0, what: str = "") -> None:
    """Wait (bounded) until ``predicate()`` is true; predicates reading the DB or Dovecot
    run in a thread so the watcher keeps running meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        if await asyncio.to_thread(predicate):
            return
        if loop.time() > deadline:
            pytest.fail(f"not within {within:g}s: {what or predicate}")
        await asyncio.sleep(0.05)


async def lmtp(dovecot: Dovecot, rcpt: str, raw: bytes) -> None:
    """Drop ``raw`` into ``rcpt``'s INBOX the way an MTA does: Dovecot LMTP."""
    results = await lmtp_deliver(
        dovecot.host,
        dovecot.lmtp_port,
        raw,
        mail_from="dana@customer.test",
        recipients=[rcpt],
        timeout=10,
    )
    assert results[rcpt][0] == 250, results


def with_id(raw: bytes, message_id: str) -> bytes:
    return re.sub(rb"(?m)^Message-ID: <[^>]+>", f"Message-ID: <{message_id}>".encode(), raw)


def rows(p: Pipeline, message_id: str) -> int:
    with p.db.read() as s:
        return int(
            s.scalar(
                select(func.count()).select_from(Message).where(Message.message_id == message_id)
            )
            or 0
        )


def message_ids(raws: Sequence[bytes]) -> list[str]:
    out = []
    for raw in raws:
        m = re.search(rb"(?im)^Message-ID: <([^>]+)>", raw)
        out.append(m.group(1).decode() if m else "")
    return out


def flags(dovecot: Dovecot, user: str, mailbox: str = "INBOX") -> list[str]:
    """FLAGS of every message in ``mailbox``, read by an independent client."""
    with dovecot.imap(user) as c:
        typ, _ = c.select(f'"{mailbox}"', readonly=True)
        if typ != "OK":
            return []
        typ, data = c.fetch("1:*", "(FLAGS)")
        if typ != "OK" or data == [None]:
            return []
        return [d.decode() for d in data if isinstance(d, bytes)]


def interaction_of(p: Pipeline, message_id: str) -> int | None:
    with p.db.read() as s:
        return s.scalar(select(Message.interaction_id).where(Message.message_id == message_id))


async def ingest_question_and_transfer(dovecot: Dovecot, stage: Stage) -> int:
    """The customer's first mail reaches sales' INBOX and is ingested; then it goes to support."""
    p = stage.p
    await eventually(lambda: stage.watchers["sales"].state == "idle", what="sales watcher idle")
    await lmtp(dovecot, SALES, QUESTION)
    await eventually(lambda: interaction_of(p, "chairs-1@customer.test"), what="question ingested")
    iid = interaction_of(p, "chairs-1@customer.test")
    assert iid is not None
    await asyncio.to_thread(transfer, p.rt, iid, "support", actor="agent.anna")
    return iid


# --------------------------------------------------------------------------- Dovecot


@pytest.mark.dovecot
async def test_reply_to_old_mailbox_is_moved_to_routed_and_appended_to_new_owner(
    dovecot_clean: Dovecot, settings: Settings
) -> None:
    """End to end in a real Daemon: the reply leaves sales' INBOX for Routed and lands in
    support's INBOX with its original headers plus the trace headers, within 2 s."""
    dovecot = dovecot_clean
    daemon = Daemon(settings)
    await daemon.startup()
    try:
        p = daemon.pipeline
        assert p is not None
        await lmtp(dovecot, SALES, QUESTION)
        await eventually(lambda: interaction_of(p, "chairs-1@customer.test"), what="ingested")
        iid = interaction_of(p, "chairs-1@customer.test")
        assert iid is not None
        # Owned by sales: it stays where it is, unread for sales' agents.
        assert message_ids(dovecot.fetch_all(SALES)) == ["chairs-1@customer.test"]
        assert "\\Seen" not in flags(dovecot, SALES)[0]
        assert "Routed" not in dovecot.mailboxes(SALES)

        await asyncio.to_thread(transfer, p.rt, iid, "support", actor="agent.anna")
        loop = asyncio.get_running_loop()
        sent = loop.time()
        await lmtp(dovecot, SALES, REPLY)
        await eventually(
            lambda: "chairs-2@customer.test" in message_ids(dovecot.fetch_all(SUPPORT)),
            within=2.0,
            what="reply appended to support's INBOX",
        )
        took = loop.time() - sent
        await eventually(
            lambda: message_ids(dovecot.fetch_all(SALES, "Routed")) == ["chairs-2@customer.test"],
            within=2.0,
            what="reply moved to sales/Routed",
        )
    finally:
        daemon.stop.set()
        await daemon.shutdown()

    assert took < 2.0
    assert message_ids(dovecot.fetch_all(SALES)) == ["chairs-1@customer.test"]
    support_copies = dovecot.fetch_all(SUPPORT)
    assert message_ids(support_copies) == ["chairs-2@customer.test"]
    copy = support_copies[0]
    assert copy.startswith(
        f"X-Mailrouter-Interaction: {iid}\r\nX-Mailrouter-Routed-From: {SALES}\r\n".encode()
    )
    # Every original header is there, unchanged (rule 9: no rewritten address headers).
    for line in REPLY.split(b"\n\n")[0].split(b"\n"):
        assert line + b"\r\n" in copy, line
    assert b"one more thing: the chairs should be black" in copy


@pytest.mark.dovecot
async def test_watcher_reconnects_after_dovecot_restart_and_loses_nothing(
    dovecot_clean: Dovecot, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Dovecot restarts under an IDLE session; mail from before and after is ingested once."""
    dovecot = dovecot_clean
    caplog.set_level(logging.INFO, logger="mailrouter")
    ids = [f"restart-{i}@customer.test" for i in range(3)]
    async with running(settings) as stage:
        w = stage.watchers["sales"]
        await eventually(lambda: w.state == "idle", what="sales watcher idle")
        before = w.sessions
        await lmtp(dovecot, SALES, with_id(QUESTION, ids[0]))  # lands as the server goes down
        await asyncio.to_thread(dovecot.restart)
        for mid in ids[1:]:  # lands while the watcher is still reconnecting
            await lmtp(dovecot, SALES, with_id(QUESTION, mid))
        await eventually(
            lambda: all(rows(stage.p, m) == 1 for m in ids), within=15, what="all three ingested"
        )
        await eventually(lambda: w.state == "idle" and w.sessions > before, what="back in IDLE")
        # A little later still exactly once each (no late duplicate from a re-read).
        await asyncio.sleep(0.3)
        assert [rows(stage.p, m) for m in ids] == [1, 1, 1]
    assert message_ids(dovecot.fetch_all(SALES)) == ids  # nothing moved, nothing lost
    assert all("\\Seen" not in f for f in flags(dovecot, SALES))
    dropped = [r.getMessage() for r in caplog.records if "imap-disconnected" in r.getMessage()]
    assert dropped and "Server shutting down" in dropped[0]


@pytest.mark.dovecot
async def test_uidvalidity_change_rescans_the_mailbox_without_duplicates(
    tmp_path: Path, dovecot_clean: Dovecot, caplog: pytest.LogCaptureFixture
) -> None:
    """The watched mailbox is deleted and re-created: new UIDs start at 1 again, so the
    stored mark must be dropped — else the two new messages below it would be skipped."""
    dovecot = dovecot_clean
    caplog.set_level(logging.INFO, logger="mailrouter")
    box = "Customers"
    settings = make_settings(
        tmp_path, dovecot.host, dovecot.imap_port, dovecot.password, sales_mailbox=box
    )
    first = [with_id(QUESTION, f"uv-{i}@customer.test") for i in (1, 2)]
    later = [with_id(QUESTION, f"uv-{i}@customer.test") for i in (3, 4)]

    def recreate(messages: Sequence[bytes]) -> None:
        with dovecot.imap(SALES) as c:
            c.delete(f'"{box}"')  # Dovecot tells the watcher's session BYE
            assert c.create(f'"{box}"')[0] == "OK"
            for raw in messages:
                assert c.append(f'"{box}"', None, None, raw)[0] == "OK"

    def state() -> tuple[int, int]:
        with stage.p.db.read() as s:
            row = s.scalars(select(ImapState).where(ImapState.mailbox == box)).first()
            return (row.uidvalidity, row.last_uid) if row else (0, 0)

    await asyncio.to_thread(recreate, first)
    async with running(settings) as stage:
        await eventually(lambda: state()[1] == 2, what="first two ingested")
        old_validity = state()[0]
        # Same message again (UID 1) and two new ones (UIDs 2 and 3, below the old mark + 1).
        await asyncio.to_thread(recreate, [first[0], *later])
        await eventually(
            lambda: state()[0] != old_validity and state()[1] == 3,
            within=15,
            what="rescan after UIDVALIDITY change",
        )
        assert [rows(stage.p, f"uv-{i}@customer.test") for i in (1, 2, 3, 4)] == [1, 1, 1, 1]
    assert any("event=imap-uidvalidity-changed" in r.getMessage() for r in caplog.records)


@pytest.mark.dovecot
async def test_store_failure_leaves_message_unflagged_in_inbox_then_ingests_once(
    dovecot_clean: Dovecot, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Persist, then acknowledge: while the store refuses, the routed reply is neither
    moved nor flagged; once it takes it, it is moved and delivered exactly once."""
    dovecot = dovecot_clean
    async with running(settings) as stage:
        await ingest_question_and_transfer(dovecot, stage)
        real_accept = stage.p.accept_async
        failed, release = threading.Event(), threading.Event()
        calls = []

        async def flaky_accept(raw: bytes, accounts: Any, **kw: Any) -> Any:
            calls.append(kw.get("in_mailbox_of"))
            if len(calls) == 1:
                failed.set()
                raise StoreUnavailable("store unavailable: database is locked (test)")
            # Hold the retry until the test has looked at the server.
            assert await asyncio.to_thread(release.wait, 10)
            return await real_accept(raw, accounts, **kw)

        monkeypatch.setattr(stage.p, "accept_async", flaky_accept)
        await lmtp(dovecot, SALES, REPLY)
        await eventually(failed.is_set, what="the store failure")
        await eventually(lambda: stage.watchers["sales"].state == "store-backoff")

        assert message_ids(dovecot.fetch_all(SALES)) == [
            "chairs-1@customer.test",
            "chairs-2@customer.test",
        ]
        assert not any(f in x for x in flags(dovecot, SALES) for f in ("\\Seen", "\\Deleted"))
        assert dovecot.fetch_all(SALES, "Routed") == []
        assert dovecot.fetch_all(SUPPORT) == []
        assert rows(stage.p, "chairs-2@customer.test") == 0

        release.set()
        await eventually(
            lambda: message_ids(dovecot.fetch_all(SALES, "Routed")) == ["chairs-2@customer.test"],
            what="moved after the retry",
        )
        await eventually(
            lambda: message_ids(dovecot.fetch_all(SUPPORT)) == ["chairs-2@customer.test"],
            what="delivered to support",
        )
        # support's watcher reads the copy it was given: recorded, not duplicated.
        await eventually(lambda: stage.watchers["support"].state == "idle")
    assert message_ids(dovecot.fetch_all(SALES)) == ["chairs-1@customer.test"]
    assert rows(stage.p, "chairs-2@customer.test") == 1
    assert calls[:2] == ["sales", "sales"]


@pytest.mark.dovecot
async def test_message_committed_before_a_crash_is_moved_when_read_again(
    dovecot_clean: Dovecot, settings: Settings
) -> None:
    """A crash between commit and MOVE: on restart the duplicate is recognised and still
    leaves the old mailbox, and the interaction gets no second message."""
    dovecot = dovecot_clean
    p = await asyncio.to_thread(open_pipeline, settings)
    try:
        sales = settings.account("sales")
        await lmtp(dovecot, SALES, QUESTION)
        first = await asyncio.to_thread(
            p.accept, QUESTION, [sales], source="imap", in_mailbox_of="sales"
        )
        assert first.interaction_id is not None
        await asyncio.to_thread(transfer, p.rt, first.interaction_id, "support")
        await lmtp(dovecot, SALES, REPLY)
        # What the watcher had done when it "crashed": committed, not moved, mark not saved.
        routed = await asyncio.to_thread(
            p.accept, REPLY, [sales], source="imap", in_mailbox_of="sales"
        )
        assert routed.decision.action == "route"

        async with running(settings, pipeline=p) as stage:
            await eventually(
                lambda: (
                    message_ids(dovecot.fetch_all(SALES, "Routed")) == ["chairs-2@customer.test"]
                ),
                what="moved on the second read",
            )
            await eventually(
                lambda: message_ids(dovecot.fetch_all(SUPPORT)) == ["chairs-2@customer.test"],
                what="delivered to support",
            )
            await eventually(lambda: stage.watchers["support"].state == "idle")
        assert message_ids(dovecot.fetch_all(SALES)) == ["chairs-1@customer.test"]
        assert rows(p, "chairs-1@customer.test") == rows(p, "chairs-2@customer.test") == 1
        with p.db.read() as s:
            owner = s.scalar(
                select(Interaction.account_id).where(Interaction.id == first.interaction_id)
            )
        assert owner == p.accounts.id("support")
    finally:
        p.rt.close()


class _NoIdleWatcher(ImapWatcher):
    """A watcher whose server (as far as it can tell) does not offer IDLE."""

    async def _connect(self, stop: asyncio.Event) -> Any:
        conn = await super()._connect(stop)
        if conn is not None:
            conn.client.protocol.capabilities.discard("IDLE")
        return conn


@pytest.mark.dovecot
async def test_without_idle_the_watcher_polls(dovecot_clean: Dovecot, settings: Settings) -> None:
    """No IDLE capability: NOOP + search every poll_interval still picks new mail up."""
    async with running(settings, watcher_class=_NoIdleWatcher) as stage:
        w = stage.watchers["sales"]
        await eventually(lambda: w.state == "polling", what="polling")
        await lmtp(dovecot_clean, SALES, QUESTION)
        await eventually(lambda: rows(stage.p, "chairs-1@customer.test") == 1, within=3)


# --------------------------------------------------------------------------- scripted servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ScriptedImap:
    """Just enough IMAP to reach IDLE, then misbehave: the aioimaplib traps, on demand."""

    def __init__(self, *, greet: bool = True, bye_in_idle: bool = False) -> None:
        self.greet, self.bye_in_idle = greet, bye_in_idle
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        await asyncio.gather(*(w.wait_closed() for w in self.writers), return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        if not self.greet:
            await reader.read()  # say nothing at all until the client gives up
            return
        writer.write(b"* OK [CAPABILITY IMAP4rev1 IDLE MOVE UIDPLUS] scripted ready\r\n")
        while line := await reader.readline():
            tag, _, rest = line.decode().strip().partition(" ")
            cmd = rest.split(" ")[0].upper()
            if cmd == "CAPABILITY":
                writer.write(b"* CAPABILITY IMAP4rev1 IDLE MOVE UIDPLUS\r\n")
            elif cmd == "SELECT":
                writer.write(b"* 0 EXISTS\r\n* OK [UIDVALIDITY 7] UIDs valid\r\n")
            elif cmd == "UID":
                writer.write(b"* SEARCH\r\n")
            elif cmd == "IDLE":
                writer.write(b"+ idling\r\n")
                if self.bye_in_idle:
                    # BYE, and then keep the socket open: aioimaplib #110 hangs here.
                    await asyncio.sleep(0.2)
                    writer.write(b"* BYE scripted server going away\r\n")
                await writer.drain()
                continue
            elif cmd == "LOGOUT":
                writer.write(f"* BYE bye\r\n{tag} OK LOGOUT completed\r\n".encode())
                await writer.drain()
                return
            writer.write(f"{tag} OK {cmd} completed\r\n".encode())
            await writer.drain()


@asynccontextmanager
async def scripted(tmp_path: Path, server: ScriptedImap) -> AsyncIterator[Stage]:
    port = await server.start()
    settings = make_settings(tmp_path, "127.0.0.1", port, "secret")
    settings = settings.with_(accounts=settings.accounts[:1])
    try:
        async with running(settings) as stage:
            yield stage
    finally:
        await server.close()


async def test_bye_during_idle_is_noticed_and_the_watcher_reconnects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that says BYE in IDLE but keeps the socket open does not hang the watcher."""
    caplog.set_level(logging.INFO, logger="mailrouter")
    server = ScriptedImap(bye_in_idle=True)
    async with scripted(tmp_path, server) as stage:
        await eventually(lambda: server.connections >= 2, within=5, what="a second connection")
        assert stage.watchers["sales"].sessions >= 1
    lines = [r.getMessage() for r in caplog.records if "imap-disconnected" in r.getMessage()]
    assert lines and "scripted server going away" in lines[0]


async def test_silent_server_times_out_and_stop_wakes_the_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No greeting at all: the connect times out, the watcher backs off, stop ends it at once."""
    caplog.set_level(logging.INFO, logger="mailrouter")
    server = ScriptedImap(greet=False)
    port = await server.start()
    settings = make_settings(tmp_path, "127.0.0.1", port, "secret")
    imap = settings.accounts[0].imap
    assert imap is not None
    sales = replace(settings.accounts[0], imap=replace(imap, timeout=0.3))
    settings = settings.with_(accounts=(sales,))
    try:
        async with running(settings) as stage:
            w = stage.watchers["sales"]
            await eventually(lambda: w.state == "reconnect-backoff", within=3)
            assert w.sessions == 0
            loop = asyncio.get_running_loop()
            t0 = loop.time()
        assert loop.time() - t0 < 1.0
    finally:
        await server.close()
    lines = [r.getMessage() for r in caplog.records if "imap-disconnected" in r.getMessage()]
    assert lines and "timed out" in lines[0]


async def test_refused_connection_backs_off_and_stops_promptly(tmp_path: Path) -> None:
    """Nothing listening: connect fails, the watcher waits, and a stop is obeyed at once."""
    settings = make_settings(tmp_path, "127.0.0.1", _free_port(), "secret")
    settings = settings.with_(accounts=settings.accounts[:1])
    async with running(settings) as stage:
        w = stage.watchers["sales"]
        await eventually(lambda: w.state == "reconnect-backoff", within=3)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
    assert loop.time() - t0 < 1.0
    assert w.state == "stopped"


async def test_stop_while_connecting_to_a_silent_server_is_prompt(tmp_path: Path) -> None:
    """A greeting that never comes (30 s timeout) does not hold up a stop."""
    server = ScriptedImap(greet=False)
    async with scripted(tmp_path, server) as stage:
        w = stage.watchers["sales"]
        await eventually(lambda: w.state == "connecting" and server.connections == 1, within=3)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
    assert loop.time() - t0 < 1.0
    assert w.state == "stopped" and w.sessions == 0


# --------------------------------------------------------------------------- the lease


@pytest.mark.dovecot
async def test_one_instance_watches_a_mailbox_and_another_takes_over_when_it_dies(
    dovecot_clean: Dovecot, tmp_path: Path
) -> None:
    """Two instances' watchers on one store: one watches, the other stands by; when the
    holder stops renewing (killed), the other takes over within the lease time and
    catches up from the stored UID: nothing lost, nothing read twice."""
    base = make_settings(
        tmp_path, dovecot_clean.host, dovecot_clean.imap_port, dovecot_clean.password
    )
    settings = base.with_(
        outbox=replace(base.outbox, heartbeat=0.2, dead_after=1.0),
        accounts=tuple(a for a in base.accounts if a.name == "sales"),
    )
    p = await asyncio.to_thread(open_pipeline, settings)
    sales = settings.account("sales")
    first = ImapWatcher(p, sales, holder=lambda: "instance-a")
    second = ImapWatcher(p, sales, holder=lambda: "instance-b")
    stop_first, stop_second = asyncio.Event(), asyncio.Event()
    a = asyncio.create_task(first.run(stop_first))
    b: asyncio.Task[None] | None = None
    try:
        await eventually(lambda: first.state == "idle", what="the first instance watching")
        b = asyncio.create_task(second.run(stop_second))
        await eventually(lambda: second.state == "standby", what="the second standing by")
        await lmtp(dovecot_clean, SALES, QUESTION)
        await eventually(
            lambda: rows(p, "chairs-1@customer.test") == 1, what="ingested by the first"
        )
        assert second.state == "standby"
        a.cancel()  # killed: no LOGOUT, no lease release
        await asyncio.gather(a, return_exceptions=True)
        await lmtp(dovecot_clean, SALES, REPLY)
        await eventually(
            lambda: rows(p, "chairs-2@customer.test") == 1, within=10, what="the second took over"
        )
        assert second.state in ("idle", "catching-up")
        assert rows(p, "chairs-1@customer.test") == 1  # caught up from the stored UID
    finally:
        stop_first.set()
        stop_second.set()
        await asyncio.gather(a, *([b] if b is not None else []), return_exceptions=True)
        await p.rt.aclose()
