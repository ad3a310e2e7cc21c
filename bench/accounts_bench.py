#!/usr/bin/env python3
"""Accounts benchmark: 1,000 configured accounts against 2 — start-up and routing speed.

Start-up: ``mailrouter run`` (SQLite, Maildir delivery, the SMTP listener) from exec to
its ``event=ready`` line — config load, migrations check, the accounts mirrored into the
store, the listener bound — for a first start (every account row written) and a restart
(accounts already in sync).  Target: under 2 s with 1,000 accounts.

Routing speed: the same threaded workload through ``Pipeline.accept`` (one durable commit
each), each recipient looked up by address as the SMTP listener does at RCPT, with 2 and
with 1,000 accounts configured, alternating in chunks so load on a shared machine falls on
both alike.  Target: unchanged (ratio ≈ 1).

    python bench/accounts_bench.py             # 1,000 accounts, 3 starts each, 2,000 messages
    python bench/accounts_bench.py --quick     # 1 start each, 400 messages
    python bench/accounts_bench.py --accounts 5000

Not a test: it prints figures and never fails because a machine is slow.  Loopback only;
every wait has a timeout.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from mailrouter.config import load  # noqa: E402
from mailrouter.pipeline import Pipeline  # noqa: E402
from mailrouter.runtime import Runtime  # noqa: E402
from smtp_bench import free_port, running, write_configs  # noqa: E402


def names(count: int) -> list[str]:
    """``sales``, ``support``, then ``acct0003`` … (the two the workload writes to first)."""
    return ["sales", "support", *(f"acct{k:04d}" for k in range(3, count + 1))]


def startups(tmp: Path, count: int, starts: int) -> tuple[float, list[float]]:
    """(first start, [restarts]) of ``mailrouter run`` with ``count`` accounts, to ready."""
    configs = write_configs(tmp, f"sqlite:///{tmp / 'mailrouter.db'}", free_port(), 1, names(count))
    times = []
    for _ in range(starts + 1):
        with running(configs) as (_, startup):
            times.append(startup)
    return times[0], times[1:]


def workload(count: int, seed: int) -> list[tuple[str, bytes]]:
    """(recipient, raw): threads of 1–6 to sales@ and support@, replies naming the parent."""
    rnd = random.Random(seed)
    out: list[tuple[str, bytes]] = []
    t = 0
    while len(out) < count:
        t += 1
        rcpt = ("sales", "support")[t % 2] + "@example.test"
        parent = None
        for k in range(min(rnd.randint(1, 6), count - len(out))):
            mid = f"a{t}.{k}.{rnd.getrandbits(32):x}@customer.example"
            lines = [
                f"From: Customer {t % 300} <customer{t % 300}@customer.example>",
                f"To: {rcpt}",
                f"Subject: {'Re: ' if parent else ''}Order {t}",
                "Date: Tue, 01 Dec 2026 10:00:00 +0000",
                f"Message-ID: <{mid}>",
            ]
            if parent:
                lines += [f"In-Reply-To: <{parent}>", f"References: <{parent}>"]
            body = " ".join(rnd.choices(["order", "invoice", "refund", "thanks"], k=600))
            out.append((rcpt, ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()))
            parent = mid
    return out


def routing(pipelines: Sequence[Pipeline], msgs: list[tuple[str, bytes]]) -> list[list[float]]:
    times: list[list[float]] = [[] for _ in pipelines]
    clock = time.perf_counter
    for p in pipelines:  # untimed warm-up: the statement cache fills on first use
        for rcpt, raw in workload(30, seed=-1):
            acc = p.settings.account_for_address(rcpt)
            assert acc is not None
            p.accept(raw.replace(b"@customer.example>", b"@warm.example>"), [acc], source="b")
    for at in range(0, len(msgs), 25):
        for p, sink in zip(pipelines, times, strict=True):
            for rcpt, raw in msgs[at : at + 25]:
                t0 = clock()
                acc = p.settings.account_for_address(rcpt)  # as the listener does at RCPT
                assert acc is not None
                p.accept(raw, [acc], source="bench")
                sink.append(clock() - t0)
    return times


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accounts", type=int, default=1000)
    ap.add_argument("--starts", type=int, default=3, help="restarts timed per size")
    ap.add_argument("-n", "--messages", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="1 restart each, 400 messages")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    if a.quick:
        a.starts, a.messages = 1, min(a.messages, 400)
    logging.getLogger("mailrouter").setLevel(logging.WARNING)
    sizes = (2, a.accounts)
    with tempfile.TemporaryDirectory(prefix="mailrouter-accounts-bench-") as tmp_name:
        tmp = Path(tmp_name)
        print(f"mailrouter run to event=ready (SQLite, SMTP listener), {a.starts} restart(s) each")
        first: dict[int, float] = {}
        again: dict[int, float] = {}
        for count in sizes:
            f, r = startups(tmp / f"run{count}", count, a.starts)
            first[count], again[count] = f, statistics.median(r)
            print(
                f"  {count:>5} accounts: first start {f:.2f} s (accounts mirrored), "
                f"restart median {again[count]:.2f} s  ({', '.join(f'{x:.2f}' for x in r)})"
            )
        print(f"  target: under 2 s with {a.accounts} accounts")

        pipelines = []
        for count in sizes:
            cfg = write_configs(
                tmp / f"route{count}",
                f"sqlite:///{tmp / f'route{count}' / 'mailrouter.db'}",
                free_port(),
                1,
                names(count),
            )[0]
            t0 = time.perf_counter()
            pipelines.append(Pipeline(Runtime.open(load(cfg, env={}))))
            opened = time.perf_counter() - t0
            print(f"  {count:>5} accounts: config load + Runtime.open {opened:.2f} s")
        try:
            msgs = workload(a.messages, a.seed)
            times = routing(pipelines, msgs)
        finally:
            for p in pipelines:
                p.rt.close()
        print(
            f"\nrouting: Pipeline.accept of {a.messages} messages, recipient looked up by address"
        )
        rates = []
        for count, ts in zip(sizes, times, strict=True):
            rates.append(len(ts) / sum(ts))
            print(
                f"  {count:>5} accounts: {rates[-1]:7.1f} msg/s  p50 {pct(ts, 50) * 1e3:.2f} ms  "
                f"p99 {pct(ts, 99) * 1e3:.2f} ms"
            )
        print()
        print(f"ratio startup-{a.accounts}/2-accounts: {again[a.accounts] / again[2]:.2f}")
        print(f"ratio routing-{a.accounts}/2-accounts: {rates[1] / rates[0]:.3f}")
        print(f"startup with {a.accounts} accounts: {again[a.accounts]:.2f} s (target < 2 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
