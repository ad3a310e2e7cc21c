#!/usr/bin/env python3
"""Replay benchmark: a generated threaded corpus through the real pipeline, against bare SQLite.

A deterministic corpus (seeded) of ~4 KB customer messages is written to a temporary
directory: customers open threads of 1–10 messages at sales@ or support@; replies carry
In-Reply-To and References (often naming an agent reply that is not in the corpus, so the
References rule has to look past it), some are addressed to the other account, and a few
interactions are transferred half-way.  The corpus is then replayed the way
``mailrouter replay`` does it (collect, Date order, recipients from the headers) but one
``Pipeline.accept`` per message — the daemon's path: parse, resolve, decide, insert and one
durable commit (SQLite WAL, synchronous=FULL).

Printed: accept throughput and p50/p99 latency; p50/p99 of ``resolve()`` and ``decide()``
measured on their own (a read session with a StoreView, just before the same message's
accept, so the store is in the state accept will see); wall times; the database size; and a
BASELINE from the same run: the same raw messages inserted into a bare SQLite table with
one commit per message (WAL, synchronous=FULL), and the ratio mailrouter / baseline.

    python bench/replay_bench.py                     # 20000 messages
    python bench/replay_bench.py --quick             # 2000 messages (under a minute)
    python bench/replay_bench.py --profile 25        # also cProfile the accept loop

Not a test: it prints figures and never fails because a machine is slow.
"""

from __future__ import annotations

import argparse
import cProfile
import email.utils
import importlib
import io
import logging
import os
import pstats
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from mailrouter.config import AccountSettings, load_from_text  # noqa: E402
from mailrouter.ingest.replay import Recorded, accounts_for, collect, date_order  # noqa: E402
from mailrouter.parse import parse  # noqa: E402
from mailrouter.pipeline import Accepted, Pipeline  # noqa: E402
from mailrouter.runtime import Runtime  # noqa: E402
from mailrouter.transfer import transfer  # noqa: E402

# The modules whose functions get timed (mailrouter.routing re-exports ``decide``, which
# hides the submodule of the same name from ``import … as``).
pipeline_module = importlib.import_module("mailrouter.pipeline")
decide_module = importlib.import_module("mailrouter.routing.decide")

ACCOUNTS = {"sales": "sales@example.test", "support": "support@example.test"}
WORDS = (
    "order invoice shipment delay refund account ticket customer please regards thanks "
    "update status request support sales quote item delivery parcel tracking number "
    "warehouse address payment card bank transfer received missing damaged replacement "
    "return label courier week monday friday today tomorrow again still waiting contract"
)
VOCABULARY = WORDS.split()
CONFIG = """
state_dir = "{state}"
[database]
url = "sqlite:///mailrouter.db"
[smtp]
enabled = false
[accounts.sales]
address = "sales@example.test"
  [accounts.sales.transfer]
  enabled = true
[accounts.support]
address = "support@example.test"
  [accounts.support.transfer]
  enabled = true
"""


# ---------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    files: int = 0
    bytes: int = 0
    threads: int = 0
    customers: int = 0
    to_other_account: int = 0
    # Message-ID of the customer message after which its interaction is transferred → target.
    transfers: dict[str, str] = field(default_factory=dict)


def _paragraphs(rnd: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        words = rnd.choices(VOCABULARY, k=rnd.randint(60, 90))
        text = " ".join(words).capitalize() + "."
        lines, line = [], ""
        for w in text.split():
            if len(line) + len(w) + 1 > 72:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}" if line else w
        lines.append(line)
        out.append("\n".join(lines))
    return out


def generate(directory: Path, n: int, seed: int) -> Corpus:
    """Write ``n`` messages as ``.eml`` files into ``directory`` (thread by thread)."""
    rnd = random.Random(seed)
    pool = _paragraphs(rnd, 96)
    start = datetime(2024, 3, 1, tzinfo=UTC)
    corpus = Corpus(customers=max(1, n // 12))
    written = 0
    thread = 0
    while written < n:
        length = min(rnd.randint(1, 10), n - written)
        customer = rnd.randrange(corpus.customers)
        home = "sales" if rnd.random() < 0.6 else "support"
        other = "support" if home == "sales" else "sales"
        when = start + timedelta(seconds=rnd.uniform(0, 30 * 86400))
        subject = f"Order {rnd.randrange(10**6):06d}: " + " ".join(rnd.choices(VOCABULARY, k=4))
        # A few threads of three or more are transferred after their middle message.
        transfer_after = length // 2 if length >= 3 and rnd.random() < 0.05 else -1
        chain: list[str] = []  # every id of the conversation so far, agent replies included
        previous_customer = ""
        for k in range(length):
            mid = f"t{thread}.m{k}.{rnd.getrandbits(40):x}@mail{customer % 97}.customer.example"
            to = home
            headers = [
                f"Received: from mail{customer % 97}.customer.example (mail{customer % 97}"
                f".customer.example [192.0.2.{customer % 250 + 1}]) by mx.example.test "
                f"with ESMTPS id {rnd.getrandbits(48):012x}; {email.utils.format_datetime(when)}",
                f'From: "Customer {customer}" <customer{customer}@customer.example>',
            ]
            if k == 0:
                headers.append(f"Subject: {subject}")
            else:
                if rnd.random() < 0.15:
                    to = other
                    corpus.to_other_account += 1
                agent = f"t{thread}.a{k}.{rnd.getrandbits(32):x}@{home}.example.test"
                chain.append(agent)
                style = rnd.random()
                if style < 0.6:  # answers the agent's reply (never stored here)
                    headers.append(f"In-Reply-To: <{agent}>")
                elif style < 0.95:  # answers their own previous message
                    headers.append(f"In-Reply-To: <{previous_customer}>")
                headers.append("References: " + " ".join(f"<{i}>" for i in chain))
                headers.append(f"Subject: Re: {subject}")
            headers += [
                f"To: {ACCOUNTS[to]}",
                f"Date: {email.utils.format_datetime(when)}",
                f"Message-ID: <{mid}>",
                "MIME-Version: 1.0",
                "Content-Type: text/plain; charset=utf-8",
                "Content-Transfer-Encoding: 8bit",
            ]
            body = "\n\n".join(rnd.choices(pool, k=7))
            raw = ("\n".join(headers) + "\n\n" + body + "\n").encode()
            (directory / f"{written:06d}.eml").write_bytes(raw)
            corpus.bytes += len(raw)
            written += 1
            if k == transfer_after:
                corpus.transfers[mid] = other
            chain.append(mid)
            previous_customer = mid
            when += timedelta(seconds=rnd.expovariate(1 / (8 * 3600)) + 60)
        thread += 1
    corpus.files, corpus.threads = written, thread
    return corpus


# ---------------------------------------------------------------------------- measuring


def pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(values: Sequence[float]) -> str:
    return (
        f"p50 {pct(values, 50) * 1000:.2f} ms, p99 {pct(values, 99) * 1000:.2f} ms, "
        f"max {max(values) * 1000:.1f} ms"
    )


def db_size(path: Path) -> tuple[int, int]:
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size, wal.stat().st_size if wal.exists() else 0


@dataclass
class Run:
    accept: list[float] = field(default_factory=list)
    resolve: list[float] = field(default_factory=list)
    decide: list[float] = field(default_factory=list)
    parse: list[float] = field(default_factory=list)
    transfer: list[float] = field(default_factory=list)
    recipients_s: float = 0.0
    loop_s: float = 0.0
    actions: Counter[str] = field(default_factory=Counter)
    rules: Counter[str] = field(default_factory=Counter)


@contextmanager
def timing(module: object, name: str, sink: list[float]) -> Iterator[None]:
    """Replace ``module.name`` by a wrapper that appends each call's duration to ``sink``."""
    real = getattr(module, name)
    clock = time.perf_counter

    def timed(*args: object, **kwargs: object) -> object:
        t0 = clock()
        try:
            return real(*args, **kwargs)
        finally:
            sink.append(clock() - t0)

    setattr(module, name, timed)
    try:
        yield
    finally:
        setattr(module, name, real)


def replay(
    p: Pipeline,
    items: list[Recorded],
    transfers: dict[str, str],
    *,
    instrument: bool,
    wrap: Callable[[Callable[[], None]], None] | None = None,
) -> Run:
    """Accept every item in order (one commit each), transferring where the corpus says.

    With ``instrument``, parse(), decide() and resolve() are timed *inside* accept(): the
    functions the pipeline and decide() call are wrapped, so the figures are those of the
    daemon's own path (in the write transaction), with no extra queries.
    """
    run = Run()
    ids = [parse(i.raw).message_id for i in items]  # bench bookkeeping (transfers): untimed
    t0 = time.perf_counter()
    recipients = [accounts_for(i.raw, p.settings) for i in items]  # as cmd_replay does
    run.recipients_s = time.perf_counter() - t0
    clock = time.perf_counter

    def loop() -> None:
        for item, accounts, mid in zip(items, recipients, ids, strict=True):
            t0 = clock()
            result = p.accept(item.raw, accounts, source="replay")
            run.accept.append(clock() - t0)
            run.actions[result.decision.action] += 1
            run.rules[result.decision.rule] += 1
            target = transfers.get(mid)
            if target and result.interaction_id is not None:
                t0 = clock()
                transfer(p.rt, result.interaction_id, target, actor="bench")
                run.transfer.append(clock() - t0)

    t0 = time.perf_counter()
    with ExitStack() as stack:
        if instrument:
            stack.enter_context(timing(pipeline_module, "parse", run.parse))
            stack.enter_context(timing(pipeline_module, "decide", run.decide))
            stack.enter_context(timing(decide_module, "resolve", run.resolve))
        if wrap is None:
            loop()
        else:
            wrap(loop)
    run.loop_s = time.perf_counter() - t0
    return run


def replay_batched(
    p: Pipeline, items: list[Recorded], transfers: dict[str, str], batch: int
) -> tuple[float, Counter[str]]:
    """``mailrouter replay``'s own path: ``Pipeline.accept_many``, ``batch`` messages per
    transaction (a batch ends early where the corpus transfers, so the transfer sees its
    interaction).  Returns the seconds spent accepting and the rules that decided."""
    ids = [parse(i.raw).message_id for i in items]  # bench bookkeeping: untimed
    recipients = [accounts_for(i.raw, p.settings) for i in items]
    rules: Counter[str] = Counter()
    spent = 0.0
    pending: list[tuple[bytes, list[AccountSettings]]] = []
    clock = time.perf_counter

    def commit() -> list[Accepted]:
        nonlocal spent
        t0 = clock()
        done = p.accept_many(pending, source="replay")
        spent += clock() - t0
        rules.update(r.decision.rule for r in done)
        pending.clear()
        return done

    for item, accounts, mid in zip(items, recipients, ids, strict=True):
        pending.append((item.raw, accounts))
        target = transfers.get(mid)
        if target or len(pending) >= batch:
            last = commit()[-1]
            if target and last.interaction_id is not None:
                transfer(p.rt, last.interaction_id, target, actor="bench")
    if pending:
        commit()
    return spent, rules


def baseline(path: Path, items: list[Recorded]) -> list[float]:
    """The same raw messages into a bare table, one durable commit each (WAL, FULL)."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, message_id TEXT, raw BLOB)")
    ids = [parse(i.raw).message_id for i in items]  # not timed: the baseline does no parsing
    times = []
    clock = time.perf_counter
    for mid, item in zip(ids, items, strict=True):
        t0 = clock()
        con.execute("BEGIN")
        con.execute("INSERT INTO messages (message_id, raw) VALUES (?, ?)", (mid, item.raw))
        con.execute("COMMIT")
        times.append(clock() - t0)
    con.close()
    return times


def open_pipeline(state: Path) -> Pipeline:
    settings = load_from_text(CONFIG.format(state=state), state / "mailrouter.toml", env={})
    return Pipeline(Runtime.open(settings))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=20000, help="corpus size (default 20000)")
    ap.add_argument("--quick", action="store_true", help="a small generated corpus (2000 messages)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch", type=int, default=200, help="messages per transaction (200)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument(
        "--profile",
        type=int,
        metavar="N",
        default=0,
        help="after the measured run, replay again under cProfile and print the top N",
    )
    args = ap.parse_args(argv)
    if args.quick and args.messages == 20000:
        args.messages = 2000
    logging.getLogger("mailrouter").setLevel(logging.WARNING)  # no per-message log lines

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="mailrouter-bench-"))
    try:
        corpus_dir = work / "corpus"
        corpus_dir.mkdir()
        t0 = time.perf_counter()
        corpus = generate(corpus_dir, args.messages, args.seed)
        gen_s = time.perf_counter() - t0
        print(
            f"corpus: {corpus.files} messages, {corpus.threads} threads, {corpus.customers} "
            f"customers, {corpus.bytes / corpus.files / 1024:.1f} KB avg "
            f"({corpus.bytes / 2**20:.1f} MB); {corpus.to_other_account} replies to the other "
            f"account; {len(corpus.transfers)} transfers; generated in {gen_s:.1f} s"
        )
        print(
            f"        in {work} (seed {args.seed}, Python {sys.version.split()[0]}, "
            f"SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs)"
        )

        t0 = time.perf_counter()
        items = date_order(list(collect([corpus_dir])))
        collect_s = time.perf_counter() - t0

        state = work / "state"
        state.mkdir()
        p = open_pipeline(state)
        try:
            run = replay(p, items, corpus.transfers, instrument=True)
        finally:
            p.rt.close()
        loop_s = run.loop_s
        db, wal = db_size(state / "mailrouter.db")

        n = len(items)
        accept_s = sum(run.accept)
        print("\nmailrouter replay (Pipeline.accept per message, SQLite WAL, synchronous=FULL)")
        print(f"  accept():  {n} in {accept_s:.1f} s = {n / accept_s:,.0f} msg/s; {ms(run.accept)}")
        print(f"  decide():  {ms(run.decide)}  [inside accept's write transaction]")
        print(
            f"  resolve(): {ms(run.resolve)}  [inside decide(): one or two indexed look-ups "
            f"+ the rule chain; {len(run.resolve)} calls, duplicates skip it]"
        )
        print(f"  parse():   {ms(run.parse)}")
        if run.transfer:
            print(f"  transfer(): {len(run.transfer)}, {ms(run.transfer)}")
        print("  actions:   " + " ".join(f"{k}={v}" for k, v in sorted(run.actions.items())))
        print("  rules:     " + " ".join(f"{k}={v}" for k, v in sorted(run.rules.items())))
        opened = run.rules["new-interaction"]
        print(
            f"  check:     {opened} interactions opened for {corpus.threads} generated threads"
            + (" (one per thread)" if opened == corpus.threads else " (MISMATCH: resolution bug)")
        )
        print(
            f"  wall:      replay {collect_s + run.recipients_s + loop_s:.1f} s = collect + "
            f"Date sort {collect_s:.1f} s + recipients {run.recipients_s:.1f} s + accept loop "
            f"{loop_s:.1f} s (accept {accept_s:.1f} s, transfers {sum(run.transfer):.1f} s)"
        )
        print(
            f"  database:  {db / 2**20:.1f} MB (+ WAL {wal / 2**20:.1f} MB) for "
            f"{corpus.bytes / 2**20:.1f} MB of mail"
        )

        base = baseline(work / "baseline.db", items)
        base_s = sum(base)
        bdb, bwal = db_size(work / "baseline.db")
        print(
            "\nBASELINE (bare table: INSERT message_id + raw, one commit per message, WAL, "
            "synchronous=FULL)"
        )
        print(f"  insert:    {n} in {base_s:.1f} s = {n / base_s:,.0f} msg/s; {ms(base)}")
        print(f"  database:  {bdb / 2**20:.1f} MB (+ WAL {bwal / 2**20:.1f} MB)")
        print(
            f"\ntime per message: mailrouter/baseline p50 "
            f"{pct(run.accept, 50) / pct(base, 50):.2f}x, "
            f"p99 {pct(run.accept, 99) / pct(base, 99):.2f}x; "
            f"mean accept {statistics.fmean(run.accept) * 1000:.2f} ms vs "
            f"{statistics.fmean(base) * 1000:.2f} ms (target: ratio <= 3)"
        )
        print(f"ratio replay/baseline: {accept_s / base_s:.2f}")  # one commit per message

        bstate = work / "batched"
        bstate.mkdir()
        p = open_pipeline(bstate)
        try:
            batched_s, rules = replay_batched(p, items, corpus.transfers, args.batch)
        finally:
            p.rt.close()
        print(
            f"\nmailrouter replay --batch {args.batch} (Pipeline.accept_many: one transaction "
            f"per batch, as the command does)"
        )
        print(
            f"  accept:    {n} in {batched_s:.1f} s = {n / batched_s:,.0f} msg/s; "
            f"{rules['new-interaction']} interactions opened for {corpus.threads} threads"
        )
        print(f"ratio replay-batched/baseline: {batched_s / base_s:.2f}")  # target <= 3

        if args.profile:
            pstate = work / "profile"
            pstate.mkdir()
            p = open_pipeline(pstate)
            prof = cProfile.Profile()

            def profiled(body: Callable[[], None]) -> None:
                prof.runcall(body)

            try:
                replay(p, items, corpus.transfers, instrument=False, wrap=profiled)
            finally:
                p.rt.close()
            out = io.StringIO()
            stats = pstats.Stats(prof, stream=out).strip_dirs()
            stats.sort_stats("tottime").print_stats(args.profile)
            stats.sort_stats("cumulative").print_stats(args.profile)
            print("\ncProfile of a second accept loop (times inflated by profiling):")
            print(out.getvalue())
        print(f"total wall time of this benchmark: {time.perf_counter() - started:.1f} s")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
