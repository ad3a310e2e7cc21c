#!/usr/bin/env python3
"""SMTP ingest benchmark: ``mailrouter run`` against a bare aiosmtpd discard sink.

Every server runs in its own process on 127.0.0.1; the client runs in another process
with C concurrent SMTP sessions (a small client over asyncio streams, each session
reusing its connection), sending ~4 KB threaded messages to the two accounts.  mailrouter
runs with SQLite (WAL, synchronous=FULL) and Maildir delivery: every 250 it sends comes
after a durable commit.  With ``--database-url`` the same run is repeated on PostgreSQL
with one instance and with ``--instances`` instances sharing the database and one port
(``smtp.reuse_port``: the kernel spreads the sessions across them).

Printed per server: messages/s acknowledged, p50/p99 of a whole transaction (MAIL + RCPT +
DATA) and of the DATA step alone (end of data → 250); for mailrouter also the end-to-end
rate (until every acknowledged message is in its Maildir), the outbox backlog sampled
over the run (does it grow?), and the checks: every acknowledged message is in the store
and in exactly one Maildir.  Then ``ratio <what>: X`` lines.

    python bench/smtp_bench.py                 # 3000 messages, 8 sessions, SQLite
    python bench/smtp_bench.py --quick         # 400 messages (well under a minute)
    python bench/smtp_bench.py --py-spy 10     # + where mailrouter's time goes (py-spy)
    python bench/smtp_bench.py --database-url postgresql+psycopg://postgres@127.0.0.1/postgres \\
        --instances 2                          # + PostgreSQL with 1 and with 2 instances

Not a test: it prints figures and never fails because a machine is slow; the exit status
is 1 only when an acknowledged message is missing from the store or not in exactly one
Maildir.  Bounded: a fixed number of messages, every wait has a timeout, loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import multiprocessing as mp
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
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
ACCOUNTS = ("sales", "support")
REPLY_TIMEOUT = 60.0  # seconds one SMTP reply may take before the client gives up

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

CONFIG = """
state_dir = "{state}"
hostname = "bench{k}.example.test"
[database]
url = "{url}"
[templates]
directory = "{templates}"
[smtp]
enabled = true
port = {port}
reuse_port = {reuse_port}
[lmtp]
enabled = false
[http]
enabled = false
[outbound]
type = "pickup"
path = "pickup"
[log]
level = "WARNING"
{accounts}
"""
ACCOUNT = """
[accounts.{name}]
address = "{name}@example.test"
  [accounts.{name}.delivery]
  type = "maildir"
  path = "{maildir}"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_messages(n: int, size: int, seed: int = 1) -> list[tuple[str, str, bytes]]:
    """``n`` (Message-ID, recipient, message) triples, ~``size`` bytes; half are replies."""
    rnd = random.Random(seed)
    out: list[tuple[str, str, bytes]] = []
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
        out.append((mid, rcpt, (head + "\r\n".join(lines) + "\r\n").encode()))
        ids.append(mid)
    return out


# ---------------------------------------------------------------------------- the client


@dataclass
class ClientResult:
    started: float = 0.0  # time.time() of the first command (shared clock with the parent)
    wall: float = 0.0
    total: list[float] = field(default_factory=list)  # MAIL + RCPT + DATA, per message
    data: list[float] = field(default_factory=list)  # end of data → final reply
    acked: list[int] = field(default_factory=list)  # indexes that got 250
    refused: Counter[str] = field(default_factory=Counter)
    # Messages acknowledged per server, by the host name in its greeting: with several
    # instances on one port, how the kernel spread the sessions.
    per_server: Counter[str] = field(default_factory=Counter)


async def _reply(reader: asyncio.StreamReader) -> str:
    """One (possibly multi-line) SMTP reply; its last line."""
    for _ in range(100):  # EHLO has about ten lines; a hundred is a broken server
        line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT)
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return line.decode(errors="replace").rstrip()
    raise ConnectionError("reply longer than 100 lines")


async def drive(port: int, msgs: list[tuple[str, str, bytes]], conc: int) -> ClientResult:
    """Send ``msgs`` over ``conc`` sessions; time each transaction and its DATA step.

    A hand-written client (not aiosmtplib) so the DATA step's latency starts when the
    final dot is written: end of DATA → 250, the figure the issue's target names.
    """
    res = ClientResult()
    it = iter(range(len(msgs)))
    clock = time.perf_counter

    async def session() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            greeting = await _reply(reader)
            server = greeting[4:].split(" ", 1)[0]
            writer.write(b"EHLO bench.client.test\r\n")
            await _reply(reader)
            for i in it:  # shared iterator: whichever session is free takes the next message
                _, rcpt, raw = msgs[i]
                body = raw.replace(b"\r\n.", b"\r\n..")
                t0 = clock()
                writer.write(f"MAIL FROM:<cust{i % 500}@ext.test>\r\n".encode())
                mail = await _reply(reader)
                writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
                rcpt_reply = await _reply(reader)
                if not (mail.startswith("250") and rcpt_reply.startswith("250")):
                    res.refused[(mail if not mail.startswith("250") else rcpt_reply)[:3]] += 1
                    writer.write(b"RSET\r\n")
                    await _reply(reader)
                    continue
                writer.write(b"DATA\r\n")
                go = await _reply(reader)
                if not go.startswith("354"):
                    res.refused[go[:3]] += 1
                    continue
                writer.write(body + b".\r\n")
                t1 = clock()
                done = await _reply(reader)
                t2 = clock()
                res.data.append(t2 - t1)
                res.total.append(t2 - t0)
                if done.startswith("250"):
                    res.acked.append(i)
                    res.per_server[server] += 1
                else:
                    res.refused[done[:3]] += 1
            writer.write(b"QUIT\r\n")
            with suppress(ConnectionError, TimeoutError):
                await _reply(reader)
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()

    res.started = time.time()
    t0 = clock()
    await asyncio.gather(*(session() for _ in range(conc)))
    res.wall = clock() - t0
    return res


def _client(port: int, n: int, size: int, conc: int, q: mp.Queue) -> None:  # type: ignore[type-arg]
    msgs = make_messages(n, size)
    r = asyncio.run(drive(port, msgs, conc))
    # Not asdict(): it rebuilds a Counter from its (key, count) pairs, counting the pairs.
    q.put({**vars(r), "refused": dict(r.refused), "per_server": dict(r.per_server)})


def run_client(port: int, n: int, size: int, conc: int) -> ClientResult:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_client, args=(port, n, size, conc, q))
    p.start()
    d = q.get(timeout=1800)
    p.join(60)
    d["refused"] = Counter(d["refused"])
    d["per_server"] = Counter(d["per_server"])
    return ClientResult(**d)


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def wait_line(stream: object, marker: str, timeout: float = 60) -> str:
    """Read ``stream`` (a text pipe) until a line contains ``marker``; bounded."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []  # the server's last words, for the error
    while time.monotonic() < deadline:
        line = stream.readline()  # type: ignore[attr-defined]
        if not line:
            said = "".join(seen[-15:])
            raise SystemExit(f"server exited before '{marker}':\n{said}")
        if marker in line:
            return str(line)
        seen.append(str(line))
    raise SystemExit(f"no '{marker}' within {timeout}s")


# ---------------------------------------------------------------------------- the servers


@dataclass
class Figures:
    label: str
    msgs_per_s: float
    p50_ms: float
    p99_ms: float
    data_p50_ms: float
    data_p99_ms: float
    acked: int
    refused: dict[str, int]
    per_server: dict[str, int]
    # mailrouter only
    delivered_per_s: float = 0.0
    all_delivered_s: float = 0.0
    backlog: list[tuple[float, int]] = field(default_factory=list)  # (s since start, due rows)
    ingest_s: float = 0.0
    stored_missing: int = 0
    not_delivered: int = 0
    doubled: int = 0
    startup_s: float = 0.0
    profile: list[str] = field(default_factory=list)  # --py-spy
    cpu: list[str] = field(default_factory=list)  # the first instance's threads


def _figures(label: str, r: ClientResult) -> Figures:
    return Figures(
        label=label,
        msgs_per_s=len(r.acked) / r.wall,
        p50_ms=pct(r.total, 50) * 1e3,
        p99_ms=pct(r.total, 99) * 1e3,
        data_p50_ms=pct(r.data, 50) * 1e3,
        data_p99_ms=pct(r.data, 99) * 1e3,
        acked=len(r.acked),
        refused=dict(r.refused),
        per_server=dict(r.per_server),
    )


def bench_sink(n: int, size: int, conc: int) -> Figures:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SINK, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        wait_line(proc.stdout, "ready")
        r = run_client(port, n, size, conc)
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stdout:
            proc.stdout.close()
    f = _figures("aiosmtpd discard sink", r)
    f.delivered_per_s = f.msgs_per_s  # the sink's "delivery" is its 250
    return f


def hermetic_env(**extra: str) -> dict[str, str]:
    """The environment without the shell's MAILROUTER_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROUTER_")}
    return {**env, **extra}


@contextmanager
def fresh_database(url: str | None, tmp: Path) -> Iterator[str]:
    """A new empty database: a SQLite file under ``tmp``, or a new one on ``url``'s server."""
    if url is None:
        yield f"sqlite:///{tmp / 'mailrouter.db'}"
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = make_url(url)
    name = f"mr_bench_{os.getpid()}_{random.getrandbits(32):x}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield admin.set(database=name).render_as_string(hide_password=False)
        finally:
            with engine.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


def write_configs(
    tmp: Path, url: str, port: int, instances: int, accounts: list[str] | None = None
) -> list[Path]:
    """One config per instance: own state dir, shared database, port and Maildirs."""
    names = accounts or list(ACCOUNTS)
    acc = "".join(ACCOUNT.format(name=a, maildir=tmp / "maildir" / a) for a in names)
    paths = []
    for k in range(instances):
        state = tmp / f"state{k}"
        state.mkdir(parents=True, exist_ok=True)
        text = CONFIG.format(
            state=state,
            k=k,
            url=url,
            templates=ROOT / "config" / "templates",
            port=port,
            reuse_port="true" if instances > 1 else "false",
            accounts=acc,
        )
        path = tmp / f"mailrouter{k}.toml"
        path.write_text(text)
        paths.append(path)
    return paths


def mailrouter(cfg: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mailrouter", "-c", str(cfg), "--log-format", "kv", *args]


@contextmanager
def running(configs: list[Path]) -> Iterator[tuple[list[subprocess.Popen[str]], float]]:
    """``mailrouter run`` per config, each up to its ready line; (processes, start-up s)."""
    env = hermetic_env()
    subprocess.run(
        mailrouter(configs[0], "db", "upgrade"), env=env, check=True, capture_output=True
    )
    procs: list[subprocess.Popen[str]] = []
    try:
        t0 = time.perf_counter()
        for cfg in configs:
            procs.append(
                subprocess.Popen(
                    mailrouter(cfg, "-v", "run"), env=env, stderr=subprocess.PIPE, text=True
                )
            )
        for proc in procs:
            wait_line(proc.stderr, "event=ready")
        startup = time.perf_counter() - t0
        for proc in procs:
            # Quiet from here: -v was only for the ready line; drain stderr in a thread.
            stderr = proc.stderr
            threading.Thread(target=lambda s=stderr: [None for _ in s], daemon=True).start()
        yield procs, startup
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*(<[^>\r\n]*>)")


def maildir_files(root: Path) -> list[Path]:
    return [p for a in root.iterdir() for sub in ("new", "cur") for p in (a / sub).glob("*")]


def maildir_count(root: Path) -> int:
    """Files in every ``new/`` under ``root`` (cheap enough to poll every 50 ms)."""
    n = 0
    for mailbox in root.iterdir() if root.is_dir() else ():
        with suppress(FileNotFoundError):
            n += len(os.listdir(mailbox / "new"))
    return n


def delivered_ids(root: Path) -> Counter[str]:
    """Message-IDs of the files in every Maildir under ``root`` (new/ and cur/)."""
    seen: Counter[str] = Counter()
    if not root.is_dir():
        return seen
    for path in maildir_files(root):
        head = path.read_bytes()[:16384]
        m = MESSAGE_ID.search(head)
        seen[m.group(1).decode() if m else f"(none: {path.name})"] += 1
    return seen


class Sampler(threading.Thread):
    """Samples the outbox backlog (rows pending or being sent) and the Maildir count."""

    def __init__(self, url: str, maildirs: Path, every: float = 0.5):
        super().__init__(daemon=True)
        from sqlalchemy import create_engine, text

        self.engine = create_engine(url)
        self.query = text("SELECT count(*) FROM outbox WHERE status IN ('pending', 'sending')")
        self.maildirs = maildirs
        self.every = every
        self.samples: list[tuple[float, int]] = []  # (time.time(), backlog)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            # A busy store skips one sample; it never stops the bench.
            with suppress(Exception), self.engine.connect() as conn:
                self.samples.append((time.time(), int(conn.execute(self.query).scalar_one())))
            self.stop.wait(self.every)
        self.engine.dispose()


def stored_ids(url: str) -> set[str]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {
                f"<{m.strip('<>')}>"
                for (m,) in conn.execute(text("SELECT message_id FROM messages"))
            }
    finally:
        engine.dispose()


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid`` so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with suppress(OSError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_lines(pid: int, before: dict[int, float], wall: float, n: int) -> list[str]:
    """How busy the event loop's thread and the others were over ``wall`` seconds."""
    after = thread_cpu(pid)
    used = {t: after[t] - before.get(t, 0.0) for t in after}
    main = used.get(pid, 0.0)
    others = sorted((c for t, c in used.items() if t != pid), reverse=True)
    busiest = " ".join(f"{c / wall:.0%}" for c in others[:4] if c > 0.005 * wall)
    total = main + sum(others)
    return [
        f"cpu during ingest: event loop thread {main / wall:.0%}, other threads "
        f"{sum(others) / wall:.0%} (busiest {busiest or '-'}); "
        f"{total / max(n, 1) * 1000:.2f} ms CPU per message"
    ]


def py_spy_summary(raw: Path, top: int = 30) -> list[str]:
    """Where the samples of a ``py-spy record --format raw`` file fall: own time, then
    the inclusive time of mailrouter's and the drivers' functions."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = [f.rsplit(":", 1)[0] for f in stack.split(";")]  # drop line numbers
        own[frames[-1]] += n
        for f in set(frames):
            if any(k in f for k in ("mailrouter/", "aiosmtpd/", "psycopg/", "sqlalchemy/")):
                inclusive[f] += n
    if not total:
        return ["py-spy: no samples"]
    out = [f"py-spy: {total} samples; own time"]
    out += [f"  {c / total:6.1%}  {f}" for f, c in own.most_common(top)]
    out.append("inclusive (mailrouter, aiosmtpd, SQLAlchemy, psycopg)")
    out += [f"  {c / total:6.1%}  {f}" for f, c in inclusive.most_common(top)]
    return out


def bench_mailrouter(
    n: int,
    size: int,
    conc: int,
    *,
    url: str | None,
    instances: int,
    drain_timeout: float,
    py_spy: float = 0.0,
) -> Figures:
    engine_name = "PostgreSQL" if url else "SQLite"
    profile: list[str] = []
    label = f"mailrouter {engine_name} x{instances}"
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mr-smtp-bench-") as tmp_name:
        tmp = Path(tmp_name)
        maildirs = tmp / "maildir"
        with fresh_database(url, tmp) as db_url:
            configs = write_configs(tmp, db_url, port, instances)
            with running(configs) as (procs, startup):
                sampler = Sampler(db_url, maildirs)
                sampler.start()
                spy = None
                if py_spy:  # samples the first instance while the client sends
                    spy = subprocess.Popen(
                        ["py-spy", "record", "-p", str(procs[0].pid), "-d", str(int(py_spy)),
                         "-r", "200", "--format", "raw", "-o", str(tmp / "spy.raw"),
                         "--nonblocking", "--gil"],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                cpu_before = thread_cpu(procs[0].pid)
                r = run_client(port, n, size, conc)
                cpu = cpu_lines(procs[0].pid, cpu_before, r.wall, len(r.acked) // instances)
                if spy is not None:
                    spy.wait(py_spy + 60)
                    if (tmp / "spy.raw").exists():
                        profile = py_spy_summary(tmp / "spy.raw")
                ingest_end = r.started + r.wall
                # Delivery goes on after the client is done: wait (bounded) until every
                # acknowledged message is in a Maildir.
                deadline = time.monotonic() + drain_timeout
                delivered_at = time.time()
                while time.monotonic() < deadline:
                    if maildir_count(maildirs) >= len(r.acked):
                        delivered_at = time.time()
                        break
                    time.sleep(0.05)
                else:
                    delivered_at = time.time()
                sampler.stop.set()
                sampler.join(10)
                # Let a delivery in flight finish before counting (a double would show).
                time.sleep(0.2)
                stored = stored_ids(db_url)
                seen = delivered_ids(maildirs)
    msgs = make_messages(n, size)
    acked_ids = [msgs[i][0] for i in r.acked]
    f = _figures(label, r)
    f.startup_s = startup
    f.profile = profile
    f.cpu = cpu
    f.all_delivered_s = delivered_at - r.started
    f.delivered_per_s = len(r.acked) / f.all_delivered_s if f.all_delivered_s > 0 else 0.0
    f.ingest_s = ingest_end - r.started
    f.backlog = [(round(t - r.started, 2), b) for t, b in sampler.samples]
    f.stored_missing = sum(1 for m in acked_ids if m not in stored)
    f.not_delivered = sum(1 for m in acked_ids if seen[m] == 0)
    acked_set = set(acked_ids)
    # Doubled: an acknowledged message in more than one file; unknown: a file of a message
    # that was never acknowledged (or without a Message-ID).
    f.doubled = sum(1 for m in acked_ids if seen[m] > 1) + sum(
        1 for m, c in seen.items() if m not in acked_set and c
    )
    return f


def backlog_line(f: Figures) -> str:
    """The backlog over the ingest phase: a few samples, the peak, and whether it grew."""
    during = [(t, b) for t, b in f.backlog if 0 <= t <= f.ingest_s]
    if not during:
        return "backlog: no samples"
    step = max(1, len(during) // 8)
    shown = " ".join(f"{t:.1f}s:{b}" for t, b in during[::step])
    half = len(during) // 2
    first = max(b for _, b in during[: max(1, half)])
    second = max(b for _, b in during[half:]) if during[half:] else first
    grows = "grows" if second > 1.5 * first + 10 else "flat"
    peak = max(b for _, b in f.backlog)
    return f"backlog during ingest {shown}  peak {peak}  ({grows}: max {first} → {second})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--messages", type=int, default=3000)
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="400 messages (under a minute)")
    ap.add_argument(
        "--database-url",
        help="also run on this PostgreSQL server (a fresh database is created and dropped)",
    )
    ap.add_argument(
        "--instances",
        type=int,
        default=1,
        help="with --database-url: also run N instances sharing it and one port (reuse_port)",
    )
    ap.add_argument("--no-sqlite", action="store_true", help="skip the SQLite run")
    ap.add_argument(
        "--py-spy",
        type=float,
        default=0.0,
        metavar="S",
        help="sample each mailrouter run's (first) instance with py-spy for S seconds of "
        "the ingest and print where the time goes (needs py-spy and ptrace rights)",
    )
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    n = 400 if a.quick and a.messages == 3000 else a.messages
    if a.instances > 1 and not a.database_url:
        ap.error("--instances needs --database-url (instances share a PostgreSQL database)")
    drain = 120.0 if a.quick else 900.0

    sink = bench_sink(n, a.size, a.concurrency)
    runs: list[tuple[str, Figures]] = []
    if not a.no_sqlite:
        f = bench_mailrouter(
            n, a.size, a.concurrency, url=None, instances=1, drain_timeout=drain, py_spy=a.py_spy
        )
        runs.append(("", f))
    if a.database_url:
        f = bench_mailrouter(
            n,
            a.size,
            a.concurrency,
            url=a.database_url,
            instances=1,
            drain_timeout=drain,
            py_spy=a.py_spy,
        )
        runs.append(("-postgresql", f))
        if a.instances > 1:
            f = bench_mailrouter(
                n,
                a.size,
                a.concurrency,
                url=a.database_url,
                instances=a.instances,
                drain_timeout=drain,
                py_spy=a.py_spy,
            )
            runs.append((f"-postgresql-x{a.instances}", f))
    bad = [f for _, f in runs if f.stored_missing or f.not_delivered or f.doubled]
    if a.json:
        print(
            json.dumps(
                {
                    "sink": asdict(sink),
                    "runs": {k or "sqlite": asdict(f) for k, f in runs},
                    "messages": n,
                    "sessions": a.concurrency,
                }
            )
        )
        return 1 if bad else 0

    print(
        f"{n} messages of ~{a.size} B, {a.concurrency} SMTP sessions, client in its own "
        f"process; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    print(
        f"  {'server':<28} {'acked/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'DATA p50':>9} "
        f"{'DATA p99':>9} {'delivered/s':>12} {'all in Maildir':>15}"
    )
    for f in [sink] + [f for _, f in runs]:
        tail = (
            f"{f.delivered_per_s:12.1f} {f.all_delivered_s:13.1f} s"
            if f is not sink
            else f"{'(= acked)':>12} {'':>15}"
        )
        print(
            f"  {f.label:<28} {f.msgs_per_s:8.1f} {f.p50_ms:7.2f} {f.p99_ms:7.2f} "
            f"{f.data_p50_ms:9.2f} {f.data_p99_ms:9.2f} {tail}"
        )
    for _, f in runs:
        spread = ", ".join(f"{h} {c}" for h, c in sorted(f.per_server.items()))
        print(f"\n  {f.label}: started in {f.startup_s:.2f} s; acknowledged by {spread}")
        print(f"    {backlog_line(f)}")
        refused = f" refused {f.refused}" if f.refused else ""
        print(
            f"    check: acknowledged {f.acked}/{n}, missing from the store {f.stored_missing}, "
            f"in no Maildir {f.not_delivered}, doubled or unknown {f.doubled}{refused}"
        )
        for line in f.cpu:
            print(f"    {line}")
        for line in f.profile:
            print(f"    {line}")
    print()
    for suffix, f in runs:
        print(f"ratio ingest{suffix}/sink: {f.msgs_per_s / sink.msgs_per_s:.3f}")
        print(f"ratio delivered{suffix}/sink: {f.delivered_per_s / sink.msgs_per_s:.3f}")
    for _, f in runs:
        print(f"p99 end-of-DATA→250 {f.label}: {f.data_p99_ms:.2f} ms (target ≤ 15 ms)")
    for f in bad:
        print(f"DURABILITY PROBLEM in {f.label}: see its check line")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
