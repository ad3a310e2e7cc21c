"""The PostgreSQL backend: the same story as on SQLite, and what several instances share."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select

from helpers import ADDRESSES, maildir_messages, make_settings, scenario
from mailrouter.config import Settings
from mailrouter.deliver.outbox import OutboxWorker
from mailrouter.pipeline import Pipeline
from mailrouter.runtime import Runtime
from mailrouter.store.models import Message, Outbox
from mailrouter.transfer import transfer
from servers import reset_schema

pytestmark = pytest.mark.postgres
CHAIRS = "chairs-quote"


@pytest.fixture
def pg_settings(tmp_path: Path, postgres_url: str) -> Settings:
    """Settings on the session's PostgreSQL database, emptied for this test."""
    reset_schema(postgres_url)
    return make_settings(tmp_path).with_(database_url=postgres_url)


def test_postgres_store_runs_transfer_and_old_address_routing(pg_settings: Settings) -> None:
    """On PostgreSQL too: transfer, then a reply to the old address reaches the new owner."""
    p = Pipeline(Runtime.open(pg_settings))
    try:
        assert p.db.engine.dialect.name == "postgresql"
        first = p.accept(
            scenario(CHAIRS, "01-customer-asks.eml"), [pg_settings.account("sales")], source="test"
        )
        assert first.interaction_id is not None
        transfer(p.rt, first.interaction_id, "support", actor="bob")
        reply = p.accept(
            scenario(CHAIRS, "03-customer-replies-to-sales.eml"),
            [pg_settings.account("sales")],
            source="test",
        )
        assert (reply.decision.action, reply.interaction_id) == ("route", first.interaction_id)
        import asyncio

        asyncio.run(OutboxWorker(p.rt).run_once())
    finally:
        p.rt.close()
    support = maildir_messages(pg_settings, "support")
    assert len(support) == 1
    assert f"X-Mailrouter-Routed-From: {ADDRESSES['sales']}".encode() in support[0]


def test_two_instances_never_claim_the_same_outbox_row(pg_settings: Settings) -> None:
    """FOR UPDATE SKIP LOCKED: concurrent claimers on separate engines split the work."""
    setup = Pipeline(Runtime.open(pg_settings))
    try:
        for n in range(60):
            raw = (
                f"From: c{n}@customer.test\r\nTo: sales@example.test\r\n"
                f"Subject: s{n}\r\nMessage-ID: <pg-claim-{n}@customer.test>\r\n\r\nbody\r\n"
            ).encode()
            setup.accept(raw, [pg_settings.account("sales")], source="test", in_mailbox_of=None)
    finally:
        setup.rt.close()

    instances = [Pipeline(Runtime.open(pg_settings)) for _ in range(4)]
    claimed: list[list[int]] = [[] for _ in instances]
    start = threading.Barrier(len(instances))

    def claimer(i: int) -> None:
        worker = OutboxWorker(instances[i].rt)
        start.wait(timeout=30)
        for _ in range(50):  # bounded
            jobs = worker.claim(5)
            if not jobs:
                return
            claimed[i].extend(j.id for j in jobs)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(len(instances))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for p in instances:
        p.rt.close()
    everything = [jid for ids in claimed for jid in ids]
    assert len(everything) == 60 and len(set(everything)) == 60
    assert sum(1 for ids in claimed if ids) >= 2  # the work really was shared


def test_same_message_from_two_instances_at_once_is_stored_once(pg_settings: Settings) -> None:
    """Two instances ingesting one message concurrently: one row, the other sees a duplicate."""
    raw = scenario(CHAIRS, "01-customer-asks.eml")
    instances = [Pipeline(Runtime.open(pg_settings)) for _ in range(2)]
    start = threading.Barrier(2)
    actions: list[str] = []

    def ingest(p: Pipeline) -> None:
        start.wait(timeout=30)
        actions.append(p.accept(raw, [pg_settings.account("sales")], source="test").decision.action)

    threads = [threading.Thread(target=ingest, args=(p,)) for p in instances]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        with instances[0].db.read() as s:
            assert s.scalar(select(func.count()).select_from(Message)) == 1
            assert s.scalar(select(func.count()).select_from(Outbox)) == 1
    finally:
        for p in instances:
            p.rt.close()
    assert sorted(actions) == ["deliver", "duplicate"]
