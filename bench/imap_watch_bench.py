#!/usr/bin/env python3
"""IMAP-watch benchmark: old-address mail routed from one Dovecot INBOX to another.

A standalone Dovecot (the test suite's ``servers.Dovecot``, loopback high ports) holds the
accounts' mailboxes; ``mailrouter run`` watches sales@'s INBOX (IDLE) and delivers
support@'s mail by IMAP APPEND.  A customer's first message reaches sales@ and is
ingested; the interaction is transferred to support@ (``mailrouter transfer``).  Then N
replies in that thread are LMTP-delivered, one at a time, to the OLD account's INBOX.
The latency of each is the time from Dovecot's LMTP 250 until an IDLE client on support@'s
INBOX sees it arrive (``* n EXISTS``).  Target: p99 ≤ 1.5 s over 200 messages.

BASELINE, same run and same observer: N messages LMTP-delivered straight into support@'s
INBOX — what Dovecot and an IDLE client cost without mailrouter in between.

    python bench/imap_watch_bench.py            # 200 messages
    python bench/imap_watch_bench.py --quick    # 20 messages

Needs Dovecot (``apt-get install dovecot-imapd dovecot-lmtpd``); without it this prints
why and exits 0 — unless MAILROUTER_REQUIRE_SERVERS=1, where a missing Dovecot is exit 2.
Not a test: it never fails because a machine is slow.  Loopback only; every wait bounded.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import smtplib
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from smtp_bench import hermetic_env, mailrouter, pct, wait_line  # noqa: E402

SALES, SUPPORT = "sales@example.test", "support@example.test"
WAIT = 20.0  # seconds one message may take to show up before the run gives up
LIBEXEC = (Path("/usr/lib/dovecot"), Path("/usr/libexec/dovecot"))

CONFIG = """
state_dir = "{state}"
[templates]
directory = "{templates}"
[smtp]
enabled = false
[http]
enabled = false
[outbound]
type = "pickup"
path = "pickup"
[log]
level = "WARNING"
[accounts.sales]
address = "{sales}"
  [accounts.sales.transfer]
  enabled = true
  [accounts.sales.imap]
  host = "127.0.0.1"
  port = {port}
  password_file = "{secret}"
  timeout = 10
[accounts.support]
address = "{support}"
  [accounts.support.delivery]
  type = "imap"
  host = "127.0.0.1"
  port = {port}
  user = "{support}"
  password_file = "{secret}"
  timeout = 10
"""


def dovecot_installed() -> bool:
    return shutil.which("dovecot") is not None and any(
        (d / "lmtp").exists() and (d / "imap").exists() for d in LIBEXEC
    )


def message(mid: str, to: str, parent: str | None = None) -> bytes:
    lines = [
        "From: Carol Customer <carol@customer.example>",
        f"To: {to}",
        f"Subject: {'Re: ' if parent else ''}Chairs for the new office",
        "Date: Tue, 01 Dec 2026 10:00:00 +0000",
        f"Message-ID: <{mid}>",
    ]
    if parent:
        lines += [f"In-Reply-To: <{parent}>", f"References: <{parent}>"]
    body = "One more thing about the chairs. " * 40
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


class IdleObserver(threading.Thread):
    """A plain IMAP client in IDLE on one INBOX: records how many messages it holds.

    Written on a socket (the standard library's imaplib has no IDLE before 3.14), so the
    observer adds nothing but a read.
    """

    def __init__(self, port: int, user: str, password: str):
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.pending = b""  # received, not yet split into lines
        self.exists = 0
        self.changed = threading.Condition()
        self.stop = threading.Event()
        self._line()  # greeting
        self._command(f"a1 LOGIN {user} {password}")
        for line in self._command("a2 SELECT INBOX"):
            m = re.match(rb"\* (\d+) EXISTS", line)
            if m:
                self.exists = int(m.group(1))
        self.sock.sendall(b"a3 IDLE\r\n")
        if not self._line().startswith(b"+"):
            raise RuntimeError("IDLE refused")

    def _line(self) -> bytes:
        for _ in range(10000):  # bounded: a line never needs this many reads
            line, sep, rest = self.pending.partition(b"\r\n")
            if sep:
                self.pending = rest
                return line
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("IMAP server closed the connection")
            self.pending += data
        raise ConnectionError("no line end from the IMAP server")

    def _command(self, command: str) -> list[bytes]:
        tag = command.split()[0].encode()
        self.sock.sendall(command.encode() + b"\r\n")
        lines = []
        for _ in range(1000):
            line = self._line()
            lines.append(line)
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise RuntimeError(line.decode(errors="replace"))
                return lines
        raise RuntimeError(f"no end to {command.split()[1]}")

    def run(self) -> None:
        # select() with a short bound, so a stop is noticed within half a second.
        while not self.stop.is_set():
            *lines, self.pending = self.pending.split(b"\r\n")
            for line in lines:
                m = re.match(rb"\* (\d+) EXISTS", line)
                if m:
                    with self.changed:
                        self.exists = int(m.group(1))
                        self.changed.notify_all()
            ready, _, _ = select.select([self.sock], [], [], 0.5)
            if ready:
                data = self.sock.recv(65536)
                if not data:
                    return
                self.pending += data

    def wait_for(self, count: int, timeout: float) -> float | None:
        """Block until the INBOX holds ``count``; the perf_counter time then, or None."""
        with self.changed:
            if self.changed.wait_for(lambda: self.exists >= count, timeout):
                return time.perf_counter()
        return None

    def close(self) -> None:
        self.stop.set()
        self.join(5)
        with suppress(OSError):
            self.sock.sendall(b"DONE\r\na4 LOGOUT\r\n")
        self.sock.close()


def lmtp(port: int, rcpt: str, raw: bytes) -> float:
    """LMTP-deliver ``raw`` to ``rcpt``; the perf_counter time of Dovecot's 250."""
    with smtplib.LMTP("127.0.0.1", port, timeout=10) as c:
        refused = c.sendmail("carol@customer.example", [rcpt], raw)
        at = time.perf_counter()
    if refused:
        raise RuntimeError(f"LMTP refused {refused}")
    return at


def latencies(
    observer: IdleObserver, lmtp_port: int, rcpt: str, raws: Sequence[bytes]
) -> list[float]:
    """Deliver one at a time; each one's time from LMTP 250 to the observer's EXISTS."""
    out = []
    for raw in raws:
        target = observer.exists + 1
        sent = lmtp(lmtp_port, rcpt, raw)
        seen = observer.wait_for(target, WAIT)
        if seen is None:
            raise SystemExit(f"a message did not reach {SUPPORT}'s INBOX within {WAIT} s")
        out.append(seen - sent)
    return out


def wait_until(what: str, check: object, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise SystemExit(f"{what}: not within {timeout} s")


@contextmanager
def dovecot_server(base: Path) -> Iterator[object]:
    from servers import Dovecot, TlsFiles  # the test suite's Dovecot (tests/servers.py)

    tls = base / "tls"
    tls.mkdir()
    cert, key = tls / "cert.pem", tls / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-nodes", "-days", "2", "-newkey", "ec",
         "-pkeyopt", "ec_paramgen_curve:prime256v1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    cert.chmod(0o644)
    key.chmod(0o644)
    server = Dovecot(base_dir=base / "dovecot", mail_root=base / "dovecot" / "mail",
                     tls=TlsFiles(cert, key))  # fmt: skip
    server.base_dir.mkdir()
    try:
        server.write_config()
        server.start()
        yield server
    finally:
        server.stop()


def interaction_of(db: Path, message_id: str) -> int | None:
    with suppress(sqlite3.Error):
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            row = con.execute(
                "SELECT interaction_id FROM messages WHERE message_id = ?", (message_id,)
            ).fetchone()
        finally:
            con.close()
        return int(row[0]) if row and row[0] is not None else None
    return None


def replies_left(dc: object) -> list[bytes]:
    """The replies still in sales@'s INBOX (each should have been moved to Routed)."""
    return [raw for raw in dc.fetch_all(SALES) if b"<reply-" in raw]  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--messages", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="20 messages")
    a = ap.parse_args(argv)
    n = min(a.messages, 20) if a.quick else a.messages
    if not dovecot_installed():
        print("Dovecot is not installed (apt-get install dovecot-imapd dovecot-lmtpd): skipped")
        return 2 if os.environ.get("MAILROUTER_REQUIRE_SERVERS") == "1" else 0

    # Not under a 0700 temporary directory: Dovecot's unprivileged processes traverse it.
    base = Path(tempfile.mkdtemp(prefix="mr-imapbench-"))
    base.chmod(0o755)
    try:
        with dovecot_server(base) as dc:
            return run(dc, base, n)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(dc: object, base: Path, n: int) -> int:
    from servers import Dovecot

    assert isinstance(dc, Dovecot)
    secret = base / "imap-password"
    secret.write_text(dc.password + "\n")
    cfg = base / "mailrouter.toml"
    state = base / "state"
    cfg.write_text(
        CONFIG.format(
            state=state,
            templates=ROOT / "config" / "templates",
            sales=SALES,
            support=SUPPORT,
            port=dc.imap_port,
            secret=secret,
        )
    )
    env = hermetic_env()
    observer = IdleObserver(dc.imap_port, SUPPORT, dc.password)
    observer.start()
    try:
        # BASELINE: straight into support's INBOX, seen by the same IDLE client.
        base_raws = [message(f"direct-{k}@customer.example", SUPPORT) for k in range(n)]
        baseline = latencies(observer, dc.lmtp_port, SUPPORT, base_raws)

        subprocess.run(mailrouter(cfg, "db", "upgrade"), env=env, check=True, capture_output=True)
        proc = subprocess.Popen(
            mailrouter(cfg, "-v", "run"), env=env, stderr=subprocess.PIPE, text=True
        )
        try:
            wait_line(proc.stderr, "event=ready")
            stderr = proc.stderr
            assert stderr is not None
            threading.Thread(target=lambda: [None for _ in stderr], daemon=True).start()
            db = state / "mailrouter.db"
            lmtp(dc.lmtp_port, SALES, message("question@customer.example", SALES))
            wait_until(
                "the question ingested", lambda: interaction_of(db, "question@customer.example")
            )
            iid = interaction_of(db, "question@customer.example")
            subprocess.run(
                mailrouter(cfg, "transfer", str(iid), "--to", "support", "--by", "bench"),
                env=env,
                check=True,
                capture_output=True,
            )
            replies = [
                message(f"reply-{k}@customer.example", SALES, "question@customer.example")
                for k in range(n)
            ]
            routed = latencies(observer, dc.lmtp_port, SALES, replies)
            # The watcher MOVEs a message out of the old INBOX after its commit, which may
            # come a moment after the routed copy's APPEND: wait (bounded) before checking.
            with suppress(SystemExit):
                wait_until("replies moved out", lambda: not replies_left(dc), timeout=10)
        finally:
            proc.terminate()
            proc.wait(60)
    finally:
        observer.close()

    support = dc.fetch_all(SUPPORT)
    ids = [
        m.group(1).decode()
        for raw in support
        if (m := re.search(rb"(?im)^message-id:\s*<([^>]+)>", raw))
    ]
    doubled = len(ids) - len(set(ids))
    missing = sum(1 for k in range(n) if f"reply-{k}@customer.example" not in ids)
    left = replies_left(dc)
    print(f"{n} messages, one at a time; latency = LMTP 250 → IDLE client sees it in {SUPPORT}")
    print(
        f"  baseline: LMTP into {SUPPORT}'s INBOX    p50 {pct(baseline, 50) * 1e3:7.1f} ms  "
        f"p99 {pct(baseline, 99) * 1e3:7.1f} ms  max {max(baseline) * 1e3:7.1f} ms"
    )
    print(
        f"  IMAP watch: {SALES} → routed → {SUPPORT} p50 {pct(routed, 50) * 1e3:7.1f} ms  "
        f"p99 {pct(routed, 99) * 1e3:7.1f} ms  max {max(routed) * 1e3:7.1f} ms  "
        "(target p99 ≤ 1.5 s)"
    )
    print(
        f"  check: in {SUPPORT}'s INBOX {n - missing}/{n}, doubled {doubled}, "
        f"left in {SALES}'s INBOX {len(left)}"
    )
    print()
    print(f"ratio imap-watch-p99/lmtp-p99: {pct(routed, 99) / pct(baseline, 99):.2f}")
    print(f"p99 IMAP watch: {pct(routed, 99):.3f} s")
    return 1 if missing or doubled or left else 0


if __name__ == "__main__":
    raise SystemExit(main())
