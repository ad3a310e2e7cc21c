#!/usr/bin/env python3
"""Hostile References benchmark: parse and accept messages naming 1 … 40,000 ancestor ids.

A legal message may carry tens of thousands of ids in References (1.7 MB for 40,000).  Each
size is run against a fresh SQLite store that already holds its parent (the message named by
the last References id, or the first In-Reply-To id), so it joins that thread.  Three
shapes: one folded References field, one folded In-Reply-To, one References field per id.

Printed per size: the time of ``parse()`` alone, of ``Pipeline.accept`` (parse, resolve,
decide, insert, commit), the accept time as a ratio of a 1-id message's, the rows written to
``message_refs``, and the worst latency of 1-line messages sent through ``accept_async`` (the
daemon's group-commit writer) every 50 ms while the big one is in flight — what ordinary mail
suffers meanwhile.

    python bench/references_bench.py --quick          # 1k, 10k, 40k ids, one run each
    python bench/references_bench.py                  # also In-Reply-To and header shapes
    python bench/references_bench.py --sizes 1000 5000 --runs 5

Not a test: it prints figures and never fails because a machine is slow.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from sqlalchemy import func, select  # noqa: E402

from mailrouter.config import load_from_text  # noqa: E402
from mailrouter.parse import parse  # noqa: E402
from mailrouter.pipeline import Pipeline  # noqa: E402
from mailrouter.runtime import Runtime  # noqa: E402
from mailrouter.store.models import MESSAGE_REFS  # noqa: E402

CONFIG = """
state_dir = "{state}"
[database]
url = "sqlite:///mailrouter.db"
[smtp]
enabled = false
[accounts.sales]
address = "sales@example.test"
"""
BYSTANDER_EVERY = 0.05  # seconds between the 1-line messages sent meanwhile


def ids(n: int) -> list[str]:
    """``n`` distinct ids of about 40 bytes with their folding: 40,000 make 1.6 MB."""
    return [f"ancestor-{k:07d}.{k * 7919 % 100003:05d}@hostile.example" for k in range(n)]


def message(mid: str, header_lines: list[str], body: str = "hello") -> bytes:
    lines = [
        "From: Probe <probe@hostile.example>",
        "To: sales@example.test",
        "Subject: Re: order",
        "Date: Tue, 12 Mar 2024 10:00:00 +0000",
        f"Message-ID: <{mid}>",
        *header_lines,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


def references_folded(refs: list[str]) -> list[str]:
    """One References field, folded one id per line (CRLF + space), as clients write it."""
    return ["References: " + "\r\n ".join(f"<{r}>" for r in refs)] if refs else []


def in_reply_to_folded(refs: list[str]) -> list[str]:
    return ["In-Reply-To: " + "\r\n ".join(f"<{r}>" for r in refs)] if refs else []


def references_lines(refs: list[str]) -> list[str]:
    """One ``References:`` field per id (illegal, but parse() joins repeated fields)."""
    return [f"References: <{r}>" for r in refs]


SHAPES: dict[str, Callable[[list[str]], list[str]]] = {
    "references": references_folded,
    "in-reply-to": in_reply_to_folded,
    "references-lines": references_lines,
}
# The id whose message is stored first: the nearest ancestor, the last References id; of an
# In-Reply-To only the first id counts (RFC 5322 §3.6.4 gives it one).
STORED = {"references": -1, "in-reply-to": 0, "references-lines": -1}


@contextlib.contextmanager
def pipeline() -> Iterator[Pipeline]:
    with tempfile.TemporaryDirectory(prefix="mailrouter-refs-bench-") as tmp:
        path = Path(tmp) / "mailrouter.toml"
        text = CONFIG.format(state=tmp)
        path.write_text(text, encoding="utf-8")
        p = Pipeline(Runtime.open(load_from_text(text, path)))
        try:
            yield p
        finally:
            p.rt.close()


@dataclass
class Figures:
    size: int
    bytes: int
    parse: float
    accept: float
    rule: str
    refs_rows: int
    bystanders: int
    bystander_worst: float


def _refs_rows(p: Pipeline, message_pk: int | None) -> int:
    with p.rt.db.read() as session:
        n = session.scalar(
            select(func.count())
            .select_from(MESSAGE_REFS)
            .where(MESSAGE_REFS.c.message_pk == message_pk)
        )
    return int(n or 0)


async def _with_bystanders(p: Pipeline, raw: bytes) -> tuple[int, float]:
    """Accept ``raw`` on the daemon path; 1-line messages meanwhile: (how many, worst latency)."""
    accounts = p.settings.accounts
    big = asyncio.create_task(p.accept_async(raw, accounts, source="bench"))
    latencies: list[float] = []
    k = 0
    while not big.done():
        k += 1
        small = message(f"bystander-{k}@customer.example", [], body="1 line")
        t0 = time.perf_counter()
        await p.accept_async(small, accounts, source="bench")
        latencies.append(time.perf_counter() - t0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(big), BYSTANDER_EVERY)
    await big
    await p.rt.aclose()
    return len(latencies), max(latencies, default=0.0)


def run_one(shape: str, n: int, bystanders: bool) -> Figures:
    refs = ids(n)
    raw = message(f"probe-{shape}-{n}@hostile.example", SHAPES[shape](refs))
    with pipeline() as p:
        # The parent is stored, so the big message has a thread to join.
        p.accept(message(refs[STORED[shape]], []), p.settings.accounts, source="bench")
        t0 = time.perf_counter()
        parse(raw)
        parsed = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = p.accept(raw, p.settings.accounts, source="bench")
        accepted = time.perf_counter() - t0
        rows = _refs_rows(p, result.message_pk)
    count, worst = 0, 0.0
    if bystanders:
        with pipeline() as p:
            p.accept(message(refs[STORED[shape]], []), p.settings.accounts, source="bench")
            again = message(f"probe-{shape}-{n}-b@hostile.example", SHAPES[shape](refs))
            count, worst = asyncio.run(_with_bystanders(p, again))
    return Figures(n, len(raw), parsed, accepted, result.decision.rule, rows, count, worst)


def median_of(runs: list[Figures]) -> Figures:
    best = runs[0]
    best.parse = statistics.median(r.parse for r in runs)
    best.accept = statistics.median(r.accept for r in runs)
    best.bystander_worst = statistics.median(r.bystander_worst for r in runs)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="References only, one run per size")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 40_000])
    ap.add_argument("--runs", type=int, default=3, help="runs per size (median printed)")
    ap.add_argument("--shape", choices=[*SHAPES, "all"], default=None)
    ap.add_argument("--no-bystanders", action="store_true", help="skip the daemon-path run")
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    shapes = [args.shape] if args.shape not in (None, "all") else list(SHAPES)
    if args.quick and args.shape is None:
        shapes = ["references"]
    ratios: list[tuple[str, float]] = []
    for shape in shapes:
        base = median_of([run_one(shape, 1, False) for _ in range(runs)])
        print(f"\n{shape}: {runs} run(s) per size, 1-id message accept {base.accept * 1e3:.1f} ms")
        print(
            f"{'ids':>7} {'bytes':>9} {'parse ms':>10} {'accept ms':>10} {'x 1-id':>8} "
            f"{'refs rows':>9} {'rule':>12} {'bystanders':>10} {'worst ms':>9}"
        )
        for n in args.sizes:
            f = median_of([run_one(shape, n, not args.no_bystanders) for _ in range(runs)])
            print(
                f"{f.size:>7} {f.bytes:>9} {f.parse * 1e3:>10.1f} {f.accept * 1e3:>10.1f} "
                f"{f.accept / base.accept:>8.1f} {f.refs_rows:>9} {f.rule:>12} "
                f"{f.bystanders:>10} {f.bystander_worst * 1e3:>9.1f}"
            )
            ratios.append((f"accept-{shape}-{n}-ids/1-id", f.accept / base.accept))
            sys.stdout.flush()
    print()
    for what, value in ratios:
        print(f"ratio {what}: {value:.1f}")


if __name__ == "__main__":
    main()
