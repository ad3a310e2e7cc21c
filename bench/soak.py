#!/usr/bin/env python3
"""Soak: kill -9 mid-ingest at scale — thousands of messages, many SIGKILLs of a real daemon.

The fault test ``tests/faults/test_kill_ingest.py`` at a size a person runs for minutes:
a retrying MTA process sends N distinct, threaded messages (a share of them replies) to
``mailrouter run`` (SQLite, Maildir delivery), which is SIGKILLed at random points and
started again each time.  Afterwards every acknowledged message must be stored, each
delivered exactly once to its conversation's owner, each conversation one interaction,
and the outbox empty.  Printed per run: messages, kills, lost, duplicated, stuck, split,
merged, and the longest delay after a restart until everything acknowledged before its
kill was in the Maildirs (this includes the daemon's own start-up).

    python bench/soak.py --quick          # 400 messages over SMTP, 3 kills (< 1 minute)
    python bench/soak.py                  # 2,500 over SMTP with 10 kills, then 1,000
                                          # over LMTP to 3 recipients each with 5 kills
    python bench/soak.py -n 5000 --kills 20 --proto smtp --seed 7

Not a test, and never fails because a machine is slow: the exit status is 1 only when
something was lost, doubled, left stuck, split or merged.  Bounded (every wait has a
deadline) and loopback only.  The IMAP-watch variant needs the suite's Dovecot and stays
in the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "faults"))

from chaos import RunResult, kill_run  # noqa: E402


def one(workdir: Path, proto: str, n: int, kills: int, seed: int | None) -> RunResult:
    cc = ("sales", "support", "billing") if proto == "lmtp" else ()
    what = f"{n} messages over {proto.upper()}" + (" to 3 recipients each" if cc else "")
    print(f"== {what}, {kills} kills (work dir {workdir})", flush=True)
    began = time.monotonic()
    r = kill_run(
        workdir,
        n=n,
        kills=kills,
        proto=proto,
        cc=cc,
        seed=seed,
        say=lambda line: print(f"  {time.monotonic() - began:6.1f}s  {line}", flush=True),
    )
    return r


def report(r: RunResult) -> None:
    print(
        f"   messages      {r.messages}  (acknowledged {r.acked}, client retries "
        f"{r.client.get('retries')})\n"
        f"   kills         {r.kills}\n"
        f"   lost          {r.lost}\n"
        f"   duplicated    {r.duplicated}\n"
        f"   stuck         {r.stuck}\n"
        f"   split/merged  {r.split}/{r.merged}\n"
        f"   deliveries the killed process had claimed, per kill  {r.in_flight_at_kills}\n"
        f"   longest delay after a restart, until\n"
        f"     the deliveries the killed process had claimed were done  "
        f"{r.longest_stranded:.1f} s  (measured for {len(r.stranded)} of {r.kills})\n"
        f"     everything acknowledged before the kill was delivered  "
        f"{r.longest_recovery:.1f} s  (measured for {len(r.recoveries)} of {r.kills}; the "
        "others were killed again first)\n"
        f"   all delivered {r.finish_after_last_restart:.1f} s after the last restart\n"
        f"   run took      {r.seconds:.0f} s   seed {r.seed}",
        flush=True,
    )
    for p in r.problems[:20]:
        print(f"   PROBLEM: {p}", flush=True)
    for p in r.slow[:20]:
        print(f"   slow (not a failure here): {p}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="400 messages, 3 kills, SMTP only")
    ap.add_argument("-n", "--messages", type=int, help="messages per run")
    ap.add_argument("--kills", type=int, help="SIGKILLs per run")
    ap.add_argument("--proto", choices=("smtp", "lmtp", "both"), help="default: both")
    ap.add_argument("--seed", type=int, help="replay one run's random choices")
    ap.add_argument("--keep", type=Path, help="keep the work (logs, store) in this directory")
    args = ap.parse_args(argv)

    if args.quick:
        plan = [("smtp", args.messages or 400, args.kills or 3)]
    else:
        protos = ["smtp", "lmtp"] if args.proto in (None, "both") else [args.proto]
        sizes = {"smtp": (2500, 10), "lmtp": (1000, 5)}
        plan = [(p, args.messages or sizes[p][0], args.kills or sizes[p][1]) for p in protos]
    base = args.keep or Path(tempfile.mkdtemp(prefix="mailrouter-soak-"))
    base.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    print(f"load average {load:.2f} on {os.cpu_count()} CPUs at start", flush=True)
    results = []
    try:
        for proto, n, kills in plan:
            r = one(base / f"{proto}-{n}", proto, n, kills, args.seed)
            report(r)
            results.append(r)
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end", flush=True)
    for r in results:
        acked, which = max(1, r.acked), "" if r.proto == "smtp" else f"-{r.proto}"
        print(f"ratio lost/acknowledged{which}: {r.lost / acked:g}", flush=True)
        print(f"ratio duplicated/acknowledged{which}: {r.duplicated / acked:g}", flush=True)
    bad = [r for r in results if r.lost or r.duplicated or r.stuck or r.split or r.merged]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
