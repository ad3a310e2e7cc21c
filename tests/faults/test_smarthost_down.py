"""Transfer notices while the smarthost is down or answering 4xx: retried with backoff and
sent exactly once after recovery; a 5xx marks the notice failed, visible in
``mailrouter queue --json`` (issue 9, faults 3).

A real ``mailrouter run`` sends through the suite's capture smarthost (aiosmtpd on
loopback), which is stopped and started again, or scripted to answer 451 or 554.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from chaos import DaemonProcess, outbox_open, state_paths, subprocess_env, wait_until, write_config

from mailrouter.config import Settings, load
from mailrouter.pipeline import Pipeline
from mailrouter.runtime import opened
from mailrouter.transfer import transfer
from servers import CaptureSmarthost

K = 5  # notices per test


def customer_mail(t: int) -> bytes:
    return (
        f"From: Customer {t} <customer{t}@customer.test>\r\nTo: sales@example.test\r\n"
        f"Subject: Chairs {t}\r\nMessage-ID: <notice-{t}@customer.test>\r\n\r\n"
        f"Do you have {t} chairs?\r\n"
    ).encode()


@pytest.fixture
def setup(
    tmp_path: Path, capture_smarthost: CaptureSmarthost
) -> Iterator[tuple[Settings, DaemonProcess, list[int]]]:
    """A daemon sending notices through the capture smarthost, and K conversations at
    sales@ (notice on) ready to be transferred to support@."""
    config = write_config(
        tmp_path,
        outbound={
            "type": "smtp",
            "host": capture_smarthost.host,
            "port": capture_smarthost.port,
            "tls": "none",
            "timeout": 10,
        },
        outbox={"initial_backoff": 0.3, "max_backoff": 2.0, "poll_interval": 0.3},
        names=("sales", "support"),
    )
    settings = load(config, env={})
    with opened(settings) as rt:
        iids = []
        for t in range(K + 1):
            got = Pipeline(rt).accept(customer_mail(t), [settings.account("sales")], source="test")
            assert got.interaction_id is not None
            iids.append(got.interaction_id)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    daemon.start()
    try:
        daemon.wait_ready()
        yield settings, daemon, iids
    finally:
        if daemon.alive:
            daemon.kill()


def transfer_all(settings: Settings, iids: list[int]) -> dict[str, int]:
    """Transfer each to support (another process than the daemon, as `mailrouter transfer
    --queue-only` would); returns notice Message-ID → outbox row."""
    out = {}
    with opened(settings) as rt:
        for iid in iids:
            r = transfer(rt, iid, "support", actor="test")
            assert r.notification == "queued" and r.notice_message_id and r.outbox_id
            out[r.notice_message_id] = r.outbox_id
    return out


def notices(db: Path) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM outbox WHERE kind = 'notify' ORDER BY id").fetchall()
    finally:
        conn.close()


def deferred_with_backoff(db: Path, error: str) -> bool:
    """Some notice failed with ``error`` and waits for a later attempt (not at once)."""
    now = datetime.now(UTC).replace(tzinfo=None).isoformat(" ")
    return any(
        r["status"] == "pending"
        and r["attempts"] >= 1
        and error in (r["last_error"] or "")
        and r["next_attempt_at"] > now
        for r in notices(db)
    )


def captured_ids(host: CaptureSmarthost) -> list[str]:
    out = []
    for m in host.messages:
        head = m.content.split(b"\r\n\r\n", 1)[0].decode("ascii", "replace")
        out += [line.split("<", 1)[1].split(">", 1)[0] for line in head.splitlines()
                if line.lower().startswith("message-id:")]  # fmt: skip
    return out


def test_smarthost_down_notices_are_retried_and_sent_once_when_it_is_back(
    setup: tuple[Settings, DaemonProcess, list[int]], capture_smarthost: CaptureSmarthost
) -> None:
    """Stopped smarthost: each notice is attempted, deferred with a growing pause, and
    after start() reaches the smarthost exactly once."""
    settings, daemon, iids = setup
    db, _ = state_paths(settings.config_path.parent)
    capture_smarthost.stop()
    try:
        queued = transfer_all(settings, iids[:K])
        wait_until(lambda: all(r["attempts"] >= 2 for r in notices(db)), 60, "each notice retried")
        wait_until(
            lambda: deferred_with_backoff(db, "onnect"), 60, "a notice waiting for a later try"
        )
        assert all(r["status"] in ("pending", "sending") for r in notices(db))
        assert capture_smarthost.messages == []
    finally:
        capture_smarthost.start()
    wait_until(lambda: all(r["status"] == "sent" for r in notices(db)), 60, "all notices sent")
    assert daemon.stop() == 0  # drained: nothing is in flight any more
    assert sorted(captured_ids(capture_smarthost)) == sorted(mid.strip("<>") for mid in queued), (
        "each notice exactly once"
    )
    assert {r["id"] for r in notices(db)} == set(queued.values())


def test_smarthost_answering_451_notices_back_off_and_go_out_once(
    setup: tuple[Settings, DaemonProcess, list[int]], capture_smarthost: CaptureSmarthost
) -> None:
    """451 at the end of DATA, twice per notice on average: retried with backoff, each
    sent exactly once, every attempt accounted for."""
    settings, daemon, iids = setup
    db, _ = state_paths(settings.config_path.parent)
    capture_smarthost.fail_next(451, "4.3.0 try again later", count=2 * K, at="data")
    queued = transfer_all(settings, iids[:K])
    wait_until(lambda: deferred_with_backoff(db, "451"), 60, "a notice deferred after a 451")
    wait_until(lambda: all(r["status"] == "sent" for r in notices(db)), 90, "all notices sent")
    assert daemon.stop() == 0
    assert sorted(captured_ids(capture_smarthost)) == sorted(m.strip("<>") for m in queued)
    # Every scripted 451 met one attempt, and one more attempt per notice succeeded.
    assert sum(r["attempts"] for r in notices(db)) >= 3 * K
    assert outbox_open(db) == 0


def test_smarthost_answering_5xx_marks_the_notice_failed_in_queue_json(
    setup: tuple[Settings, DaemonProcess, list[int]], capture_smarthost: CaptureSmarthost
) -> None:
    """554 at DATA is permanent: no retry, status failed with the reply, shown by
    `mailrouter queue --json`; the other notices go out normally."""
    settings, daemon, iids = setup
    db, _ = state_paths(settings.config_path.parent)
    capture_smarthost.fail_next(554, "5.7.1 rejected by policy", count=1, at="data")
    [(refused_id, refused_row)] = transfer_all(settings, iids[:1]).items()
    wait_until(
        lambda: [r["status"] for r in notices(db)] == ["failed"], 60, "the notice marked failed"
    )
    others = transfer_all(settings, iids[1:3])
    wait_until(
        lambda: sorted(r["status"] for r in notices(db)) == ["failed", "sent", "sent"],
        60,
        "the other notices sent",
    )
    assert daemon.stop() == 0
    out = subprocess.run(
        [sys.executable, "-m", "mailrouter", "-c", str(settings.config_path), "queue", "--json"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = json.loads(out.stdout)
    [row] = [r for r in rows if r["id"] == refused_row]
    assert (row["status"], row["kind"], row["attempts"]) == ("failed", "notify", 1), row
    assert "554" in row["last_error"] and "5.7.1" in row["last_error"], row
    assert {r["id"] for r in rows} == {refused_row}  # sent ones are not listed without --all
    assert sorted(captured_ids(capture_smarthost)) == sorted(m.strip("<>") for m in others)
    assert refused_id.strip("<>") not in captured_ids(capture_smarthost)
