#!/usr/bin/env python3
"""SMTP ingest benchmark: ``mailrouter run`` against a bare aiosmtpd discard sink.

Both servers run in their own process on 127.0.0.1; the client runs in a third process
with C concurrent aiosmtplib sessions, each reusing its connection, sending ~4 KB
threaded messages to the two example accounts.  mailrouter runs with the embedded
defaults (SQLite, Maildir delivery, synchronous=FULL): every 250 it sends comes after a
durable commit.  Printed per server: messages/s, p50/p99 client-side latency (MAIL + RCPT
+ DATA on an open session); then the ratio mailrouter / sink, and how long mailrouter
took until every message was in its Maildir.

    python bench/smtp_bench.py                 # 3000 messages, 8 sessions
    python bench/smtp_bench.py -n 10000 -c 8

Not a test: it prints figures and never fails because a machine is slow.  Bounded: a
fixed number of messages, every wait has a timeout, loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = [
    "order",
    "invoice",
    "shipment",
    "delay",
    "refund",
    "account",
    "ticket",
    "customer",
    "please",
    "regards",
    "thanks",
    "update",
    "status",
    "request",
    "support",
    "sales",
    "quote",
    "item",
]

SINK = r"""
import asyncio, sys
from aiosmtpd.smtp import SMTP

class Sink:
    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 OK"

async def main(port):
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: SMTP(Sink(), data_size_limit=None), "127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1])))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_messages(n: int, size: int, seed: int = 1) -> list[tuple[str, bytes]]:
    """``n`` (recipient, message) pairs, ~``size`` bytes each; half are replies in threads."""
    rnd = random.Random(seed)
    out: list[tuple[str, bytes]] = []
    ids: list[str] = []
    for i in range(n):
        mid = f"<{i}.{rnd.getrandbits(48):x}@client{rnd.randrange(50)}.ext.test>"
        rcpt = "sales@example.test" if i % 2 else "support@example.test"
        hdr = [
            f'From: "Customer {i % 500}" <cust{i % 500}@ext.test>',
            f"To: {rcpt}",
            f"Subject: {'Re: ' if ids and i % 2 else ''}Ticket {i % 700}: "
            + " ".join(rnd.choices(WORDS, k=5)),
            f"Date: {email.utils.formatdate(localtime=False)}",
            f"Message-ID: {mid}",
        ]
        if ids and i % 2:
            parent = ids[rnd.randrange(max(0, len(ids) - 200), len(ids))]
            hdr += [f"In-Reply-To: {parent}", f"References: {parent}"]
        hdr += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8"]
        head = "\r\n".join(hdr) + "\r\n\r\n"
        lines, length = [], len(head)
        while length < size:
            line = " ".join(rnd.choices(WORDS, k=12))
            lines.append(line)
            length += len(line) + 2
        out.append((rcpt, (head + "\r\n".join(lines) + "\r\n").encode()))
        ids.append(mid)
    return out


async def drive(port: int, msgs: list[tuple[str, bytes]], conc: int) -> tuple[float, list[float]]:
    import aiosmtplib

    lat: list[float] = []
    it = iter(range(len(msgs)))

    async def session() -> None:
        c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=60)
        await c.connect()
        for i in it:  # shared iterator: whichever session is free takes the next message
            rcpt, data = msgs[i]
            t = time.perf_counter()
            await c.sendmail(f"cust{i % 500}@ext.test", [rcpt], data)
            lat.append(time.perf_counter() - t)
        await c.quit()

    t0 = time.perf_counter()
    await asyncio.gather(*(session() for _ in range(conc)))
    return time.perf_counter() - t0, lat


def _client(port: int, n: int, size: int, conc: int, q: mp.Queue) -> None:  # type: ignore[type-arg]
    msgs = make_messages(n, size)
    q.put(asyncio.run(drive(port, msgs, conc)))


def run_client(port: int, n: int, size: int, conc: int) -> tuple[float, list[float]]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_client, args=(port, n, size, conc, q))
    p.start()
    wall, lat = q.get(timeout=1800)
    p.join(60)
    return wall, lat


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def wait_line(proc: subprocess.Popen[str], marker: str, timeout: float = 60) -> str:
    assert proc.stderr is not None or proc.stdout is not None
    stream = proc.stdout if marker == "ready" else proc.stderr
    assert stream is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            raise SystemExit(f"server exited before '{marker}'")
        if marker in line:
            return line
    raise SystemExit(f"no '{marker}' within {timeout}s")


def bench_sink(n: int, size: int, conc: int) -> dict[str, float]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SINK, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        wait_line(proc, "ready")
        wall, lat = run_client(port, n, size, conc)
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stdout:
            proc.stdout.close()
    return {
        "msgs_per_s": n / wall,
        "p50_ms": pct(lat, 50) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
        "wall_s": wall,
    }


def bench_mailrouter(n: int, size: int, conc: int) -> dict[str, float]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mr-smtp-bench-") as tmp:
        cfg = Path(tmp) / "mailrouter.toml"
        example = (ROOT / "config" / "mailrouter.example.toml").read_text()
        example = example.replace(
            'directory = "templates"', f'directory = "{ROOT / "config" / "templates"}"'
        )
        example = example.replace("port = 2525", f"port = {port}")
        example = example.replace('level = "INFO"', 'level = "WARNING"')
        cfg.write_text(example)
        env = {**os.environ, "MAILROUTER_STATE_DIR": str(Path(tmp) / "state")}
        exe = [sys.executable, "-m", "mailrouter", "-c", str(cfg), "--log-format", "kv"]
        subprocess.run([*exe, "db", "upgrade"], env=env, check=True, capture_output=True)
        proc = subprocess.Popen([*exe, "-v", "run"], env=env, stderr=subprocess.PIPE, text=True)
        try:
            wait_line(proc, "event=ready")
            # Quiet from here: -v was only for the ready line; drain stderr in a thread.
            import threading

            assert proc.stderr is not None
            stderr = proc.stderr
            threading.Thread(target=lambda: [None for _ in stderr], daemon=True).start()
            t0 = time.perf_counter()
            wall, lat = run_client(port, n, size, conc)
            maildirs = [Path(tmp) / "state" / "maildir" / a / "new" for a in ("sales", "support")]
            deadline = time.monotonic() + 600
            delivered = 0
            while time.monotonic() < deadline:
                delivered = sum(len(os.listdir(d)) for d in maildirs if d.is_dir())
                if delivered >= n:
                    break
                time.sleep(0.05)
            all_delivered = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(60)
        db_size = (Path(tmp) / "state" / "mailrouter.db").stat().st_size
    return {
        "msgs_per_s": n / wall,
        "p50_ms": pct(lat, 50) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
        "wall_s": wall,
        "delivered": delivered,
        "all_in_maildir_s": all_delivered,
        "db_mib": db_size / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--messages", type=int, default=3000)
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    sink = bench_sink(a.messages, a.size, a.concurrency)
    mr = bench_mailrouter(a.messages, a.size, a.concurrency)
    ratio = mr["msgs_per_s"] / sink["msgs_per_s"]
    if a.json:
        print(
            json.dumps(
                {
                    "sink": sink,
                    "mailrouter": mr,
                    "ratio": ratio,
                    "messages": a.messages,
                    "sessions": a.concurrency,
                }
            )
        )
        return
    print(
        f"{a.messages} messages of ~{a.size} B, {a.concurrency} SMTP sessions, client in its "
        "own process"
    )
    for name, r in (("aiosmtpd discard sink", sink), ("mailrouter (SQLite+Maildir)", mr)):
        print(
            f"  {name:<28} {r['msgs_per_s']:8.1f} msg/s   p50 {r['p50_ms']:7.2f} ms   "
            f"p99 {r['p99_ms']:7.2f} ms"
        )
    print(f"  ratio mailrouter/sink: {ratio:.3f}")
    print(
        f"  mailrouter: all {int(mr['delivered'])} in Maildir after {mr['all_in_maildir_s']:.1f} s;"
        f" database {mr['db_mib']:.1f} MiB"
    )


if __name__ == "__main__":
    main()
