"""Dovecot down during delivery: mail keeps being accepted, deliveries defer, and once
Dovecot is back every message is in its mailbox exactly once (issue 9, faults 2).

A real ``mailrouter run`` delivers sales@ over LMTP and support@ by IMAP APPEND into the
suite's Dovecot while a retrying MTA sends to it; Dovecot is stopped with deliveries in
flight and started again.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
from chaos import (
    ADDRESSES,
    DaemonProcess,
    MtaProcess,
    free_port,
    outbox_open,
    state_paths,
    wait_until,
    write_config,
    write_corpus,
)
from test_kill_ingest import ids_in

from servers import Dovecot

pytestmark = pytest.mark.dovecot


def deferred(db: Path) -> dict[str, int]:
    """Per account: outbox rows waiting for another attempt after a failed one."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return dict(
            conn.execute(
                "SELECT a.name, count(*) FROM outbox o JOIN accounts a ON a.id = o.account_id"
                " WHERE o.status = 'pending' AND o.attempts >= 1 AND o.last_error IS NOT NULL"
                " GROUP BY a.name"
            )
        )
    finally:
        conn.close()


def sent(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM outbox WHERE status = 'sent'").fetchone()[0])
    finally:
        conn.close()


def test_dovecot_stopped_mid_delivery_defers_and_delivers_each_once_when_back(
    tmp_path: Path, dovecot_clean: Dovecot
) -> None:
    """40 messages, Dovecot stops after the first deliveries, 40 more: every message still
    gets its 250, LMTP and APPEND deliveries are deferred with their error, and after
    start() each message is in its owner's INBOX once — none lost, none doubled."""
    dv = dovecot_clean
    secret = tmp_path / "imap-password"
    secret.write_text(dv.password + "\n")
    port = free_port()
    config = write_config(
        tmp_path,
        smtp_port=port,
        outbox={"initial_backoff": 0.3, "max_backoff": 2.0, "poll_interval": 0.5},
        accounts={
            "sales": f'[accounts.sales.delivery]\ntype = "lmtp"\nhost = "{dv.host}"\n'
            f"port = {dv.lmtp_port}\ntimeout = 10\n",
            "support": f'[accounts.support.delivery]\ntype = "imap"\nhost = "{dv.host}"\n'
            f'port = {dv.imap_port}\nuser = "support@example.test"\n'
            f'password_file = "{secret}"\ntimeout = 10\n',
        },
        names=("sales", "support"),
    )
    db, _ = state_paths(tmp_path)
    first = write_corpus(tmp_path / "first", 40, seed=9)
    second = write_corpus(tmp_path / "second", 40, seed=10)  # sent while Dovecot is down
    items, n = first + second, 80
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    daemon.start()
    mtas: list[MtaProcess] = []
    try:
        daemon.wait_ready()
        mtas.append(MtaProcess(tmp_path / "first", tmp_path / "first.jsonl", port=port))
        wait_until(lambda: sent(db) >= 10, 60, "the first deliveries")
        dv.stop()  # the first batch's deliveries are still going on
        try:
            mtas.append(MtaProcess(tmp_path / "second", tmp_path / "second.jsonl", port=port))
            for mta in mtas:
                wait_until(lambda m=mta: m.proc.poll() is not None, 120, "all acknowledged")
                assert mta.wait(10)["exit"] == 0
            assert sum(len(m.acked()) for m in mtas) == n
            # Both backends noticed and put their work back for later, with the reason.
            wait_until(lambda: {"sales", "support"} <= deferred(db).keys(), 60, "both deferred")
        finally:
            dv.start()
        wait_until(lambda: outbox_open(db) == 0, 60, "every delivery done after the restart")
        assert daemon.stop() == 0
    finally:
        for mta in mtas:
            mta.close()
        if daemon.alive:
            daemon.kill()

    boxes = {
        "sales": ids_in(dv, "sales@example.test", "INBOX"),
        "support": ids_in(dv, "support@example.test", "INBOX"),
    }
    # The one window where LMTP can repeat: Dovecot stored the message but its reply never
    # came, or came as "421 Shutting down" (stopped right then).  The outbox says so in
    # that attempt's error, and only those may be there twice.
    log = "\n".join(daemon.lines)
    may_repeat = set(re.findall(r"msgid=<([^>]+)>[^\n]*may have been delivered", log))
    for item in items:
        copies = boxes[item.owner].count(item.message_id)
        other = boxes["support" if item.owner == "sales" else "sales"]
        assert copies >= 1, f"message {item.n} lost ({item.owner})"
        assert copies == 1 or item.message_id in may_repeat, (
            f"message {item.n} delivered {copies} times\n"
            + "\n".join(line for line in daemon.lines if item.message_id in line)
            + "\nfiles: "
            + ", ".join(
                str(f.relative_to(dv.mail_root))
                for f in (dv.mail_root / ADDRESSES[item.owner]).rglob("*")
                if f.is_file() and item.message_id.encode() in f.read_bytes()
            )
            + "\n"
            + dv.log_tail(60)
        )
        assert item.message_id not in other
    assert sum(len(v) for v in boxes.values()) == n + sum(
        boxes[i.owner].count(i.message_id) - 1 for i in items
    )
    doubled = sum(boxes[i.owner].count(i.message_id) > 1 for i in items)
    print(
        f"dovecot down: {n} messages; replies lost when Dovecot stopped: {len(may_repeat)}, "
        f"of which delivered twice: {doubled}"
    )
