"""The fault tests' machinery: a real ``mailrouter run`` that is SIGKILLed and restarted, the
retrying MTA process (``mta.py``), and the ledgers that say what was lost, doubled, split or
left stuck.

Shared by ``tests/faults/`` and ``bench/soak.py``, so nothing here imports pytest.  Every
wait has a deadline and every loop a bound; all traffic stays on loopback.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[2]
MTA = Path(__file__).with_name("mta.py")
TEMPLATES = ROOT / "config" / "templates"
ADDRESSES = {
    "sales": "sales@example.test",
    "support": "support@example.test",
    "billing": "billing@example.test",
}
_MSGID_RE = re.compile(rb"(?im)^Message-ID:[ \t]*<([^>\r\n]+)>")
_WORDS = ("order", "invoice", "shipment", "delay", "refund", "account", "ticket", "please",
          "regards", "thanks", "update", "status", "request", "quote", "item", "hinge", "chair",
          "table", "lamp", "box")  # fmt: skip


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], Any], within: float, what: str, *, interval: float = 0.1
) -> float:
    """Poll ``predicate`` until it holds (bounded); returns the seconds it took."""
    began = time.monotonic()
    deadline = began + within
    while True:
        if predicate():
            return time.monotonic() - began
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:g} s: {what}")
        time.sleep(interval)


def subprocess_env() -> dict[str, str]:
    """This environment without the shell's MAILROUTER_* settings (a developer's state dir
    must not leak into the daemon under test)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MAILROUTER_")}


# --------------------------------------------------------------------------- configuration


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def _table(name: str, values: dict[str, Any]) -> str:
    return f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())


def write_config(
    workdir: Path,
    *,
    smtp_port: int | None = None,
    lmtp_port: int | None = None,
    outbound: dict[str, Any] | None = None,
    outbox: dict[str, Any] | None = None,
    database: dict[str, Any] | None = None,
    daemon: dict[str, Any] | None = None,
    accounts: dict[str, str] | None = None,
    names: Iterable[str] = ADDRESSES,
) -> Path:
    """``workdir/mailrouter.toml`` for a daemon with its state under ``workdir/state``.

    By default every account delivers into a Maildir and notices go to the pickup
    directory; ``accounts`` adds TOML after an account's own lines (its ``[transfer]``,
    ``[delivery]`` or ``[imap]`` tables).  sales may transfer and notifies with the
    shipped template, support and billing may transfer without a notice.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    parts = [
        f'state_dir = {_toml(workdir / "state")}\nhostname = "mailrouter.example.test"\n',
        _table("templates", {"directory": TEMPLATES}),
        _table("smtp", {"enabled": smtp_port is not None, "port": smtp_port or 2525}),
        _table("lmtp", {"enabled": lmtp_port is not None, "port": lmtp_port or 2424}),
        _table("outbound", outbound or {"type": "pickup", "path": "pickup"}),
        _table("outbox", outbox or {}),
        _table("database", database or {}),
        _table("daemon", {"shutdown_timeout": 10, **(daemon or {})}),
    ]
    extra = accounts or {}
    for name in names:
        own = extra.get(name)
        parts.append(
            f"[accounts.{name}]\naddress = {_toml(ADDRESSES[name])}\n"
            f"display_name = {_toml(name.title())}\n"
        )
        if own is None or "[accounts." + name + ".transfer]" not in own:
            transfer = {"enabled": True}
            if name == "sales":
                transfer |= {"notify": True, "template": "transfer_notice"}
            parts.append(_table(f"accounts.{name}.transfer", transfer))
        if own:
            parts.append(own.strip() + "\n")
    path = workdir / "mailrouter.toml"
    path.write_text("\n".join(parts), "utf-8")
    return path


def state_paths(workdir: Path) -> tuple[Path, dict[str, Path]]:
    """The SQLite file and each account's default Maildir under ``workdir/state``."""
    state = workdir / "state"
    return state / "mailrouter.db", {n: state / "maildir" / n for n in ADDRESSES}


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Item:
    """One message of a generated corpus, as the MTA sends it."""

    n: int
    file: str
    thread: int
    message_id: str
    mail_from: str
    rcpts: tuple[str, ...]
    owner: str  # the account the conversation belongs to (first in To)
    parent: int | None


def make_message(
    item: Item, rnd: random.Random, parent_id: str | None, refs: list[str], size: int
) -> bytes:
    words = " ".join(rnd.choice(_WORDS) for _ in range(max(8, size // 7)))
    body = "\r\n".join(words[i : i + 72] for i in range(0, len(words), 72))
    subject = f"Order {item.thread}: question {item.n}"
    lines = [
        f"From: Customer {item.thread} <{item.mail_from}>",
        f"To: {item.rcpts[0]}",
        *([f"Cc: {', '.join(item.rcpts[1:])}"] if item.rcpts[1:] else []),
        f"Subject: {'Re: ' if parent_id else ''}{subject}",
        f"Date: {formatdate(1764579600 + item.n, usegmt=True)}",
        f"Message-ID: <{item.message_id}>",
    ]
    if parent_id:
        lines += [f"In-Reply-To: <{parent_id}>", "References: " + " ".join(f"<{r}>" for r in refs)]
    lines += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=us-ascii", ""]
    return ("\r\n".join(lines) + "\r\n" + body + "\r\n").encode("ascii")


def write_corpus(
    folder: Path,
    n: int,
    *,
    seed: int,
    owners: tuple[str, ...] = ("sales", "support"),
    cc: tuple[str, ...] = (),
    reply_share: float = 0.6,
    size: int = 900,
) -> list[Item]:
    """``n`` distinct messages in threads: about ``reply_share`` of them answer an earlier
    message of their conversation (In-Reply-To + References), so a conversation split in
    two shows.  Each conversation goes to one owner account (To), with the accounts in
    ``cc`` as further recipients.  Writes ``NNNNN.eml`` files and ``manifest.jsonl``."""
    rnd = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items: list[Item] = []
    threads: list[list[Item]] = []
    refs: dict[int, list[str]] = {}
    with (folder / "manifest.jsonl").open("w", encoding="utf-8") as manifest:
        for i in range(n):
            if threads and rnd.random() < reply_share:
                thread = rnd.randrange(len(threads))
                parent: Item | None = threads[thread][-1]
            else:
                thread, parent = len(threads), None
                threads.append([])
            owner = owners[thread % len(owners)]
            rcpts = (ADDRESSES[owner], *(ADDRESSES[c] for c in cc if c != owner))
            item = Item(
                n=i,
                file=f"{i:05d}.eml",
                thread=thread,
                message_id=f"chaos-{seed}-{i}@customer.test",
                mail_from=f"customer{thread}@customer.test",
                rcpts=rcpts,
                owner=owner,
                parent=parent.n if parent else None,
            )
            chain = ([*refs[parent.n], parent.message_id] if parent else [])[-20:]
            refs[i] = chain
            raw = make_message(item, rnd, parent.message_id if parent else None, chain, size)
            (folder / item.file).write_bytes(raw)
            manifest.write(
                json.dumps(
                    {
                        "n": i,
                        "file": item.file,
                        "thread": thread,
                        "from": item.mail_from,
                        "rcpts": list(rcpts),
                    }
                )
                + "\n"
            )
            threads[thread].append(item)
            items.append(item)
    return items


# --------------------------------------------------------------------------- processes


class DaemonProcess:
    """``mailrouter run`` as a child process; its stderr is kept (and copied to ``log``)."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log_path = config, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self.incarnations = 0
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.alive, "already running"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailrouter", "-c", str(self.config), "run"],
            env=subprocess_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.incarnations += 1
        assert self.proc.stderr is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stderr,), daemon=True)
        self._reader.start()

    def _read(self, stream: Any) -> None:
        with self.log_path.open("a", encoding="utf-8") as log:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                log.write(line + "\n")
                log.flush()
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        stream.close()

    def count(self, needle: str) -> int:
        with self._cond:
            return sum(needle in line for line in self.lines)

    def wait_line(self, predicate: Callable[[str], bool], *, start: int, within: float) -> int:
        """Index of the first line from ``start`` on that satisfies ``predicate``."""
        deadline = time.monotonic() + within
        with self._cond:
            i = start
            while True:
                while i < len(self.lines):
                    if predicate(self.lines[i]):
                        return i
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive:
                    raise AssertionError(
                        f"daemon: no such line within {within:g} s\n{self.tail_locked()}"
                    )
                self._cond.wait(min(left, 0.5))

    def wait_ready(self, within: float = 60.0) -> float:
        """Seconds until this incarnation logged ``event=ready``."""
        began = time.monotonic()
        deadline = began + within
        with self._cond:
            while sum("event=ready" in line for line in self.lines) < self.incarnations:
                left = deadline - time.monotonic()
                if left <= 0 or not self.alive:
                    raise AssertionError(
                        f"daemon not ready within {within:g} s\n{self.tail_locked()}"
                    )
                self._cond.wait(min(left, 0.5))
        return time.monotonic() - began

    def kill(self) -> None:
        """SIGKILL: no drain, no retire, nothing flushed — a crash."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._join()

    def stop(self, within: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit status (a daemon that hangs is killed)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=within)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
                self._join()
                raise AssertionError(f"daemon did not stop within {within:g} s") from None
        self._join()
        return self.proc.returncode

    def _join(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=10)
            self._reader = None

    def tail_locked(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return self.tail_locked(n)


class MtaProcess:
    """``mta.py`` as a child process sending a corpus; its ledger is read as it grows."""

    def __init__(
        self,
        corpus: Path,
        acks: Path,
        *,
        port: int,
        proto: str = "smtp",
        sessions: int = 4,
        deadline: float = 600.0,
        seed: int = 0,
    ) -> None:
        self.acks = acks
        self.out: TextIO = (acks.parent / f"{acks.stem}.stdout").open("w", encoding="utf-8")
        cmd = [sys.executable, str(MTA), "--port", str(port), "--proto", proto]
        cmd += ["--corpus", str(corpus), "--acks", str(acks), "--sessions", str(sessions)]
        cmd += ["--deadline", str(deadline), "--seed", str(seed)]
        acks.touch()
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT)
        self._offset = 0
        self._partial = b""
        self.records: list[dict[str, Any]] = []
        self._first_ack: dict[int, float] = {}  # message → when it got its first 250

    def poll(self) -> list[dict[str, Any]]:
        """Read new ledger lines; returns every record so far."""
        with self.acks.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        new = [json.loads(line) for line in complete if line]
        for r in new:
            if 200 <= r["code"] < 300:
                self._first_ack.setdefault(r["n"], r["t"])
        self.records += new
        return self.records

    def acked(self, before: float | None = None) -> set[int]:
        """Messages with at least one 250 (optionally, acknowledged before ``before``)."""
        self.poll()
        if before is None:
            return set(self._first_ack)
        return {n for n, t in self._first_ack.items() if t < before}

    def wait(self, within: float) -> dict[str, Any]:
        try:
            self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise AssertionError(f"the MTA did not finish within {within:g} s") from None
        self.out.close()
        text = (self.acks.parent / f"{self.acks.stem}.stdout").read_text("utf-8")
        self.poll()
        last = text.strip().splitlines()[-1] if text.strip() else "{}"
        try:
            summary: dict[str, Any] = json.loads(last)
        except json.JSONDecodeError:
            raise AssertionError(f"the MTA failed:\n{text[-3000:]}") from None
        summary["exit"] = self.proc.returncode
        return summary

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.out.close()


# --------------------------------------------------------------------------- what arrived


class Maildirs:
    """Which Message-IDs sit in which account's Maildir (new/ and cur/), read incrementally:
    a delivered file never changes, so each is read once."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders
        self._seen: dict[Path, str] = {}

    def scan(self) -> dict[str, list[str]]:
        """Message-ID → the accounts holding a copy (one entry per file)."""
        out: dict[str, list[str]] = {}
        for account, folder in self.folders.items():
            for sub in ("new", "cur"):
                d = folder / sub
                if not d.is_dir():
                    continue
                for name in os.listdir(d):
                    path = d / name
                    mid = self._seen.get(path)
                    if mid is None:
                        with path.open("rb") as f:
                            m = _MSGID_RE.search(f.read(16384))
                        mid = self._seen[path] = m.group(1).decode() if m else ""
                    out.setdefault(mid, []).append(account)
        return out


@dataclass
class StoreFacts:
    """What the SQLite store holds, read with sqlite3 (independent of the code under test)."""

    messages: dict[str, list[tuple[int, int | None, str]]]  # id → [(pk, interaction, status)]
    recipients: dict[int, set[str]]  # message pk → account names
    outbox: dict[str, int]  # status → rows
    unfinished: list[tuple[int, str, str, str | None]]  # (id, kind, status, last_error)


def store_facts(db: Path) -> StoreFacts:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        messages: dict[str, list[tuple[int, int | None, str]]] = {}
        for pk, mid, iid, status in conn.execute(
            "SELECT id, message_id, interaction_id, status FROM messages WHERE direction='inbound'"
        ):
            messages.setdefault(mid, []).append((pk, iid, status))
        recipients: dict[int, set[str]] = {}
        for pk, name in conn.execute(
            "SELECT r.message_pk, a.name FROM message_recipients r JOIN accounts a"
            " ON a.id = r.account_id"
        ):
            recipients.setdefault(pk, set()).add(name)
        outbox = dict(conn.execute("SELECT status, count(*) FROM outbox GROUP BY status"))
        unfinished = conn.execute(
            "SELECT id, kind, status, last_error FROM outbox WHERE status != 'sent' ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    return StoreFacts(messages, recipients, outbox, unfinished)


def in_flight(db: Path) -> set[str]:
    """Message-IDs of the deliveries claimed (``sending``) right now — after a kill: what
    the dead process had in hand."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return {
            mid
            for (mid,) in conn.execute(
                "SELECT m.message_id FROM outbox o JOIN messages m ON m.id = o.message_pk"
                " WHERE o.status = 'sending' AND o.kind = 'deliver'"
            )
        }
    finally:
        conn.close()


def outbox_open(db: Path) -> int:
    """Outbox rows not yet sent or failed (pending or in flight)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        (n,) = conn.execute(
            "SELECT count(*) FROM outbox WHERE status IN ('pending', 'sending')"
        ).fetchone()
    finally:
        conn.close()
    return int(n)


# --------------------------------------------------------------------------- kill -9 runs


@dataclass
class Restart:
    """One restart after a kill, and how long it took to make good what the kill left."""

    at: float  # time.monotonic() of the spawn
    owed: set[str]  # acknowledged before the kill
    stranded: set[str]  # deliveries the killed process had claimed
    owed_took: float | None = None  # None: not yet; -1: killed again first
    stranded_took: float | None = None


@dataclass
class RunResult:
    """The figures of one kill-and-restart run; ``problems`` is empty when all held."""

    proto: str
    seed: int
    messages: int
    acked: int = 0
    kills: int = 0
    lost: int = 0  # acknowledged but not stored, or never delivered
    duplicated: int = 0  # more than one stored row or delivered copy
    stuck: int = 0  # outbox rows not sent at the end
    split: int = 0  # conversations spread over several interactions
    merged: int = 0  # interactions holding several conversations
    recoveries: list[float] = field(default_factory=list)  # per restart, see kill_run
    stranded: list[float] = field(default_factory=list)  # per restart, see kill_run
    in_flight_at_kills: list[int] = field(default_factory=list)
    finish_after_last_restart: float = 0.0
    client: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)  # lost, doubled, stuck, split …
    slow: list[str] = field(default_factory=list)  # past the time bound

    @property
    def longest_recovery(self) -> float:
        return max(self.recoveries, default=0.0)

    @property
    def longest_stranded(self) -> float:
        return max(self.stranded, default=0.0)

    def summary(self) -> str:
        return (
            f"{self.proto}: messages={self.messages} acked={self.acked} kills={self.kills} "
            f"lost={self.lost} duplicated={self.duplicated} stuck={self.stuck} "
            f"split={self.split} merged={self.merged} "
            f"longest_delay_after_restart={self.longest_recovery:.1f}s "
            f"(in-flight work {self.longest_stranded:.1f}s, in flight at kills "
            f"{self.in_flight_at_kills}) "
            f"done_after_last_restart={self.finish_after_last_restart:.1f}s "
            f"retries={self.client.get('retries')} seconds={self.seconds:.0f} seed={self.seed}"
        )


def kill_run(
    workdir: Path,
    *,
    n: int,
    kills: int = 3,
    proto: str = "smtp",
    cc: tuple[str, ...] = (),
    sessions: int = 4,
    seed: int | None = None,
    bound: float = 30.0,
    say: Callable[[str], None] = lambda _msg: None,
) -> RunResult:
    """Send ``n`` messages through a daemon that is SIGKILLed ``kills`` times and restarted.

    Each kill comes at a random point (a random count of acknowledged messages, then a
    random fraction of a second), with the client in mid-session and deliveries in flight;
    the daemon stays down for a random moment (the client meets refused connections) and
    is started again.  After each restart the run waits until every message acknowledged
    before that kill is in its Maildir: that delay is the restart's *recovery* (bounded by
    ``bound``; a crash stranding work shows here).  Finally every message must be stored
    once, delivered once to its conversation's owner within ``bound`` of the last 250,
    each conversation in one interaction of its own, and the outbox empty.
    """
    seed = random.SystemRandom().randrange(1 << 30) if seed is None else seed
    rnd = random.Random(seed)
    began = time.monotonic()
    result = RunResult(proto=proto, seed=seed, messages=n)
    port = free_port()
    config = write_config(
        workdir,
        smtp_port=port if proto == "smtp" else None,
        lmtp_port=port if proto == "lmtp" else None,
    )
    db, folders = state_paths(workdir)
    items = write_corpus(workdir / "corpus", n, seed=seed, cc=cc)
    boxes = Maildirs(folders)
    daemon = DaemonProcess(config, workdir / "daemon.log")
    daemon.start()
    daemon.wait_ready()
    mta = MtaProcess(
        workdir / "corpus", workdir / "acks.jsonl", port=port, proto=proto, sessions=sessions,
        deadline=max(300.0, n * 0.5), seed=seed,
    )  # fmt: skip
    try:
        # Kill points end at 70 %: each kill must still find the client sending.
        lo, hi = max(1, n // 12), max(2, n * 7 // 10)
        points = sorted(rnd.sample(range(lo, hi), min(kills, hi - lo)))
        last_restart = time.monotonic()
        restarts: list[Restart] = []

        def track() -> None:
            open_ = [r for r in restarts if r.owed_took is None or r.stranded_took is None]
            if open_:
                have, now = boxes.scan().keys(), time.monotonic()
                for r in open_:
                    if r.owed_took is None and r.owed <= have:
                        r.owed_took = now - r.at
                    if r.stranded_took is None and r.stranded <= have:
                        r.stranded_took = now - r.at

        for k, point in enumerate(points, 1):
            # Killed while the client still sends, and never before the daemon took new
            # mail since its last start: each kill cuts live sessions.
            floor = max(point, len(mta.acked()) + 1)

            def due(floor: int = floor) -> bool:
                track()
                return len(mta.acked()) >= floor or mta.proc.poll() is not None

            wait_until(due, max(120.0, n * 0.3), f"{floor} messages acknowledged", interval=0.02)
            # Somewhere inside the next few transactions: short, since at several hundred
            # messages a second a longer pause let the client finish before the kill.
            time.sleep(rnd.uniform(0.0, 0.02))
            killed_at = time.time()
            daemon.kill()
            result.kills += 1
            for r in restarts:
                r.owed_took = -1.0 if r.owed_took is None else r.owed_took
                r.stranded_took = -1.0 if r.stranded_took is None else r.stranded_took
            before = mta.acked(before=killed_at)
            stranded = in_flight(db)
            result.in_flight_at_kills.append(len(stranded))
            if len(before) >= n:
                result.problems.append(f"kill {k} came after the client's last 250")
            time.sleep(rnd.uniform(0.0, 1.0))  # down: the client meets refused connections
            last_restart = time.monotonic()
            daemon.start()
            ready = daemon.wait_ready()
            owed = {items[i].message_id for i in before}
            restarts.append(Restart(last_restart, owed, stranded))
            say(
                f"kill {k} after {len(before)} acks, {len(stranded)} deliveries claimed; "
                f"ready again after {ready:.1f} s"
            )

        def client_done() -> bool:
            track()
            return mta.proc.poll() is not None

        wait_until(client_done, max(300.0, n * 0.5) + 60, "the MTA finished", interval=0.05)
        result.client = mta.wait(30)
        last_ack = time.monotonic()
        acked = mta.acked()
        result.acked = len(acked)
        want = {i.message_id for i in items}
        try:
            # A backlog (ingest outruns delivery) drains at the machine's pace: past
            # ``bound`` it is slow, past the larger deadline it is stuck.
            drained = wait_until(
                lambda: (track(), want <= boxes.scan().keys())[1],
                max(bound * 4, n * 0.1),
                "all delivered",
            )
            if drained > bound:
                result.slow.append(f"all delivered {drained:.1f} s after the last 250")
            wait_until(lambda: outbox_open(db) == 0, bound, "the outbox empty")
        except AssertionError as exc:
            result.problems.append(str(exc))
        track()
        for k, r in enumerate(restarts, 1):
            if r.stranded_took is not None and r.stranded_took >= 0:
                result.stranded.append(r.stranded_took)
                if r.stranded_took > bound:
                    result.slow.append(
                        f"restart {k}: in-flight work done after {r.stranded_took:.1f} s"
                    )
            if r.owed_took is None:
                result.problems.append(f"restart {k}: what it was owed was never delivered")
            elif r.owed_took >= 0:
                result.recoveries.append(r.owed_took)
                say(
                    f"restart {k}: the {len(r.stranded)} claimed by the killed process "
                    f"delivered after {r.stranded_took:.1f} s, all {len(r.owed)} acknowledged "
                    f"before the kill after {r.owed_took:.1f} s"
                )
                if r.owed_took > bound:
                    result.slow.append(
                        f"restart {k}: acknowledged mail delivered after {r.owed_took:.1f} s"
                    )
            else:
                say(f"restart {k}: killed again before it had delivered everything")
        result.finish_after_last_restart = time.monotonic() - last_restart
        after = time.monotonic() - last_ack
        say(f"client done ({result.client}); all delivered {after:.1f} s after its last 250")
        rc = daemon.stop()
        if rc != 0:
            result.problems.append(f"daemon exited {rc} on SIGTERM")
    finally:
        mta.close()
        if daemon.alive:
            daemon.kill()
    _check(result, items, mta, boxes, store_facts(db), daemon)
    result.seconds = time.monotonic() - began
    return result


def _check(
    result: RunResult,
    items: list[Item],
    mta: MtaProcess,
    boxes: Maildirs,
    facts: StoreFacts,
    daemon: DaemonProcess,
) -> None:
    problems = result.problems
    delivered = boxes.scan()
    acks: dict[int, set[str]] = {}
    for r in mta.poll():
        if 200 <= r["code"] < 300:
            acks.setdefault(r["n"], set()).add(r["rcpt"])
        else:
            problems.append(f"message {r['n']} refused for {r['rcpt']}: {r['code']} {r['reply']}")
    names = {a: n for n, a in ADDRESSES.items()}
    lost: set[int] = set()
    doubled: set[int] = set()
    for item in items:
        rows = facts.messages.get(item.message_id, [])
        copies = delivered.get(item.message_id, [])
        if item.n not in acks:
            problems.append(f"message {item.n} never acknowledged")
        elif not rows:
            lost.add(item.n)
            problems.append(f"message {item.n} acknowledged but not stored")
        if len(rows) > 1:
            doubled.add(item.n)
            problems.append(f"message {item.n} stored {len(rows)} times")
        if not copies:
            lost.add(item.n)
            problems.append(f"message {item.n} not delivered")
        elif len(copies) > 1:
            doubled.add(item.n)
            problems.append(f"message {item.n} delivered {len(copies)} times: {copies}")
        elif copies[0] != item.owner:
            problems.append(f"message {item.n} delivered to {copies[0]}, not {item.owner}")
        for rcpt in acks.get(item.n, ()):
            if rows and names[rcpt] not in facts.recipients.get(rows[0][0], set()):
                lost.add(item.n)
                problems.append(f"message {item.n}: {rcpt} acknowledged but not recorded")
    result.lost, result.duplicated = len(lost), len(doubled)
    result.stuck = len(facts.unfinished)
    problems += [f"outbox row {row} not sent" for row in facts.unfinished]
    threads: dict[int, set[int | None]] = {}
    owners: dict[int | None, set[int]] = {}
    for item in items:
        for _pk, iid, _status in facts.messages.get(item.message_id, [])[:1]:
            threads.setdefault(item.thread, set()).add(iid)
            owners.setdefault(iid, set()).add(item.thread)
    split = [t for t, iids in threads.items() if len(iids) > 1 or None in iids]
    merged = [i for i, ts in owners.items() if len(ts) > 1]
    result.split, result.merged = len(split), len(merged)
    problems += [f"conversation {t} split over interactions {threads[t]}" for t in split]
    problems += [f"interaction {i} holds conversations {owners[i]}" for i in merged]
    if result.client.get("protocol_errors"):
        problems.append(f"protocol errors seen by the client: {result.client}")
    crashes = [line for line in daemon.lines if " error " in line or " critical " in line]
    problems += [f"daemon logged: {line[:300]}" for line in crashes[:5]]


class HoldingLMTP:
    """An LMTP server on loopback that can hold a delivery: after the final dot it waits
    for :meth:`release` before answering 250 — the moment a delivery is done at the other
    end but not yet recorded by the outbox.  Records every message it accepted."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.holding = True
        self.arrived = threading.Event()
        self._released = threading.Event()
        self.delivered: list[bytes] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def release(self) -> None:
        self.holding = False
        self._released.set()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(120)
        with conn, conn.makefile("rwb") as f:
            f.write(b"220 holding LMTP\r\n")
            f.flush()
            rcpts = 0
            for _ in range(10_000):  # bounded: a session is a few commands
                line = f.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"LHLO":
                    f.write(b"250-holding\r\n250 8BITMIME\r\n")
                elif verb == b"RCPT":
                    rcpts += 1
                    f.write(b"250 2.1.5 ok\r\n")
                elif verb == b"DATA":
                    f.write(b"354 go ahead\r\n")
                    f.flush()
                    body = b"".join(iter(f.readline, b".\r\n"))
                    if self.holding:
                        self.arrived.set()
                        self._released.wait(120)
                    with self._lock:
                        self.delivered.append(body)
                    f.write(b"250 2.0.0 delivered\r\n" * rcpts)
                elif verb == b"QUIT":
                    f.write(b"221 2.0.0 bye\r\n")
                    f.flush()
                    return
                else:
                    f.write(b"250 2.0.0 ok\r\n")
                f.flush()

    def close(self) -> None:
        self._stop.set()
        self._released.set()
        self._thread.join(timeout=10)
        self.sock.close()
