"""Two ``mailrouter run`` processes on one PostgreSQL database, one SIGKILLed mid-run
(scale issue, "What must be shown").

Four accounts: sales and support take SMTP and deliver into Maildirs both instances share;
billing and orders are watched over IMAP in the suite's Dovecot (orders in billing's
``Orders`` folder), each by one instance at a time through its lease.  Two retrying MTA
processes send a threaded corpus, every other message to each instance, while
conversations are transferred from sales to support with the CLI.  Instance ``a`` is
killed with SIGKILL part-way; its MTA fails over to ``b`` (as Postfix tries its next
nexthop), and mail appended to the watched mailboxes after the kill is still read.

At the end: every 250'd message is stored once and delivered once, into the Maildir of
the owner at the time it was accepted; no conversation is split; both IMAP leases are
held by the survivor.  Every wait has a bound.
"""

from __future__ import annotations

import imaplib
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select

from faults.chaos import TEMPLATES, DaemonProcess, Maildirs, MtaProcess, wait_until, write_corpus
from helpers import run_cli
from mailrouter.config import Settings, load
from mailrouter.store.models import (
    INSTANCES,
    INTERACTIONS,
    LEASES,
    MESSAGES,
    OUTBOX,
    Account,
    Transfer,
)
from servers import Dovecot, free_port, fresh_database

pytestmark = [pytest.mark.postgres, pytest.mark.dovecot]

MESSAGES_SENT = 2000  # over SMTP, half to each instance
IMAP_EACH = 8  # per watched mailbox, before and again after the kill
KILL_AT = 0.4  # of instance a's share acknowledged
TRANSFERS_BEFORE, TRANSFERS_AFTER = 8, 4
BOUND = 120.0  # seconds for anything to settle; far above what a loaded CI machine needs
ADDRESS = {
    "sales": "sales@example.test",
    "support": "support@example.test",
    "billing": "billing@example.test",
    "orders": "orders@example.test",
}
WATCHED = {"billing": "INBOX", "orders": "Orders"}  # both in billing@'s Dovecot account


def config(work: Path, name: str, port: int, url: str, dv: Dovecot, secret: Path) -> Path:
    """Instance ``name``: its own state dir and SMTP port; the store, the Maildirs and
    the pickup directory are shared."""
    imap = (
        f'host = "{dv.host}"\nport = {dv.imap_port}\nuser = "billing@example.test"\n'
        f'password_file = "{secret}"\ntimeout = 10\npoll_interval = 0.5\n'
    )
    text = f"""\
state_dir = "{work / name / "state"}"
hostname = "{name}.mailrouter.example.test"
[templates]
directory = "{TEMPLATES}"
[smtp]
port = {port}
[outbound]
type = "pickup"
path = "{work / "pickup"}"
[outbox]
poll_interval = 0.2
initial_backoff = 0.1
max_backoff = 1.0
heartbeat = 0.5
dead_after = 3
[database]
url = "{url}"
[daemon]
instance_name = "{name}"
shutdown_timeout = 10
[accounts.sales]
address = "{ADDRESS["sales"]}"
[accounts.sales.transfer]
enabled = true
notify = true
template = "transfer_notice"
[accounts.sales.delivery]
path = "{work / "maildir" / "sales"}"
[accounts.support]
address = "{ADDRESS["support"]}"
[accounts.support.transfer]
enabled = true
[accounts.support.delivery]
path = "{work / "maildir" / "support"}"
[accounts.billing]
address = "{ADDRESS["billing"]}"
[accounts.billing.imap]
{imap}mailbox = "INBOX"
[accounts.orders]
address = "{ADDRESS["orders"]}"
[accounts.orders.imap]
{imap}mailbox = "Orders"
"""
    path = work / name / "mailrouter.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")
    return path


def share(corpus: Path, folder: Path, keep: Any) -> Path:
    """A manifest of the corpus's messages for which ``keep(record)`` holds (the files
    stay where they are: the MTA joins an absolute path to nothing)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for line in (corpus / "manifest.jsonl").read_text("utf-8").splitlines():
        record = json.loads(line)
        if keep(record):
            record["file"] = str(corpus / record["file"])
            lines.append(json.dumps(record))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    return folder


def append(dv: Dovecot, mailbox: str, to: str, mid: str) -> None:
    raw = (
        f"From: Watcher Customer <watched@customer.test>\r\nTo: {to}\r\n"
        f"Subject: watched {mid}\r\nMessage-ID: <{mid}>\r\n\r\nread over IMAP\r\n"
    ).encode()
    with dv.imap("billing@example.test") as client:
        typ, data = client.append(mailbox, None, imaplib.Time2Internaldate(time.time()), raw)
        assert typ == "OK", data


class Store:
    """Read-only look-ups in the shared database."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url)

    def scalar(self, stmt: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.scalar(stmt)

    def rows(self, stmt: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(stmt))

    def account_id(self, name: str) -> int:
        return int(self.scalar(select(Account.id).where(Account.name == name)))

    def instance(self, name: str) -> str | None:
        i = INSTANCES.c
        return self.scalar(select(i.id).where(i.name == name, i.stopped_at.is_(None)))

    def lease_holders(self) -> dict[str, str]:
        return {r.name: r.holder for r in self.rows(select(LEASES.c.name, LEASES.c.holder))}

    def stored(self, mids: set[str]) -> Counter[str]:
        m = MESSAGES.c
        found = self.rows(select(m.message_id).where(m.message_id.in_(sorted(mids))))
        return Counter(r.message_id for r in found)

    def open_work(self) -> int:
        o = OUTBOX.c
        return int(
            self.scalar(
                select(func.count()).select_from(OUTBOX).where(o.status.in_(("pending", "sending")))
            )
        )

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture
def shared_url() -> Iterator[str]:
    """A database of its own: the daemons outlive nothing, but a reset of the session's
    database by another test must never happen under them."""
    with fresh_database("mailrouter_multi") as url:
        yield url


def test_two_instances_one_killed_lose_double_and_split_nothing(
    tmp_path: Path, shared_url: str, dovecot_clean: Dovecot
) -> None:
    """2,000 messages over SMTP to two instances, transfers meanwhile, one instance
    SIGKILLed: nothing lost, doubled or split; the IMAP leases move to the survivor."""
    dv = dovecot_clean
    rnd = random.Random(10)
    with dv.imap("billing@example.test") as client:
        typ, data = client.create("Orders")
        assert typ == "OK", data
    secret = tmp_path / "imap-password"
    secret.write_text(dv.password + "\n")
    ports = {"a": free_port(), "b": free_port()}
    paths = {n: config(tmp_path, n, ports[n], shared_url, dv, secret) for n in ports}
    settings: Settings = load(paths["a"], env={})
    corpus = tmp_path / "corpus"
    items = write_corpus(corpus, MESSAGES_SENT, seed=10, owners=("sales", "support"))
    by_n = {i.n: i for i in items}
    store = Store(shared_url)
    daemons = {n: DaemonProcess(paths[n], tmp_path / f"daemon-{n}.log") for n in ports}
    mtas: list[MtaProcess] = []
    try:
        # a first: it migrates the empty database and takes both watch leases.
        daemons["a"].start()
        daemons["a"].wait_ready()
        wait_until(
            lambda: (
                set(store.lease_holders().values()) == {store.instance("a")}
                and len(store.lease_holders()) == 2
            ),
            BOUND,
            "instance a holds both IMAP leases",
        )
        daemons["b"].start()
        daemons["b"].wait_ready()
        a_id, b_id = store.instance("a"), store.instance("b")
        assert a_id and b_id and a_id != b_id

        half = {"a": lambda r: r["n"] % 2 == 0, "b": lambda r: r["n"] % 2 == 1}
        for n in ("a", "b"):
            folder = share(corpus, tmp_path / f"corpus-{n}", half[n])
            mtas.append(
                MtaProcess(folder, tmp_path / f"acks-{n}.jsonl", port=ports[n], seed=ord(n))
            )
        watched = {"before": set[str](), "after": set[str]()}
        for account, mailbox in WATCHED.items():
            for k in range(IMAP_EACH):
                mid = f"watched-before-{account}-{k}@customer.test"
                append(dv, mailbox, ADDRESS[account], mid)
                watched["before"].add(mid)

        transfers: list[int] = []
        sales_id = store.account_id("sales")

        def transfer_one() -> None:
            """The CLI moves a random conversation from sales to support, while mail flows."""
            i = INTERACTIONS.c
            candidates = store.rows(select(i.id).where(i.account_id == sales_id).limit(200))
            if not candidates:
                return
            iid = rnd.choice(candidates).id
            code, out, err = run_cli(
                settings, "transfer", str(iid), "--to", "support", "--by", "test", "--queue-only"
            )
            assert code == 0, (out, err)
            transfers.append(iid)

        a_share = sum(1 for i in items if half["a"]({"n": i.n}))
        for k in range(TRANSFERS_BEFORE):
            goal = int(a_share * KILL_AT * (k + 1) / TRANSFERS_BEFORE)
            wait_until(lambda goal=goal: len(mtas[0].acked()) >= goal, BOUND, f"{goal} acks at a")
            transfer_one()

        # The crash: no drain, no retire; a's claims and leases are left as they were.
        daemons["a"].kill()
        killed_at = time.monotonic()
        o = OUTBOX.c
        stranded = store.scalar(
            select(func.count())
            .select_from(OUTBOX)
            .where(o.status == "sending", o.claimed_by == a_id)
        )
        mtas[0].close()  # its sessions to a are gone; what it had acknowledged is ledgered
        acked_by_a = mtas[0].acked()
        rest = share(
            corpus, tmp_path / "corpus-a-rest", lambda r: half["a"](r) and r["n"] not in acked_by_a
        )
        mtas.append(MtaProcess(rest, tmp_path / "acks-a-rest.jsonl", port=ports["b"], seed=3))
        for account, mailbox in WATCHED.items():
            for k in range(IMAP_EACH):
                mid = f"watched-after-{account}-{k}@customer.test"
                append(dv, mailbox, ADDRESS[account], mid)
                watched["after"].add(mid)
        # The lease runs out dead_after (3 s) after a's last renewal; b is in standby.
        wait_until(
            lambda: set(store.lease_holders().values()) == {b_id},
            BOUND,
            "instance b holds both IMAP leases",
        )
        took_over = time.monotonic() - killed_at
        # Transfers while b takes both MTAs' mail (its own share and what a never
        # acknowledged), spread over what is left: b's MTA may be nearly done by now.
        to_b = len(items) - len(acked_by_a)

        def acked_at_b() -> int:
            return sum(len(m.acked()) for m in mtas[1:])

        for _ in range(TRANSFERS_AFTER):
            goal = min(acked_at_b() + 50, to_b)
            wait_until(lambda goal=goal: acked_at_b() >= goal, BOUND, f"{goal} acks at b")
            transfer_one()

        summaries = [m.wait(BOUND * 3) for m in mtas[1:]]
        for s in summaries:
            assert s["exit"] == 0 and s["protocol_errors"] == 0, summaries
        acked = {r["n"] for m in mtas for r in m.records if 200 <= r["code"] < 300}
        assert acked == set(by_n), f"never acknowledged: {sorted(set(by_n) - acked)[:20]}"

        corpus_ids = {i.message_id for i in items}
        every_watched = watched["before"] | watched["after"]
        maildirs = Maildirs({a: tmp_path / "maildir" / a for a in ("sales", "support")})

        def settled() -> bool:
            copies = maildirs.scan()
            return (
                store.open_work() == 0
                and all(copies.get(mid) for mid in corpus_ids)
                and set(store.stored(every_watched)) == every_watched
            )

        wait_until(settled, BOUND, "every message stored and delivered", interval=0.5)
        assert daemons["b"].stop() == 0, daemons["b"].tail()

        # ---- zero lost, zero duplicated: in the store and in the Maildirs.
        stored = store.stored(corpus_ids | every_watched)
        assert {mid for mid, c in stored.items() if c != 1} == set()
        assert set(stored) == corpus_ids | every_watched
        copies = maildirs.scan()
        doubled = {
            mid: where for mid, where in copies.items() if mid in corpus_ids and len(where) > 1
        }
        assert doubled == {}

        m = MESSAGES.c
        rows = store.rows(
            select(m.message_id, m.interaction_id, m.received_at, o.account_id, o.status)
            .join_from(MESSAGES, OUTBOX, o.message_pk == m.id)
            .where(m.message_id.in_(sorted(corpus_ids)), o.kind == "deliver")
        )
        assert Counter(r.message_id for r in rows) == Counter(dict.fromkeys(corpus_ids, 1))
        assert {r.status for r in rows} == {"sent"}
        names = {store.account_id(a): a for a in ("sales", "support")}
        wrong = [(r.message_id, copies[r.message_id]) for r in rows
                 if copies[r.message_id] != [names[r.account_id]]]  # fmt: skip
        assert wrong == [], "delivered elsewhere than its delivery row says"

        # ---- no split: each corpus conversation is one interaction.
        by_mid = {r.message_id: r for r in rows}
        per_thread: dict[int, set[int]] = {}
        for item in items:
            per_thread.setdefault(item.thread, set()).add(by_mid[item.message_id].interaction_id)
        split = {t: iids for t, iids in per_thread.items() if len(iids) != 1}
        assert split == {}

        # ---- transfers: the new owner, and everything accepted afterwards went there.
        t = Transfer
        moved = store.rows(select(t.interaction_id, t.at, t.to_account_id))
        assert sorted(r.interaction_id for r in moved) == sorted(transfers)
        support_id = store.account_id("support")
        for r in moved:
            owner = store.scalar(
                select(INTERACTIONS.c.account_id).where(INTERACTIONS.c.id == r.interaction_id)
            )
            assert owner == r.to_account_id == support_id
            late = [
                x for x in rows if x.interaction_id == r.interaction_id and x.received_at > r.at
            ]
            assert all(x.account_id == support_id for x in late), (r, late)

        # ---- IMAP: read once each, the mail after the kill by the survivor.
        assert set(store.lease_holders().values()) <= {b_id}  # b released them on stop
        b_decided = {mid for mid in watched["after"] if daemons["b"].count(f"msgid=<{mid}>")}
        assert b_decided == watched["after"]
        print(
            f"two instances: {len(acked)} acked, {len(transfers)} transfers, "
            f"a killed after {len(acked_by_a)} of its {a_share}; IMAP leases at b "
            f"{took_over:.1f} s after the kill; {stranded} deliveries a had claimed; "
            f"clients: {summaries}"
        )
    finally:
        for mta in mtas:
            mta.close()
        for d in daemons.values():
            if d.alive:
                d.kill()
        store.close()
