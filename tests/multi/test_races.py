"""Races between instances on one store: two replies of one thread at once, and a reply
against a transfer, end in one interaction with the right owner (scale issue, item 4).

Each "instance" is a Runtime of its own (its own engine and connections) on the same
database; a barrier releases both at the same moment, and each race is run many times.
SQLite runs the same races: there its writers are serialised by ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from helpers import make_settings
from mailrouter.config import AccountSettings, Settings
from mailrouter.pipeline import Accepted, Pipeline
from mailrouter.runtime import Runtime
from mailrouter.store.models import Interaction, Message, Outbox, Transfer
from mailrouter.transfer import transfer

ROUNDS = 30


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return make_settings(tmp_path).with_(database_url=database_url)


@pytest.fixture
def instances(settings: Settings) -> Iterator[tuple[Pipeline, Pipeline]]:
    """Two runtimes on one store, as two daemons would have."""
    first = Pipeline(Runtime.open(settings))
    second = Pipeline(Runtime.open(settings))
    try:
        yield first, second
    finally:
        first.rt.close()
        second.rt.close()


def mail(mid: str, to: str, *, parent: str | None = None) -> bytes:
    """A customer's message; each round has its own customer (notices are capped per
    customer and day)."""
    refs = f"In-Reply-To: <{parent}>\r\nReferences: <{parent}>\r\n" if parent else ""
    n = mid.split("@")[0].rsplit("-", 1)[1]
    return (
        f"From: Anna {n} <anna{n}@customer.test>\r\nTo: {to}\r\nSubject: chairs\r\n"
        f"Message-ID: <{mid}>\r\n{refs}\r\nabout the chairs ({mid})\r\n"
    ).encode()


def together(*calls: Callable[[], Any]) -> list[Any]:
    """Run ``calls`` on threads released by one barrier; their results, or raise the first
    exception one of them raised."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a racer hung"
    if errors:
        raise errors[0]
    return results


def interaction_of(p: Pipeline, mid: str) -> int | None:
    with p.db.read() as s:
        return s.scalar(select(Message.interaction_id).where(Message.message_id == mid))


def accepting(p: Pipeline, raw: bytes, account: AccountSettings, via: str) -> Accepted:
    """``accept`` as the CLI and replay call it, or as the daemon does (group commit)."""
    if via == "daemon":
        return asyncio.run(p.accept_async(raw, [account], source="test"))
    return p.accept(raw, [account], source="test")


@pytest.mark.parametrize("via", ["accept", "daemon"])
def test_two_replies_of_one_thread_at_two_instances_join_one_interaction(
    settings: Settings, instances: tuple[Pipeline, Pipeline], via: str
) -> None:
    """Two replies to a message never stored (both point at it) reach two instances at
    once: they share the one interaction either would have joined had it come second."""
    one, two = instances
    sales, support = settings.account("sales"), settings.account("support")
    for n in range(ROUNDS):
        root = f"root-{n}@customer.test"
        a = mail(f"a-{n}@customer.test", sales.address, parent=root)
        b = mail(f"b-{n}@customer.test", support.address, parent=root)
        got: list[Accepted] = together(
            functools.partial(accepting, one, a, sales, via),
            functools.partial(accepting, two, b, support, via),
        )
        assert got[0].interaction_id == got[1].interaction_id, f"split in round {n}: {got}"
    with one.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Interaction)) == ROUNDS


def test_a_message_and_its_reply_at_two_instances_join_one_interaction(
    settings: Settings, instances: tuple[Pipeline, Pipeline]
) -> None:
    """A message and the reply to it arrive at once (the reply overtook it on the way):
    one interaction, whichever commits first."""
    one, two = instances
    sales = settings.account("sales")
    for n in range(ROUNDS):
        first = mail(f"first-{n}@customer.test", sales.address)
        reply = mail(f"reply-{n}@customer.test", sales.address, parent=f"first-{n}@customer.test")
        got: list[Accepted] = together(
            lambda first=first: one.accept(first, [sales], source="test"),
            lambda reply=reply: two.accept(reply, [sales], source="test"),
        )
        assert got[0].interaction_id == got[1].interaction_id, f"split in round {n}: {got}"


def notice_answers(p: Pipeline, interaction_id: int) -> str:
    """The Message-ID the transfer notice of ``interaction_id`` is a reply to."""
    with p.db.read() as s:
        payload = s.scalar(
            select(Outbox.payload)
            .join(Transfer, Transfer.notification_outbox_id == Outbox.id)
            .where(Transfer.interaction_id == interaction_id)
        )
    assert payload, "no notice was queued"
    return str(message_from_bytes(payload)["In-Reply-To"]).strip("<>")


def test_a_reply_racing_a_transfer_ends_with_the_new_owner(
    settings: Settings, instances: tuple[Pipeline, Pipeline]
) -> None:
    """A transfer on one instance, the customer's reply to the old address on the other,
    at once: one interaction, owned by the target, and the two in one serial order — the
    reply came first (delivered to the old owner, and the notice answers it) or second
    (routed to the new owner, and the notice answers the message before it)."""
    one, two = instances
    sales = settings.account("sales")
    orders = set()
    for n in range(ROUNDS):
        ask = f"ask-{n}@customer.test"
        first = one.accept(mail(ask, sales.address), [sales], source="test")
        assert first.interaction_id is not None
        iid = first.interaction_id
        again = f"again-{n}@customer.test"
        reply = mail(again, sales.address, parent=ask)
        _, answered = together(
            lambda iid=iid: transfer(one.rt, iid, "support", actor="bob"),
            lambda reply=reply: two.accept(reply, [sales], source="test"),
        )
        assert answered.interaction_id == iid, f"split in round {n}"
        with one.db.read() as s:
            owner = s.scalar(select(Interaction.account_id).where(Interaction.id == iid))
            delivered_to = s.scalar(
                select(Outbox.account_id).where(Outbox.message_pk == answered.message_pk)
            )
        assert owner == one.accounts.id("support")
        if answered.decision.action == "route":
            assert delivered_to == one.accounts.id("support")
            assert notice_answers(one, iid) == ask, f"round {n}: reply routed, notice late"
            orders.add("transfer first")
        else:
            assert answered.decision.action == "deliver"
            assert delivered_to == one.accounts.id("sales")
            assert notice_answers(one, iid) == again, (
                f"round {n}: the reply went to the old owner after the transfer"
            )
            orders.add("reply first")
    assert interaction_of(one, f"again-{ROUNDS - 1}@customer.test") is not None


FORCED_ROUNDS = 5


class Forced:
    """Hooks around the reply's routing decision and the transfer's row lock that hold
    one side until the other has reached the point where the race is worst."""

    def __init__(self, interleaving: str) -> None:
        import mailrouter.pipeline
        import mailrouter.transfer

        self.interleaving = interleaving
        self.real_decide = mailrouter.pipeline.decide
        self.real_lock = mailrouter.transfer.lock_interaction
        self.locked, self.decided = threading.Event(), threading.Event()
        self.transferred = threading.Event()

    def decide(self, *args: Any, **kwargs: Any) -> Any:
        first = not self.decided.is_set()  # a retry after ThreadBusy is not held again
        if first and self.interleaving == "transfer-holds-the-row":
            assert self.locked.wait(10)
        d = self.real_decide(*args, **kwargs)
        self.decided.set()
        if first and self.interleaving == "transfer-after-decide":
            assert self.transferred.wait(10)
        return d

    def lock(self, *args: Any) -> Any:
        row = self.real_lock(*args)
        self.locked.set()
        if self.interleaving == "transfer-holds-the-row":
            # Until the reply has read the owner this transfer is changing (or given up).
            self.decided.wait(10)
        return row

    def transfer(self, rt: Runtime, iid: int) -> Any:
        if self.interleaving == "transfer-after-decide":
            assert self.decided.wait(10)
        try:
            return transfer(rt, iid, "support", actor="bob")
        finally:
            self.transferred.set()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
@pytest.mark.parametrize("interleaving", ["transfer-holds-the-row", "transfer-after-decide"])
def test_a_reply_forced_into_a_transfer_never_reaches_the_old_owner_afterwards(
    settings: Settings,
    instances: tuple[Pipeline, Pipeline],
    monkeypatch: pytest.MonkeyPatch,
    interleaving: str,
) -> None:
    """The two worst interleavings, forced with events instead of hoped for: the reply
    decides while the transfer holds the interaction's row, or a whole transfer commits
    between the reply's decision and its write.  Either way the reply ends with the new
    owner.  (PostgreSQL only: on SQLite one writer at a time cannot interleave.)"""
    import mailrouter.pipeline
    import mailrouter.transfer

    one, two = instances
    sales = settings.account("sales")
    for n in range(FORCED_ROUNDS):
        ask, again = f"ask-{n}@customer.test", f"again-{n}@customer.test"
        iid = one.accept(mail(ask, sales.address), [sales], source="test").interaction_id
        assert iid is not None
        forced = Forced(interleaving)
        monkeypatch.setattr(mailrouter.pipeline, "decide", forced.decide)
        monkeypatch.setattr(mailrouter.transfer, "lock_interaction", forced.lock)
        reply = mail(again, sales.address, parent=ask)
        _, answered = together(
            functools.partial(forced.transfer, one.rt, iid),
            functools.partial(two.accept, reply, [sales], source="test"),
        )
        monkeypatch.undo()
        assert answered.interaction_id == iid
        assert answered.decision.action == "route", f"round {n}: delivered to the old owner"
        assert answered.decision.deliver_to == "support"
        assert notice_answers(one, iid) == ask


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_thread_that_stays_busy_is_refused_for_retry_not_held(
    settings: Settings, instances: tuple[Pipeline, Pipeline]
) -> None:
    """Another instance holds the thread's key and does not let go: the message is refused
    as temporary (the sender's 451) after a bounded wait, never stored as held."""
    from sqlalchemy import create_engine, text

    from mailrouter.parse import parse
    from mailrouter.pipeline import StoreUnavailable, thread_keys

    one, _ = instances
    raw = mail("stuck-1@customer.test", settings.account("sales").address, parent="p@x.test")
    engine = create_engine(settings.database_url)
    try:
        with engine.begin() as conn:  # a stuck instance: holds the key in its transaction
            conn.execute(
                text("SELECT pg_advisory_xact_lock(:k)"), {"k": thread_keys(parse(raw))[0]}
            )
            with pytest.raises(StoreUnavailable, match="busy"):
                one.accept(raw, [settings.account("sales")], source="test")
    finally:
        engine.dispose()
    assert interaction_of(one, "stuck-1@customer.test") is None
    again = one.accept(raw, [settings.account("sales")], source="test")  # released: stored
    assert again.decision.action == "deliver"
