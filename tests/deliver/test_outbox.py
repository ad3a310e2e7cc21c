"""The durable outbox against a real store and a real smarthost on loopback.

A 5xx ends a row (failed, the reply kept, listed by ``mailrouter queue``); a 4xx backs off
until the row's deadline and then gives up; a row a dead worker left ``sending`` is taken
back once its lease runs out, and delivered once; and the backoff stays in its bounds.
"""

from __future__ import annotations

import asyncio
import json
import random
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text, update

from helpers import (
    accept,
    config_text,
    flush,
    maildir_messages,
    make_settings,
    pipeline,
    run_cli,
    scenario,
)
from mailrouter.config import Settings, load
from mailrouter.deliver.outbox import OutboxWorker
from mailrouter.retry import backoff
from mailrouter.runtime import Runtime
from mailrouter.store.models import Outbox, OutboxKind, utcnow
from mailrouter.transfer import transfer
from servers import SQLITE_ONLY, CaptureSmarthost

# Every test here runs on SQLite and on the real PostgreSQL (tests/servers.py).
pytestmark = pytest.mark.usefixtures("backend")

CHAIRS = "chairs-quote"
CUSTOMER = "anna.berg@customer.example"  # From: of 01-customer-asks.eml
PICKUP = '[outbound]\ntype = "pickup"\npath = "pickup"\n'


def smtp_settings(tmp_path: Path, host: CaptureSmarthost, outbox: str = "") -> Settings:
    """The test accounts, notices sent over SMTP to ``host`` (sales notifies on transfer)."""
    text_ = config_text(tmp_path)
    assert PICKUP in text_
    text_ = text_.replace(
        PICKUP,
        "[outbound]\n"
        'type = "smtp"\n'
        f'host = "{host.host}"\n'
        f"port = {host.port}\n"
        'tls = "none"\n'
        "timeout = 10\n",
    )
    text_ += f"\n[outbox]\n{outbox}\n"
    path = tmp_path / "mailrouter.toml"
    path.write_text(text_, "utf-8")
    return load(path, env={})


def queue_a_notice(p: Runtime) -> Outbox:
    """A customer mail to sales, delivered; its transfer to support queues one notice."""
    first = accept(p, scenario(CHAIRS, "01-customer-asks.eml"), "sales")
    assert first.interaction_id is not None
    assert flush(p) == 1  # the delivery into sales' Maildir
    transfer(p, first.interaction_id, "support", actor="bob")
    [row] = rows(p, kind=OutboxKind.NOTIFY)
    assert (row.status, row.attempts) == ("pending", 0)
    return row


def rows(p: Runtime, kind: OutboxKind | None = None) -> list[Outbox]:
    with p.db.read() as s:
        q = select(Outbox).order_by(Outbox.id)
        if kind is not None:
            q = q.where(Outbox.kind == kind.value)
        out = list(s.scalars(q).unique())
        s.expunge_all()
        return out


def row(p: Runtime, row_id: int) -> Outbox:
    [found] = [r for r in rows(p) if r.id == row_id]
    return found


def set_row(p: Runtime, row_id: int, **values: object) -> None:
    """Move a row's clock by hand: what the passing of time would do, without waiting."""
    with p.db.write() as s:
        s.execute(update(Outbox).where(Outbox.id == row_id).values(**values))


def aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=utcnow().tzinfo)


# --------------------------------------------------------------------------- 5xx


def test_5xx_fails_the_row_for_good_and_queue_shows_the_reply(
    tmp_path: Path, capture_smarthost: CaptureSmarthost
) -> None:
    """550 from the smarthost: status failed, last_error kept, listed by `queue`, no retry."""
    settings = smtp_settings(tmp_path, capture_smarthost)
    capture_smarthost.fail_next(550, "5.7.1 rejected by policy", at="data")
    with pipeline(settings) as p:
        notice = queue_a_notice(p)
        assert flush(p) == 1
        failed = row(p, notice.id)
        assert (failed.status, failed.attempts) == ("failed", 1)
        assert failed.last_error is not None and "550 5.7.1 rejected by policy" in failed.last_error
        assert "gave up" not in failed.last_error  # permanent at once, not expired
        assert flush(p) == 0  # a failed row is never attempted again
    assert capture_smarthost.messages == []

    code, out, err = run_cli(settings, "queue", "--json")
    assert code == 0, err
    [item] = json.loads(out)
    assert (item["id"], item["kind"], item["status"], item["attempts"]) == (
        notice.id,
        "notify",
        "failed",
        1,
    )
    assert "550 5.7.1 rejected by policy" in item["last_error"]
    assert item["next_attempt_at"] is None


# --------------------------------------------------------------------------- deadline


def test_4xx_past_the_deadline_gives_up_after_n_attempts(
    tmp_path: Path, capture_smarthost: CaptureSmarthost
) -> None:
    """451, 451: retried until the deadline, then failed "gave up after 2 attempts"."""
    # A lifetime shorter than the first backoff step: the retry is due at the deadline.
    settings = smtp_settings(
        tmp_path, capture_smarthost, "initial_backoff = 30\nmax_backoff = 60\nlifetime = 10"
    )
    capture_smarthost.fail_next(451, "4.7.1 greylisted, try again", count=2, at="data")
    with pipeline(settings) as p:
        notice = queue_a_notice(p)
        assert flush(p) == 1
        once = row(p, notice.id)
        assert (once.status, once.attempts) == ("pending", 1)
        assert once.last_error is not None and "451 4.7.1 greylisted" in once.last_error
        assert aware(once.next_attempt_at) == aware(once.deadline)  # never beyond it
        assert flush(p) == 0  # not due yet

        # The deadline passes (moved back by hand rather than waited for).
        past = utcnow() - timedelta(seconds=1)
        set_row(p, notice.id, next_attempt_at=past, deadline=past)
        assert flush(p) == 1
        gone = row(p, notice.id)
        assert (gone.status, gone.attempts) == ("failed", 2)
        assert gone.last_error is not None
        assert gone.last_error.startswith("gave up after 2 attempts: ")
        assert "451 4.7.1 greylisted" in gone.last_error
        assert flush(p) == 0
    assert capture_smarthost.messages == []


def test_4xx_before_the_deadline_backs_off_within_the_jitter_bounds(
    tmp_path: Path, capture_smarthost: CaptureSmarthost
) -> None:
    """After a 451 the row waits 50-100 % of outbox.initial_backoff, then is sent."""
    settings = smtp_settings(tmp_path, capture_smarthost, "initial_backoff = 40")
    capture_smarthost.fail_next(451, "4.3.0 try later", at="rcpt")
    with pipeline(settings) as p:
        notice = queue_a_notice(p)
        before = utcnow()
        assert flush(p) == 1
        after = utcnow()
        waiting = row(p, notice.id)
        assert waiting.status == "pending"
        due = aware(waiting.next_attempt_at)
        assert before + timedelta(seconds=20) <= due <= after + timedelta(seconds=40)

        set_row(p, notice.id, next_attempt_at=utcnow())
        assert flush(p) == 1
        sent = row(p, notice.id)
        assert (sent.status, sent.attempts, sent.last_error) == ("sent", 2, None)
    [got] = capture_smarthost.messages
    assert got.rcpt_tos == (CUSTOMER,)


# --------------------------------------------------------------------------- lease


@pytest.fixture
def store_settings(tmp_path: Path) -> Settings:
    """The test accounts on this test's store (the module runs on both)."""
    return make_settings(tmp_path)


def test_lease_of_a_dead_worker_is_reclaimed_and_delivered_once(store_settings: Settings) -> None:
    """A row left `sending` is not touched while its lease runs; after, it is claimed again."""
    with pipeline(store_settings) as p:
        accept(p, scenario(CHAIRS, "01-customer-asks.eml"), "sales")
        [queued] = rows(p)
        # Worker A claims the row, delivers, and dies before recording the outcome.
        dead = OutboxWorker(p)
        [job] = dead.claim(10)
        asyncio.run(dead._attempt(job))
        claimed = row(p, queued.id)
        assert (claimed.status, claimed.attempts) == ("sending", 1)
        assert claimed.claimed_until is not None and aware(claimed.claimed_until) > utcnow()

        survivor = OutboxWorker(p)
        assert survivor.claim(10) == []  # the lease still holds
        assert flush(p) == 0

        set_row(p, queued.id, claimed_until=utcnow() - timedelta(seconds=1))  # lease expired
        assert flush(p) == 1
        done = row(p, queued.id)
        assert (done.status, done.attempts, done.claimed_until) == ("sent", 2, None)
    # Delivered by both workers, stored once: the Maildir name is the row's key.
    assert len(maildir_messages(store_settings, "sales")) == 1


# --------------------------------------------------------------------------- backoff


@pytest.mark.parametrize(("initial", "cap"), [(30.0, 3600.0), (0.1, 5.0), (1.0, 60.0)])
def test_backoff_is_50_to_100_percent_of_the_doubling_step_never_above_the_cap(
    initial: float, cap: float
) -> None:
    """retry.backoff: step = initial * 2^(attempts-1) capped; the wait is within [step/2, step]."""
    rnd = random.Random(1234)
    for attempts in range(0, 30):
        step = min(cap, initial * 2.0 ** max(0, attempts - 1))
        waits = [backoff(attempts, initial, cap, rnd) for _ in range(200)]
        assert all(step * 0.5 <= w <= step <= cap for w in waits), (attempts, step)
        # Jitter really spreads the waits (a burst of failures must not retry in lockstep).
        assert min(waits) < step * 0.6 and max(waits) > step * 0.9, (attempts, step)


def test_backoff_doubles_until_the_cap_and_then_stays_there() -> None:
    """The upper bound goes 30, 60, 120 … and stops at the cap, however many attempts."""
    top = [backoff(a, 30.0, 3600.0, _Top()) for a in range(1, 12)]
    assert top == [30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0] + [3600.0] * 4
    bottom = [backoff(a, 30.0, 3600.0, _Bottom()) for a in (1, 2, 8, 1000)]
    assert bottom == [15.0, 30.0, 1800.0, 1800.0]


def test_backoff_after_very_many_attempts_is_the_cap_not_an_overflow() -> None:
    """2.0 ** 1024 raises OverflowError: a row retried that often still gets the cap."""
    assert backoff(1025, 0.1, 1.0, _Top()) == 1.0
    assert backoff(10**6, 30.0, 3600.0, _Top()) == 3600.0


class _Top(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


class _Bottom(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


# --------------------------------------------------------------------------- store trouble


def _sqlite(settings: Settings) -> str:
    return settings.database_url.removeprefix("sqlite:///")


@SQLITE_ONLY  # a SQLite trigger makes the store refuse writes
def test_an_outcome_the_store_cannot_take_is_kept_and_recorded_once_it_can(
    tmp_path: Path,
) -> None:
    """Delivered, then "sent" cannot be written (a real failure inside SQLite): the row is
    not left sending until its lease runs out, and not delivered again — the next round
    records the kept outcome before it claims anything."""
    import sqlite3

    settings = make_settings(tmp_path)
    with pipeline(settings) as rt:
        job_id = accept(rt, scenario(CHAIRS, "01-customer-asks.eml")).outbox_id
        conn = sqlite3.connect(_sqlite(settings))
        conn.execute(
            "CREATE TRIGGER no_sent BEFORE UPDATE OF status ON outbox WHEN NEW.status = 'sent'"
            " BEGIN SELECT RAISE(ABORT, 'injected store failure'); END"
        )
        conn.commit()
        worker = OutboxWorker(rt)

        async def rounds() -> tuple[str, int]:
            assert await worker._round() == 1  # delivered; recording it failed
            with rt.db.read() as s:
                status = str(s.scalar(select(Outbox.status).where(Outbox.id == job_id)))
            conn.execute("DROP TRIGGER no_sent")
            conn.commit()
            return status, await worker._round()  # records, then finds nothing new

        (between, claimed) = asyncio.run(rounds())
        conn.close()
        assert (between, claimed) == ("sending", 0)
        with rt.db.read() as s:
            row = s.get(Outbox, job_id)
            assert row is not None and (row.status, row.attempts) == ("sent", 1)
        assert len(maildir_messages(settings, "sales")) == 1


@SQLITE_ONLY  # a SQLite trigger makes the store refuse writes
def test_the_worker_waits_out_a_store_that_refuses_writes_instead_of_crashing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Claims failing (the store refuses writes): run() logs, backs off and carries on by
    itself once the store is back; it never raises into the supervisor."""
    import sqlite3

    settings = make_settings(tmp_path)
    with pipeline(settings) as rt:
        accept(rt, scenario(CHAIRS, "01-customer-asks.eml"))
        conn = sqlite3.connect(_sqlite(settings))
        conn.execute(
            "CREATE TRIGGER no_claims BEFORE UPDATE OF status ON outbox"
            " BEGIN SELECT RAISE(ABORT, 'injected store failure'); END"
        )
        conn.commit()
        caplog.set_level("WARNING", logger="mailrouter.outbox")

        async def scenario_() -> None:
            stop = asyncio.Event()
            worker = OutboxWorker(rt)
            running = asyncio.create_task(worker.run(stop))
            for _ in range(200):  # bounded: the first failure comes at once
                if any("outbox-store-unavailable" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.05)
            assert not running.done()
            conn.execute("DROP TRIGGER no_claims")
            conn.commit()
            for _ in range(400):  # the pause is at most a few seconds
                if maildir_messages(settings, "sales"):
                    break
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.wait_for(running, 30)

        asyncio.run(scenario_())
        conn.close()
        assert len(maildir_messages(settings, "sales")) == 1
        assert any("outbox-store-unavailable" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- batches


def distinct(n: int, to: str = "sales@example.test") -> bytes:
    return (
        f"From: Customer {n} <c{n}@customer.test>\r\nTo: {to}\r\nSubject: order {n}\r\n"
        f"Message-ID: <batch-{n}@customer.test>\r\n\r\nbody {n}\r\n"
    ).encode()


def test_a_batch_of_maildir_deliveries_costs_the_writer_two_operations(
    store_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """30 deliveries into two Maildirs: one claim and one record (so one commit each),
    however many jobs — and still an attempt row and an `event=outbox` line per job."""
    settings = store_settings
    with pipeline(settings) as rt:
        for n in range(30):
            accept(rt, distinct(n, "sales@example.test" if n % 2 else "support@example.test"))
        ops: list[object] = []
        real = rt.writes.submit

        def counting(op: Any) -> Any:
            ops.append(op)
            return real(op)

        monkeypatch.setattr(rt.writes, "submit", counting)
        caplog.set_level("INFO", logger="mailrouter.outbox")
        assert asyncio.run(OutboxWorker(rt)._round()) == 30
        assert len(ops) == 2
        assert {r.status for r in rows(rt)} == {"sent"}
        with rt.db.read() as s:
            attempts = s.execute(text("SELECT status, relay FROM outbox_attempts")).all()
    assert sorted(attempts) == [("sent", "maildir")] * 30
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=outbox ")]
    assert len(lines) == 30 and all("status=sent" in line for line in lines)
    assert len(maildir_messages(settings, "sales")) == len(maildir_messages(settings, "support"))
    for box in ("sales", "support"):
        path = settings.account(box).delivery.path
        assert path is not None and list((path / "tmp").iterdir()) == []


@SQLITE_ONLY  # a SQLite trigger makes the store refuse the "sent" commit
def test_a_crash_between_the_links_and_the_commit_does_not_deliver_twice(
    tmp_path: Path,
) -> None:
    """The batch is in the Maildirs, "sent" cannot be committed, the worker dies: its
    restart takes the claims back and finds every copy by one stat each."""
    import sqlite3

    settings = make_settings(tmp_path)
    with pipeline(settings) as rt:
        for n in range(12):
            accept(rt, distinct(n))
        conn = sqlite3.connect(_sqlite(settings))
        conn.execute(
            "CREATE TRIGGER no_sent BEFORE UPDATE OF status ON outbox WHEN NEW.status = 'sent'"
            " BEGIN SELECT RAISE(ABORT, 'injected store failure'); END"
        )
        conn.commit()
        dying = OutboxWorker(rt, name="daemon")
        assert asyncio.run(dying._round()) == 12  # delivered; recording failed
        assert len(dying._unrecorded) == 12  # (what a crash loses)
        conn.execute("DROP TRIGGER no_sent")
        conn.commit()
        conn.close()
        assert len(maildir_messages(settings, "sales")) == 12
        restarted = OutboxWorker(rt, name="daemon")
        assert asyncio.run(restarted.run_once()) == 12
        done = rows(rt)
        assert {(r.status, r.attempts) for r in done} == {("sent", 2)}
        with rt.db.read() as s:
            replies = s.scalars(text("SELECT reply FROM outbox_attempts WHERE attempt = 2")).all()
    assert len(replies) == 12 and all(r.startswith("stored before") for r in replies)
    assert len(maildir_messages(settings, "sales")) == 12
    path = settings.account("sales").delivery.path
    assert path is not None and list((path / "tmp").iterdir()) == []
