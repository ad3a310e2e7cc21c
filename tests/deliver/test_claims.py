"""Outbox claims belong to an instance: a dead process's work comes back in seconds.

The reliability finding: SIGKILL left a routed delivery ``sending``, leased for 300 s,
and a restarted daemon did not deliver it until then.  Claims now carry the claiming
instance; a restart retires its own predecessor at once, a silent instance is taken for
dead after ``outbox.dead_after`` seconds, and finishing is fenced on the claim.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from helpers import accept, config_text, make_settings, pipeline, scenario, subprocess_env
from mailrouter.config import Settings, load
from mailrouter.deliver.errors import DeliveryError
from mailrouter.deliver.outbox import Job, OutboxWorker
from mailrouter.runtime import Runtime
from mailrouter.store.models import Instance, Outbox, utcnow

CHAIRS = "chairs-quote"


@pytest.fixture
def store(tmp_path: Path, database_url: str) -> Settings:
    """The same claims on SQLite and on the suite's PostgreSQL."""
    return make_settings(tmp_path).with_(database_url=database_url)


def claim(rt: Runtime, worker: OutboxWorker) -> list[Job]:
    with rt.db.write() as s:
        return worker._claim_in(s, 10)


def one_queued_delivery(rt: Runtime) -> int:
    r = accept(rt, scenario(CHAIRS, "01-customer-asks.eml"))
    assert r.outbox_id is not None
    return r.outbox_id


def status(rt: Runtime, outbox_id: int) -> str:
    with rt.db.read() as s:
        return str(s.scalar(select(Outbox.status).where(Outbox.id == outbox_id)))


def test_a_restarted_instance_takes_back_its_predecessors_claims_at_once(
    store: Settings,
) -> None:
    """Same name, new incarnation: the dead one's claim is due now, not in 300 s."""
    with pipeline(store) as rt:
        job_id = one_queued_delivery(rt)
        dead = OutboxWorker(rt, name="host-a:/var/lib/mailrouter")
        assert [j.id for j in claim(rt, dead)] == [job_id]  # ... and then it is SIGKILLed
        assert claim(rt, OutboxWorker(rt, name="someone-else")) == []  # still leased
        restarted = OutboxWorker(rt, name="host-a:/var/lib/mailrouter")
        assert [j.id for j in claim(rt, restarted)] == [job_id]
        with rt.db.read() as s:
            old = s.get(Instance, dead.instance_id)
            assert old is not None and old.stopped_at is not None


def test_work_a_crash_interrupted_keeps_its_place_at_the_head_of_the_queue(
    store: Settings,
) -> None:
    """Taken back by the restart, the dead one's claim is claimed first again — not put
    behind the backlog that arrived meanwhile (the soak saw it wait 28 s there)."""
    with pipeline(store) as rt:
        job_id = one_queued_delivery(rt)
        dead = OutboxWorker(rt, name="host-a:/var/lib/mailrouter")
        assert [j.id for j in claim(rt, dead)] == [job_id]
        newer = accept(
            rt, b"From: b@customer.test\nTo: sales@example.test\nMessage-ID: <n@c.t>\n\nhi\n"
        ).outbox_id
        restarted = OutboxWorker(rt, name="host-a:/var/lib/mailrouter")
        with rt.db.write() as s:
            assert [j.id for j in restarted._claim_in(s, 1)] == [job_id]
        with rt.db.write() as s:
            assert [j.id for j in restarted._claim_in(s, 1)] == [newer]


def test_claims_of_a_silent_instance_come_back_after_dead_after(store: Settings) -> None:
    """Another instance's claims come back once its heartbeat is older than dead_after."""
    with pipeline(store) as rt:
        job_id = one_queued_delivery(rt)
        a = OutboxWorker(rt, name="a")
        b = OutboxWorker(rt, name="b")
        assert [j.id for j in claim(rt, a)] == [job_id]
        assert claim(rt, b) == []  # a is alive: its claim is its own
        stale = utcnow() - timedelta(seconds=store.outbox.dead_after + 1)
        with rt.db.write() as s:
            s.execute(
                update(Instance).where(Instance.id == a.instance_id).values(heartbeat_at=stale)
            )
        assert [j.id for j in claim(rt, b)] == [job_id]


def test_a_heartbeat_keeps_claims_from_being_taken(store: Settings) -> None:
    """A live instance that beats keeps its claim however long the delivery takes."""
    with pipeline(store) as rt:
        one_queued_delivery(rt)
        a = OutboxWorker(rt, name="a")
        assert len(claim(rt, a)) == 1
        with rt.db.write() as s:
            s.execute(
                update(Instance)
                .where(Instance.id == a.instance_id)
                .values(heartbeat_at=utcnow() - timedelta(seconds=store.outbox.dead_after + 1))
            )
        with rt.db.write() as s:
            assert a._beat_in(s) is True
        assert claim(rt, OutboxWorker(rt, name="b")) == []


def test_a_worker_taken_for_dead_cannot_overwrite_the_newer_claims_outcome(
    store: Settings,
) -> None:
    """Finishing is fenced on the claim: the late worker's result is dropped."""
    with pipeline(store) as rt:
        job_id = one_queued_delivery(rt)
        slow = OutboxWorker(rt, name="a")
        [stale_job] = claim(rt, slow)
        fresh = OutboxWorker(rt, name="a")  # restarted: retires the slow one
        [job] = claim(rt, fresh)
        with rt.db.write() as s:
            assert fresh._finish_in(s, job, None).status == "sent"
        with rt.db.write() as s:
            late = slow._finish_in(s, stale_job, DeliveryError("timed out"))
        assert late.status == "claim-lost"
        assert status(rt, job_id) == "sent"


def test_retire_gives_back_claims_still_held(store: Settings) -> None:
    """A worker that stops with claims in hand (cancelled) leaves them due now."""
    with pipeline(store) as rt:
        job_id = one_queued_delivery(rt)
        w = OutboxWorker(rt, name="a")
        assert len(claim(rt, w)) == 1
        asyncio.run(w.retire())
        assert status(rt, job_id) == "pending"
        assert [j.id for j in claim(rt, OutboxWorker(rt, name="b"))] == [job_id]


# --------------------------------------------------------------------------- real processes


class StallingLMTP:
    """An LMTP server on loopback that swallows the first DATA (never answers it), then
    accepts everything: a delivery in flight when the daemon is killed."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stalled = threading.Event()
        self.delivered: list[bytes] = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            f.write(b"220 stall LMTP\r\n")
            f.flush()
            rcpts = 0
            while line := f.readline():
                verb = line[:4].upper()
                if verb == b"LHLO":
                    f.write(b"250-stall\r\n250 PIPELINING\r\n")
                elif verb == b"RCPT":
                    rcpts += 1
                    f.write(b"250 2.1.5 ok\r\n")
                elif verb == b"DATA":
                    f.write(b"354 go\r\n")
                    f.flush()
                    body = b"".join(iter(f.readline, b".\r\n"))
                    if not self.stalled.is_set():
                        self.stalled.set()
                        conn.settimeout(None)
                        while f.readline():  # hold the delivery until the peer dies
                            pass
                        return
                    self.delivered.append(body)
                    f.write(b"250 2.0.0 ok\r\n" * rcpts)
                elif verb == b"QUIT":
                    f.write(b"221 bye\r\n")
                    f.flush()
                    return
                else:
                    f.write(b"250 2.0.0 ok\r\n")
                f.flush()

    def close(self) -> None:
        self._stop = True
        self.thread.join(timeout=5)
        self.sock.close()


def start(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "mailrouter", "-c", str(settings.config_path), "run"],
            env=subprocess_env(settings),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def wait_for(condition: object, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds} s: {what}")


def test_sigkill_during_a_delivery_then_restart_delivers_it_within_seconds(
    tmp_path: Path,
) -> None:
    """The routed delivery a killed daemon held is delivered by its restart at once."""
    lmtp = StallingLMTP()
    try:
        text = config_text(tmp_path) + (
            f'\n[accounts.sales.delivery]\ntype = "lmtp"\nport = {lmtp.port}\ntimeout = 120\n'
        )
        (tmp_path / "mailrouter.toml").write_text(text, "utf-8")
        settings = load(tmp_path / "mailrouter.toml", env={})
        with pipeline(settings) as rt:
            job_id = one_queued_delivery(rt)
        first = start(settings, tmp_path / "daemon.log")
        try:
            assert lmtp.stalled.wait(30), "the first daemon never delivered"
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        with pipeline(settings) as rt:
            assert status(rt, job_id) == "sending"  # what the dead process left
        began = time.monotonic()
        second = start(settings, tmp_path / "daemon.log")
        try:
            wait_for(lambda: lmtp.delivered, 30, "the restarted daemon delivered the job")
            took = time.monotonic() - began
            with pipeline(settings) as rt:
                wait_for(lambda: status(rt, job_id) == "sent", 10, "marked sent")
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
        assert len(lmtp.delivered) == 1
        assert took < settings.outbox.lease / 10  # seconds, not the 300 s lease
    finally:
        lmtp.close()


def test_a_one_pass_flush_beats_so_a_slow_delivery_keeps_its_claim(tmp_path: Path) -> None:
    """`mailrouter queue flush` (and the daemon's last pass at stop) run run_once() without
    the daemon's heartbeat task: a delivery slower than outbox.dead_after must still not
    look dead to another worker, which would send it a second time."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))
    from chaos import HoldingLMTP

    lmtp = HoldingLMTP()
    try:
        text = config_text(tmp_path) + (
            "\n[outbox]\nheartbeat = 0.2\ndead_after = 2.0\n"
            f'\n[accounts.sales.delivery]\ntype = "lmtp"\nport = {lmtp.port}\ntimeout = 60\n'
        )
        (tmp_path / "mailrouter.toml").write_text(text, "utf-8")
        settings = load(tmp_path / "mailrouter.toml", env={})
        with pipeline(settings) as rt:
            job_id = one_queued_delivery(rt)
            flusher, other = OutboxWorker(rt), OutboxWorker(rt, name="daemon")

            async def scenario() -> tuple[list[Job], int]:
                flushing = asyncio.create_task(flusher.run_once())
                assert await asyncio.to_thread(lmtp.arrived.wait, 30)  # held at the server
                stolen: list[Job] = []
                loop = asyncio.get_running_loop()
                until = loop.time() + 2 * settings.outbox.dead_after
                while loop.time() < until and not stolen:  # bounded: two dead_afters
                    stolen = await asyncio.to_thread(claim, rt, other)
                    await asyncio.sleep(0.1)
                lmtp.release()
                return stolen, await asyncio.wait_for(flushing, 30)

            stolen, attempted = asyncio.run(scenario())
            assert stolen == [], "a live flush's claim was taken for dead"
            assert attempted == 1
            assert status(rt, job_id) == "sent"
            assert len(lmtp.delivered) == 1
    finally:
        lmtp.close()
