#!/usr/bin/env python3
"""History benchmark: thread resolution and ingest with a million stored messages.

The history is generated fast, not sent: interactions, messages, their id references and
recipients are written with executemany of Core inserts into the real tables (the
models of ``mailrouter.store``), many rows per transaction, on a store created by
``Runtime.open`` (Alembic's schema, its indexes).  Threads of 1–9 messages, each reply
naming its parent in In-Reply-To and the thread in References, as the SMTP path stores
them.

Then, on that store:

- ``resolve()`` p50/p99 for replies to random stored messages (the In-Reply-To rule),
  replies naming an unknown parent and a stored grandparent (the References rule), and
  new messages (every look-up misses): a read session with the pipeline's ``StoreView``,
  just as ``decide()`` uses it.  Target: p99 ≤ 1 ms.
- ingest: ``Pipeline.accept`` (one durable commit each) of the same fresh threaded
  workload, on an EMPTY store first (the baseline, same run) and then on the full one.
  Target: ≥ 0.9× the empty store's rate.

    python bench/history_bench.py               # 1,000,000 stored messages
    python bench/history_bench.py --quick       # 100,000 (under a minute)
    python bench/history_bench.py --history 300000 --probes 5000

Not a test: it prints figures and never fails because a machine is slow.  Local SQLite
files only; bounded by the sizes given.
"""

from __future__ import annotations

import argparse
import email.utils
import logging
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from sqlalchemy import insert, text  # noqa: E402

from mailrouter.config import load_from_text  # noqa: E402
from mailrouter.parse import parse  # noqa: E402
from mailrouter.pipeline import Pipeline  # noqa: E402
from mailrouter.runtime import Runtime  # noqa: E402
from mailrouter.store.models import (  # noqa: E402
    INTERACTIONS,
    MESSAGE_RECIPIENTS,
    MESSAGE_REFS,
    MESSAGES,
)
from mailrouter.store.queries import StoreView  # noqa: E402
from mailrouter.threads import resolve  # noqa: E402

CONFIG = """
state_dir = "{state}"
[database]
url = "sqlite:///mailrouter.db"
[smtp]
enabled = false
[accounts.sales]
address = "sales@example.test"
[accounts.support]
address = "support@example.test"
"""
BATCH = 20_000  # rows per executemany and per transaction while generating
RAW = b"From: c@customer.example\r\nSubject: s\r\n\r\nhistory\r\n"  # raw is never read here


def hist_id(k: int) -> str:
    return f"h{k}.{k * 2654435761 % 2**32:08x}@mail{k % 97}.customer.example"


def open_pipeline(state: Path) -> Pipeline:
    state.mkdir(parents=True, exist_ok=True)
    settings = load_from_text(CONFIG.format(state=state), state / "mailrouter.toml", env={})
    return Pipeline(Runtime.open(settings))


def generate_history(p: Pipeline, n: int, seed: int) -> tuple[float, list[tuple[int, int]]]:
    """Write ``n`` messages in threads; (seconds, [(message number, its thread's first)])."""
    rnd = random.Random(seed)
    accounts = [p.accounts.id("sales"), p.accounts.id("support")]
    start = datetime(2020, 1, 1, tzinfo=UTC)
    threads: list[tuple[int, int]] = []  # (message number, number of its thread's root)
    t0 = time.perf_counter()
    k = 0
    iid = 0
    while k < n:
        interactions: list[dict[str, object]] = []
        messages: list[dict[str, object]] = []
        refs: list[dict[str, object]] = []
        recipients: list[dict[str, object]] = []
        while k < n and len(messages) < BATCH:
            iid += 1
            account = accounts[iid % 2]
            when = start + timedelta(seconds=iid * 60)
            length = min(rnd.randint(1, 9), n - k)
            interactions.append(
                dict(
                    id=iid,
                    created_at=when,
                    account_id=account,
                    origin_account_id=account,
                    status="open" if rnd.random() < 0.1 else "closed",
                    unread=False,
                    distribution="queue",
                    assigned_agent=None,
                    customer_address=f"customer{iid % 50000}@customer.example",
                    customer_name=f"Customer {iid % 50000}",
                    subject=f"Order {iid}",
                    last_customer_message_pk=k + length,
                    last_activity_at=when,
                )
            )
            root = k + 1
            customer = f"customer{iid % 50000}@customer.example"
            for j in range(length):
                k += 1
                mid = hist_id(k)
                parent = hist_id(k - 1) if j else None
                messages.append(
                    dict(
                        id=k,
                        interaction_id=iid,
                        direction="inbound",
                        account_id=account,
                        routed_to_account_id=None,
                        message_id=mid,
                        synthetic_id=False,
                        in_reply_to=f"<{parent}>" if parent else None,
                        references=" ".join(f"<{hist_id(r)}>" for r in range(root, k)) or None,
                        from_addr=f"Customer {iid % 50000} <{customer}>",
                        reply_to=None,
                        to_addrs=f"{'sales' if account == accounts[0] else 'support'}@example.test",
                        subject=f"{'Re: ' if j else ''}Order {iid}",
                        date=when,
                        size=len(RAW),
                        content_hash=f"{k:064x}",
                        raw=RAW,
                        automatic=None,
                        status="stored",
                        hold_reason=None,
                        rule="in-reply-to" if j else "new-interaction",
                        action="deliver",
                        source="smtp",
                        envelope_from=f"customer{iid % 50000}@customer.example",
                        step=None,
                        matched_id=parent,
                        received_at=when,
                    )
                )
                # The parents as parse() orders them: In-Reply-To, then References
                # nearest-first (the In-Reply-To id once).
                for pos, r in enumerate(range(k - 1, root - 1, -1)):
                    refs.append(dict(message_pk=k, position=pos, ref_id=hist_id(r)))
                recipients.append(dict(message_pk=k, account_id=account))
                threads.append((k, root))
        with p.db.write() as session:
            conn = session.connection()
            conn.execute(insert(INTERACTIONS), interactions)
            conn.execute(insert(MESSAGES), messages)
            if refs:
                conn.execute(insert(MESSAGE_REFS), refs)
            conn.execute(insert(MESSAGE_RECIPIENTS), recipients)
        if sys.stdout.isatty():
            print(f"  history: {k:,} / {n:,} messages", end="\r", flush=True)
    with p.db.write() as session:
        session.execute(text("ANALYZE"))  # what a long-running store's planner would know
    return time.perf_counter() - t0, threads


def probe(mid: str, in_reply_to: str | None, references: Sequence[str]) -> bytes:
    lines = [
        "From: Customer <customer7@customer.example>",
        "To: sales@example.test",
        "Subject: Re: Order",
        f"Date: {email.utils.formatdate()}",
        f"Message-ID: <{mid}>",
    ]
    if in_reply_to:
        lines.append(f"In-Reply-To: <{in_reply_to}>")
    if references:
        lines.append("References: " + " ".join(f"<{r}>" for r in references))
    return ("\r\n".join(lines) + "\r\n\r\nthanks\r\n").encode()


def probes(n_history: int, count: int, seed: int) -> list[tuple[str, bytes]]:
    """(kind, raw): replies to stored messages, to an unknown parent, and new messages."""
    rnd = random.Random(seed + 1)
    out = []
    for i in range(count):
        k = rnd.randint(2, max(2, n_history))
        kind = ("in-reply-to", "references", "new")[i % 3]
        if kind == "in-reply-to":
            raw = probe(f"probe{i}@customer.example", hist_id(k), [hist_id(k - 1), hist_id(k)])
        elif kind == "references":  # the agent's reply (never stored) sits in between
            agent = f"agent{i}@sales.example.test"
            raw = probe(f"probe{i}@customer.example", agent, [hist_id(k), agent])
        else:
            raw = probe(f"probe{i}@customer.example", None, [])
        out.append((kind, raw))
    return out


def time_resolve(
    p: Pipeline, items: list[tuple[str, bytes]], rules: Counter[str] | None = None
) -> dict[str, list[float]]:
    """resolve() per probe, timed by kind; ``rules`` counts which rule answered."""
    out: dict[str, list[float]] = {"all": []}
    parsed = [(kind, parse(raw)) for kind, raw in items]
    clock = time.perf_counter
    with p.db.read() as session:
        view = StoreView(session, p.accounts)
        for kind, msg in parsed:
            t0 = clock()
            found = resolve(msg, view, subject_token=None)
            dt = clock() - t0
            if rules is not None:
                rules[f"{kind}→{found.rule}"] += 1
            out.setdefault(kind, []).append(dt)
            out["all"].append(dt)
    return out


def workload(count: int, seed: int) -> list[bytes]:
    """Fresh threads (the same on both stores): a new message, then replies to it."""
    rnd = random.Random(seed + 2)
    out: list[bytes] = []
    t = 0
    while len(out) < count:
        t += 1
        chain: list[str] = []
        for _ in range(min(rnd.randint(1, 6), count - len(out))):
            mid = f"w{t}.{len(chain)}.{rnd.getrandbits(32):x}@customer.example"
            out.append(probe(mid, chain[-1] if chain else None, list(reversed(chain))[:1]))
            chain.append(mid)
    return out


def time_ingest(stores: Sequence[Pipeline], raws: list[bytes]) -> list[list[float]]:
    """Accept ``raws`` on each store, alternating in chunks so that load on a shared machine
    falls on both alike; the per-message times of each store."""
    times: list[list[float]] = [[] for _ in stores]
    clock = time.perf_counter
    for p in stores:
        # Untimed warm-up (distinct messages): SQLAlchemy compiles and caches each statement
        # on first use, which would otherwise be charged to whichever store runs first.
        for raw in workload(50, seed=-1):
            warm = raw.replace(b"@customer.example>", b"@warmup.example>")
            p.accept(warm, [p.settings.account("sales")], source="bench")
    for at in range(0, len(raws), 25):
        for p, sink in zip(stores, times, strict=True):
            accounts = [p.settings.account("sales")]
            for raw in raws[at : at + 25]:
                t0 = clock()
                p.accept(raw, accounts, source="bench")
                sink.append(clock() - t0)
    return times


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(values: Sequence[float]) -> str:
    return f"p50 {pct(values, 50) * 1e3:.3f} ms, p99 {pct(values, 99) * 1e3:.3f} ms"


def query_plans(db: Path) -> list[str]:
    """SQLite's plan for the two look-ups resolve() makes (does each use an index?)."""
    con = sqlite3.connect(db)
    try:
        plans = []
        for what, sql in (
            (
                "interactions_of",
                "SELECT message_id, interaction_id FROM messages WHERE message_id IN (?) "
                "AND interaction_id IS NOT NULL ORDER BY id",
            ),
            (
                "interactions_referencing",
                "SELECT r.ref_id, m.interaction_id FROM message_refs r JOIN messages m "
                "ON m.id = r.message_pk WHERE r.ref_id IN (?) AND m.interaction_id IS NOT "
                "NULL ORDER BY m.id",
            ),
        ):
            rows = con.execute("EXPLAIN QUERY PLAN " + sql, ("x",)).fetchall()
            plans.append(f"{what}: " + "; ".join(str(r[-1]) for r in rows))
        return plans
    finally:
        con.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--history", type=int, default=1_000_000, help="stored messages")
    ap.add_argument("--probes", type=int, default=3000, help="resolve() calls timed")
    ap.add_argument("--ingest", type=int, default=1000, help="messages accepted per store")
    ap.add_argument("--quick", action="store_true", help="100,000 stored, fewer probes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args(argv)
    if a.quick:
        a.history = min(a.history, 100_000)
        a.probes = min(a.probes, 1500)
        a.ingest = min(a.ingest, 400)
    logging.getLogger("mailrouter").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="mailrouter-history-bench-"))
    try:
        raws = workload(a.ingest, a.seed)
        items = probes(a.history, a.probes, a.seed)

        # The baseline, in the same run: the same probes and workload on an empty store.
        empty = open_pipeline(work / "empty")
        full = open_pipeline(work / "full")
        try:
            gen_s, _ = generate_history(full, a.history, a.seed)
            db = work / "full" / "mailrouter.db"
            print(
                f"history: {a.history:,} messages written in {gen_s:.1f} s "
                f"({a.history / gen_s:,.0f} msg/s, executemany of Core inserts, "
                f"{BATCH:,} per transaction); database {db.stat().st_size / 2**20:.0f} MiB"
            )
            for plan in query_plans(db):
                print(f"  plan {plan}")
            for p in (empty, full):
                time_resolve(p, items[:200])  # warm-up: statement cache, page cache
            resolve_empty = time_resolve(empty, items)
            rules: Counter[str] = Counter()
            resolve_full = time_resolve(full, items, rules)
            ingest_empty, ingest_full = time_ingest([empty, full], raws)
        finally:
            empty.rt.close()
            full.rt.close()

        print(f"\nresolve() over {a.probes} probes (a read session with StoreView)")
        for kind in ("in-reply-to", "references", "new", "all"):
            print(
                f"  {kind:<12} empty store {ms(resolve_empty[kind])}   "
                f"{a.history:,} stored {ms(resolve_full[kind])}"
            )
        print("  answered by: " + ", ".join(f"{k} {v}" for k, v in sorted(rules.items())))
        p99 = pct(resolve_full["all"], 99) * 1e3
        print(f"  p99 with {a.history:,} stored: {p99:.3f} ms (target ≤ 1 ms)")

        rate_empty = len(ingest_empty) / sum(ingest_empty)
        rate_full = len(ingest_full) / sum(ingest_full)
        print(f"\nPipeline.accept of {a.ingest} messages (fresh threads, one commit each)")
        print(f"  empty store   {rate_empty:7.1f} msg/s  {ms(ingest_empty)}")
        print(f"  {a.history:,} stored {rate_full:7.1f} msg/s  {ms(ingest_full)}")
        print("  (target: ≥ 0.9× the empty store's rate)")
        print()
        print(f"ratio ingest-history/empty: {rate_full / rate_empty:.3f}")
        print(
            f"ratio resolve-p99-history/empty: "
            f"{pct(resolve_full['all'], 99) / pct(resolve_empty['all'], 99):.2f}"
        )
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
