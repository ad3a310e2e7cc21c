#!/usr/bin/env python3
"""A small retrying MTA, run as its own process by the fault tests and ``bench/soak.py``.

It sends every message of a corpus (``chaos.write_corpus``) to mailrouter over SMTP or
LMTP as a sending MTA would: several sessions at once, each message of one conversation
in order, and on any failure — connection refused or dropped, no reply, a 4xx — the same
message again after a short, capped, jittered backoff.  Every ``250`` is appended to the
acknowledgement ledger (one JSON line per message and recipient, flushed at once) before
the next command, so what the peer acknowledged survives the client too.

    python mta.py --port 2525 --proto smtp --corpus DIR --acks acks.jsonl

A 5xx is final: the message is recorded as refused and not sent again.  Over LMTP the
client reads one reply per accepted recipient after DATA (RFC 2033 §4.2), checks that no
extra reply follows, and retries only the recipients without a 250.  Bounded: every
socket operation has a timeout and the whole run a deadline; exit status 0 when every
message got its 250s, 1 otherwise.  Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import smtplib
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

BACKOFF_INITIAL = 0.05
BACKOFF_CAP = 1.0


class Ledger:
    """The acknowledgement file: one line per 250 (or final refusal), written at once."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, **record: Any) -> None:
        record["t"] = time.time()
        with self._lock:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


class ProtocolError(Exception):
    """The server answered something a correct server never would (counted, then retried)."""


class Session:
    """One connection at a time to the server, reopened after any failure."""

    def __init__(self, host: str, port: int, proto: str, timeout: float) -> None:
        self.host, self.port, self.proto, self.timeout = host, port, proto, timeout
        self.conn: smtplib.SMTP | None = None
        self.connects = 0  # sessions opened: more than one means a session was lost

    def open(self) -> smtplib.SMTP:
        if self.conn is None:
            cls = smtplib.LMTP if self.proto == "lmtp" else smtplib.SMTP
            conn = cls(self.host, self.port, timeout=self.timeout)
            self.connects += 1
            code, text = conn.ehlo("mta.test")  # LHLO for smtplib.LMTP
            if code != 250:
                conn.close()
                raise smtplib.SMTPResponseException(code, text)
            self.conn = conn
        return self.conn

    def drop(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()
            self.conn = None

    def send(self, mail_from: str, rcpts: list[str], data: bytes) -> dict[str, tuple[int, str]]:
        """One transaction: each recipient's final (code, text).  Raises on a session failure
        (the caller drops the connection and tries again)."""
        conn = self.open()
        code, text = conn.mail(mail_from)
        if code != 250:
            conn.rset()
            return {r: (code, text.decode("utf-8", "replace")) for r in rcpts}
        out: dict[str, tuple[int, str]] = {}
        accepted = []
        for r in rcpts:
            code, text = conn.rcpt(r)
            out[r] = (code, text.decode("utf-8", "replace"))
            if code in (250, 251):
                accepted.append(r)
        if not accepted:
            conn.rset()
            return out
        code, text = conn.data(data)
        out[accepted[0]] = (code, text.decode("utf-8", "replace"))
        if self.proto == "lmtp":
            for r in accepted[1:]:
                code, text = conn.getreply()
                out[r] = (code, text.decode("utf-8", "replace"))
            # One reply per recipient and not one more: the next reply must be NOOP's own.
            code, text = conn.docmd("NOOP")
            if code != 250 or text.startswith(b"2.0.0 OK "):
                raise ProtocolError(f"extra reply after DATA: {code} {text!r}")
        return out


def run_lane(
    items: list[dict[str, Any]],
    corpus: Path,
    args: argparse.Namespace,
    ledger: Ledger,
    stats: dict[str, int],
    lock: threading.Lock,
    deadline: float,
    seed: int,
) -> None:
    rnd = random.Random(seed)
    session = Session(args.host, args.port, args.proto, args.timeout)
    try:
        for item in items:
            data = (corpus / item["file"]).read_bytes()
            waiting = list(item["rcpts"])
            failures = 0
            while waiting:
                if time.monotonic() > deadline:
                    with lock:
                        stats["unsent"] += 1
                    return
                try:
                    results = session.send(item["from"], waiting, data)
                except ProtocolError:
                    with lock:
                        stats["protocol_errors"] += 1
                    session.drop()
                    results = {}
                except (OSError, smtplib.SMTPException, EOFError):
                    # Refused, reset, closed without a reply, timed out: all "try again".
                    session.drop()
                    results = {}
                for rcpt, (code, text) in results.items():
                    if 200 <= code < 300:
                        ledger.write(n=item["n"], rcpt=rcpt, code=code, reply=text)
                        waiting.remove(rcpt)
                    elif code >= 500:
                        ledger.write(n=item["n"], rcpt=rcpt, code=code, reply=text, final=True)
                        waiting.remove(rcpt)
                        with lock:
                            stats["refused"] += 1
                    else:
                        with lock:
                            stats["tempfail"] += 1
                        if code == 421:  # the server is closing this session
                            session.drop()
                if waiting:
                    failures += 1
                    with lock:
                        stats["retries"] += 1
                    pause = min(BACKOFF_CAP, BACKOFF_INITIAL * 2 ** min(failures - 1, 10))
                    time.sleep(pause * rnd.uniform(0.5, 1.0))
            with lock:
                stats["done"] += 1
    finally:
        with lock:
            stats["connects"] += session.connects
        try:
            if session.conn is not None:
                session.conn.quit()
        except (OSError, smtplib.SMTPException):
            pass
        session.drop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--proto", choices=("smtp", "lmtp"), default="smtp")
    ap.add_argument("--corpus", type=Path, required=True, help="a directory from write_corpus")
    ap.add_argument("--acks", type=Path, required=True, help="the ledger (JSON lines)")
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=60.0, help="per socket operation")
    ap.add_argument("--deadline", type=float, default=600.0, help="for the whole run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    manifest = [
        json.loads(line)
        for line in (args.corpus / "manifest.jsonl").read_text("utf-8").splitlines()
        if line
    ]
    lanes: dict[int, list[dict[str, Any]]] = {}
    for item in manifest:
        lanes.setdefault(item["thread"] % args.sessions, []).append(item)
    ledger = Ledger(args.acks)
    counters = ("done", "retries", "tempfail", "refused", "protocol_errors", "unsent", "connects")
    stats = dict.fromkeys(counters, 0)
    lock = threading.Lock()
    deadline = time.monotonic() + args.deadline
    socket.setdefaulttimeout(args.timeout)
    threads = [
        threading.Thread(
            target=run_lane,
            args=(items, args.corpus, args, ledger, stats, lock, deadline, args.seed * 1000 + i),
            daemon=True,
        )
        for i, items in sorted(lanes.items())
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 5)
    ledger.close()
    stats["messages"] = len(manifest)
    print(json.dumps(stats), flush=True)
    ok = stats["done"] == len(manifest) and not stats["protocol_errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
