#!/usr/bin/env python3
"""Maildir delivery benchmark: the rate into an empty mailbox against one that already
holds 100,000 messages, through the real outbox worker on a SQLite store.

Each mailbox gets its own state directory and store.  The full one is pre-filled directly
(small files written without fsync, 90 % in ``cur/`` with flags as a mail client leaves
them, 10 % in ``new/``); the empty one is a fresh Maildir for every round.  A round
stores M ~4 KB messages and queues their deliveries in one transaction through the store
layer, then ``OutboxWorker.run_once()`` delivers them — claims, batched writes and
fsyncs, one commit per batch of outcomes, as the daemon does it — and only that drain is
timed; then the same with M *retries* (an earlier attempt on record, as after a crash:
the path that used to list ``new/`` and ``cur/`` on every delivery).  The two mailboxes'
rounds alternate, so a busy moment on a shared machine falls on both alike.

Printed: deliveries/s per mailbox and kind (the median of the rounds, and each round),
then the ratios full/empty — the target is a full mailbox within 10 % of an empty one.

    python bench/maildir_bench.py              # 100,000 pre-filled, 5 rounds of 3,000
    python bench/maildir_bench.py --quick      # 20,000 pre-filled, 5 rounds of 500 (< 1 min)

Not a test: it prints figures and never fails because a machine is slow.  Bounded: fixed
counts, and every drain is limited to a fixed number of worker rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from sqlalchemy import update  # noqa: E402

from mailrouter.config import Settings, load_from_text  # noqa: E402
from mailrouter.deliver.outbox import OutboxWorker, enqueue  # noqa: E402
from mailrouter.parse import parse  # noqa: E402
from mailrouter.runtime import Runtime  # noqa: E402
from mailrouter.store.inserts import add_message  # noqa: E402
from mailrouter.store.models import Direction, Outbox, OutboxKind, OutboxStatus  # noqa: E402

CONFIG = """
state_dir = "{state}"
[database]
url = "sqlite:///mailrouter.db"
[smtp]
enabled = false
[log]
level = "WARNING"
[accounts.support]
address = "support@example.test"
"""
WORDS = [
    "order",
    "invoice",
    "shipment",
    "delay",
    "refund",
    "account",
    "ticket",
    "please",
    "regards",
    "thanks",
]


def settings_in(state: Path) -> Settings:
    text = CONFIG.format(state=state)
    path = state.parent / "mailrouter.toml"
    path.write_text(text)
    return load_from_text(text, path, env={})


def prefill(box: Path, count: int) -> float:
    """``count`` small message files straight into the Maildir; returns the seconds taken."""
    t0 = time.perf_counter()
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    body = b"From: old@customer.test\nSubject: an old one\n\nread long ago\n"
    base = int(time.time()) - 86400 * 365
    for i in range(count):
        name = f"{base + i // 10}.M{i % 1_000_000:06d}P1Q{i}.prefill"
        path = box / "new" / name if i % 10 == 0 else box / "cur" / f"{name}:2,S"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, body)
        os.close(fd)
    return time.perf_counter() - t0


def message(n: int, rnd: random.Random, size: int = 4096) -> bytes:
    head = (
        f"From: Customer {n % 500} <cust{n % 500}@ext.test>\r\nTo: support@example.test\r\n"
        f"Subject: Ticket {n}\r\nMessage-ID: <bench-{n}.{rnd.getrandbits(40):x}@ext.test>\r\n"
        "Date: Tue, 08 Dec 2026 01:00:00 +0000\r\n\r\n"
    )
    lines, length = [], len(head)
    while length < size:
        line = " ".join(rnd.choices(WORDS, k=12))
        lines.append(line)
        length += len(line) + 2
    return (head + "\r\n".join(lines) + "\r\n").encode()


def queue(rt: Runtime, start: int, count: int, rnd: random.Random, *, retries: bool) -> None:
    """Store ``count`` messages and queue their deliveries, in one transaction."""
    account_id = rt.accounts.id("support")
    # Parsed once: what is measured is delivery, and a full parse per message would make
    # the queueing, not the deliveries, set how long a run takes.
    template = parse(message(start, rnd), "cust@ext.test")
    with rt.db.write() as s:
        ids = []
        for n in range(start, start + count):
            raw = message(n, rnd)
            parsed = dataclasses.replace(
                template,
                raw=raw,
                message_id=f"bench-{n}@ext.test",
                content_hash=hashlib.sha256(raw).hexdigest(),
                envelope_sender=f"cust{n % 500}@ext.test",
            )
            pk = add_message(
                s,
                parsed,
                direction=Direction.INBOUND,
                account_id=account_id,
                interaction_id=None,
                source="bench",
            )
            ids.append(
                enqueue(
                    s,
                    rt.settings,
                    kind=OutboxKind.DELIVER,
                    account_id=account_id,
                    interaction_id=None,
                    message_pk=pk,
                    envelope_to=["support@example.test"],
                )
            )
        if retries:
            # An attempt already on record (a crash before "sent"): the worker's claim
            # makes these second attempts, which must check for an earlier copy.
            s.execute(
                update(Outbox)
                .where(Outbox.id.in_(ids))
                .values(attempts=1, status=OutboxStatus.PENDING.value)
            )


def drain(rt: Runtime, expected: int) -> float:
    """Deliver everything queued; returns the seconds taken."""
    t0 = time.perf_counter()
    done = asyncio.run(OutboxWorker(rt, name="bench").run_once(max_rounds=10_000))
    took = time.perf_counter() - t0
    if done != expected:
        raise SystemExit(f"delivered {done} of {expected}")
    return took


@dataclass
class Case:
    """One mailbox (empty or pre-filled) with its own state directory and store."""

    name: str
    prefilled: int
    tmp: tempfile.TemporaryDirectory[str]
    rt: Runtime
    box: Path
    prefill_s: float
    queued: int = 0
    rates: list[float] = field(default_factory=list)
    retry_rates: list[float] = field(default_factory=list)

    def round(self, count: int, rnd: random.Random, *, retries: bool) -> None:
        queue(self.rt, self.queued, count, rnd, retries=retries)
        self.queued += count
        rate = count / drain(self.rt, count)
        (self.retry_rates if retries else self.rates).append(rate)
        if not self.prefilled:
            # Kept empty: the next round gets a fresh Maildir.  Moved aside, not emptied:
            # unlinking thousands of files would leave journal work for the next round's
            # fsyncs, and charge the empty case for a clean-up the full one never does.
            self.box.rename(self.box.with_name(f"{self.box.name}.{self.queued}"))


def open_case(name: str, prefilled: int) -> Case:
    tmp = tempfile.TemporaryDirectory(prefix="mr-maildir-bench-")
    state = Path(tmp.name) / "state"
    state.mkdir()
    settings = settings_in(state)
    box = settings.account("support").delivery.path
    assert box is not None
    fill_s = prefill(box, prefilled)
    return Case(name, prefilled, tmp, Runtime.open(settings), box, fill_s)


def close_case(case: Case) -> None:
    case.rt.close()
    if case.prefilled:
        in_box = sum(1 for sub in ("new", "cur") for _ in os.scandir(case.box / sub))
        if in_box != case.prefilled + case.queued:
            raise SystemExit(
                f"{case.name}: {in_box} files, expected {case.prefilled + case.queued}"
            )
    case.tmp.cleanup()


def run(prefilled: int, per_round: int, rounds: int) -> tuple[Case, Case]:
    """Both mailboxes, their rounds interleaved (the order alternating), so that a busy
    moment on a shared machine falls on both cases alike."""
    empty, full = open_case("empty", 0), open_case("full", prefilled)
    rnd = random.Random(1)
    try:
        for r in range(rounds):
            for case in (empty, full) if r % 2 == 0 else (full, empty):
                case.round(per_round, rnd, retries=False)
                case.round(per_round, rnd, retries=True)
    finally:
        close_case(empty)
        close_case(full)
    return empty, full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20,000 pre-filled, 500 per round")
    ap.add_argument("--prefill", type=int, help="messages already in the full mailbox")
    ap.add_argument("-n", "--messages", type=int, help="deliveries per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    prefilled = a.prefill or (20_000 if a.quick else 100_000)
    per_round = a.messages or (500 if a.quick else 3_000)
    logging.disable(logging.WARNING)  # the worker's INFO lines are not the figure
    empty, full = run(prefilled, per_round, a.rounds)
    ratio = statistics.median(full.rates) / statistics.median(empty.rates)
    retry_ratio = statistics.median(full.retry_rates) / statistics.median(empty.retry_rates)
    if a.json:
        print(
            json.dumps(
                {
                    case.name: {
                        "prefilled": case.prefilled,
                        "prefill_s": case.prefill_s,
                        "rates": case.rates,
                        "retry_rates": case.retry_rates,
                    }
                    for case in (empty, full)
                }
                | {"ratio": ratio, "retry_ratio": retry_ratio}
            )
        )
        return
    print(
        f"Maildir delivery through the outbox worker (SQLite): {a.rounds} rounds of "
        f"{per_round} ~4 KB messages and {per_round} retries per mailbox"
    )
    for label, case in (("empty mailbox", empty), (f"{prefilled:,} already in it", full)):
        for kind, rates in (("first attempts", case.rates), ("retries", case.retry_rates)):
            each = ", ".join(f"{r:.0f}" for r in rates)
            print(
                f"  {label:<26} {kind:<15} {statistics.median(rates):8.1f} deliveries/s "
                f"median (rounds: {each})"
            )
    print(f"  (pre-filling {prefilled:,} files took {full.prefill_s:.1f} s)")
    print(f"ratio full/empty: {ratio:.3f}")
    print(f"ratio full/empty retries: {retry_ratio:.3f}")


if __name__ == "__main__":
    main()
