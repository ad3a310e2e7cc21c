#!/usr/bin/env python3
"""Memory per message: the peak RSS growth of ``mailrouter run`` for big DATA.

Starts the daemon in its own process on 127.0.0.1 (SQLite, Maildir delivery), sends one
small message to warm it up, resets the kernel's peak-RSS mark (``/proc/PID/clear_refs``),
then sends one message of ``--size`` MiB (a base64 attachment: 76-character lines, as
real mail has) with smtplib, or ``--parallel N`` of them at once on N sessions.  Printed:
the peak growth over the resident size before the messages, until their 250 (ingest:
DATA, parse, hash, insert) and until their Maildir copies are written (delivery too),
each as a ratio to the bytes in flight; and what stays resident afterwards.
``--breakdown`` also measures, in this process with tracemalloc, what the pure-Python
steps of ingest allocate at their peak for one such message.  The last line is
``ratio peak/size: X`` (the peak growth to the 250 over the bytes in flight), the line CI
smoke-checks.

``--many N`` measures something else: whether the resident size stays flat.  It sends N
distinct ~4 KB messages over a few SMTP sessions (a new session every 100 messages, as
an MTA's connection cache does), waits until all are delivered, and prints the resident
size at the start, every tenth of the way and at the end; its last line is
``ratio rss end/start: X``.

    python bench/memory_bench.py --quick       # 8 MiB
    python bench/memory_bench.py --size 26     # the message of the issue
    python bench/memory_bench.py --quick --parallel 4
    python bench/memory_bench.py --many 20000  # RSS over many small messages

Not a test: it prints figures and never fails because a machine is slow.  Bounded: at
most 16 big messages and 200,000 small ones, every wait has a timeout, loopback only.
Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import random
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_message(size: int, msgid: str) -> bytes:
    """A multipart message of about ``size`` bytes, CRLF line endings, as on the wire."""
    head = (
        "From: Carol Customer <carol@customer.test>\r\n"
        "To: sales@example.test\r\n"
        "Subject: Scans of the damaged shipment\r\n"
        f"Message-ID: <{msgid}@customer.test>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain\r\n\r\nPhotos attached.\r\n"
        "--b1\r\nContent-Type: application/octet-stream\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    raw = random.Random(1).randbytes(max(0, size - len(head) - 16) * 3 // 4 * 76 // 78)
    b64 = base64.encodebytes(raw).replace(b"\n", b"\r\n")  # 76 characters + CRLF
    return head + b64 + b"--b1--\r\n"


def status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of ``pid``, in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak(pid: int) -> None:
    # "5" resets VmHWM to the current RSS (Linux >= 4.0, proc(5)).
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def maildir_count(path: Path) -> int:
    new = path / "new"
    return len(os.listdir(new)) if new.is_dir() else 0


def wait_for(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def send(port: int, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as c:
        refused = c.sendmail("carol@customer.test", ["sales@example.test"], data)
    if refused:
        raise SystemExit(f"refused: {refused}")


@dataclass
class Daemon:
    pid: int
    port: int
    maildir: Path


@contextlib.contextmanager
def daemon(max_message_size: int) -> Iterator[Daemon]:
    """``mailrouter run`` on 127.0.0.1 in its own state dir, warmed up by one message."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mr-membench-") as tmp:
        state = Path(tmp) / "state"
        config = Path(tmp) / "mailrouter.toml"
        config.write_text(
            f'state_dir = "{state}"\n'
            f'[templates]\ndirectory = "{ROOT / "config" / "templates"}"\n'
            f"[smtp]\nport = {port}\nmax_message_size = {max_message_size}\n"
            "[outbox]\npoll_interval = 0.2\n"
            '[accounts.sales]\naddress = "sales@example.test"\n'
        )
        exe = ROOT / ".venv" / "bin" / "mailrouter"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mailrouter"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROUTER_")}
        proc = subprocess.Popen(
            [*cmd, "-c", str(config), "run"], env=env, stderr=subprocess.PIPE, text=True
        )
        try:
            assert proc.stderr is not None
            ready = threading.Event()

            def drain() -> None:  # keep reading stderr so the daemon never blocks on it
                assert proc.stderr is not None
                for line in proc.stderr:
                    if "event=ready" in line:
                        ready.set()

            threading.Thread(target=drain, daemon=True).start()
            if not ready.wait(60):
                raise SystemExit("mailrouter did not start within 60 s")
            maildir = state / "maildir" / "sales"
            send(port, make_message(4096, "warm-up"))
            if not wait_for(lambda: maildir_count(maildir) == 1, 30):
                raise SystemExit("warm-up message not delivered within 30 s")
            time.sleep(0.5)
            yield Daemon(proc.pid, port, maildir)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def measure(size: int, parallel: int = 1) -> dict[str, float]:
    with daemon(size + 4 * MIB) as d:
        messages = [make_message(size, f"big-{i}") for i in range(parallel)]
        before = status(d.pid)["VmRSS"]
        reset_peak(d.pid)
        t0 = time.monotonic()
        senders = [threading.Thread(target=send, args=(d.port, m)) for m in messages]
        for t in senders:
            t.start()
        for t in senders:
            t.join(120)
        ingest_s = time.monotonic() - t0
        ingest_peak = status(d.pid)["VmHWM"]
        if not wait_for(lambda: maildir_count(d.maildir) == 1 + parallel, 120):
            raise SystemExit("big messages not delivered within 120 s")
        time.sleep(0.5)
        total = status(d.pid)
        return {
            "size": sum(len(m) for m in messages),
            "before": before,
            "ingest_peak": ingest_peak - before,
            "total_peak": total["VmHWM"] - before,
            "after": total["VmRSS"] - before,
            "ingest_s": ingest_s,
        }


def many(count: int, sessions: int = 4) -> list[tuple[int, int]]:
    """Send ``count`` ~4 KB messages on ``sessions`` at once; (messages, RSS) samples."""
    with daemon(1 * MIB) as d:
        samples = [(0, status(d.pid)["VmRSS"])]
        sent = [0] * sessions
        failed: list[BaseException] = []

        def sender(n: int) -> None:
            mine = range(n, count, sessions)
            try:
                for batch in range(0, len(mine), 100):
                    with smtplib.SMTP("127.0.0.1", d.port, timeout=120) as c:
                        for i in mine[batch : batch + 100]:
                            data = make_message(4096, f"many-{i}")
                            c.sendmail("carol@customer.test", ["sales@example.test"], data)
                            sent[n] += 1
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failed.append(exc)

        threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(sessions)]
        for t in threads:
            t.start()
        step = max(1, count // 10)
        mark = step
        deadline = time.monotonic() + 60 + count * 0.05
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            done = sum(sent)
            if done >= mark:
                samples.append((done, status(d.pid)["VmRSS"]))
                mark += step
            time.sleep(0.1)
        if failed or any(t.is_alive() for t in threads):
            raise SystemExit(f"sending failed or timed out: {failed[:1]}")
        if not wait_for(lambda: maildir_count(d.maildir) == 1 + count, 60 + count * 0.02):
            raise SystemExit(f"{count} messages not delivered in time")
        time.sleep(0.5)
        samples.append((count, status(d.pid)["VmRSS"]))
        return samples


def breakdown(size: int) -> list[tuple[str, int]]:
    """tracemalloc peaks of the pure-Python ingest steps, for the same message."""
    import tracemalloc

    from mailrouter.parse import content_hash, parse

    data = make_message(size, "big")
    out: list[tuple[str, int]] = []
    for name, step in (("content_hash()", content_hash), ("parse() incl. hash", parse)):
        tracemalloc.start()
        kept = step(data)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del kept
        out.append((name, peak))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=float, default=26.0, help="message size in MiB (26)")
    ap.add_argument("--quick", action="store_true", help="an 8 MiB message")
    ap.add_argument("--parallel", type=int, default=1, help="messages sent at once (1)")
    ap.add_argument("--breakdown", action="store_true", help="also tracemalloc per step")
    ap.add_argument("--many", type=int, metavar="N", help="RSS over N ~4 KB messages instead")
    args = ap.parse_args()
    if args.many:
        count = max(10, min(args.many, 200_000))
        samples = many(count)
        for done, rss in samples:
            print(f"rss after {done:7d} messages {rss / MIB:8.1f} MiB")
        print(f"ratio rss end/start: {samples[-1][1] / samples[0][1]:.2f}")
        return
    size = int((8.0 if args.quick else args.size) * MIB)
    r = measure(size, max(1, min(args.parallel, 16)))
    n = r["size"]  # ratios are to the bytes in flight: all messages sent at once
    print(f"messages           {max(1, min(args.parallel, 16)):8d} x {size / MIB:.1f} MiB")
    print(f"resident before    {r['before'] / MIB:8.1f} MiB")
    print(f"peak growth to 250 {r['ingest_peak'] / MIB:8.1f} MiB  ratio {r['ingest_peak'] / n:.2f}")
    print(f"peak incl delivery {r['total_peak'] / MIB:8.1f} MiB  ratio {r['total_peak'] / n:.2f}")
    print(f"still resident     {r['after'] / MIB:8.1f} MiB  ratio {r['after'] / n:.2f}")
    print(f"time to 250        {r['ingest_s']:8.2f} s")
    if args.breakdown:
        for name, peak in breakdown(size):
            print(f"tracemalloc {name:20s} {peak / MIB:8.1f} MiB  ratio {peak / n:.2f}")
    print(f"ratio peak/size: {r['ingest_peak'] / n:.2f}")


if __name__ == "__main__":
    main()
