"""The queue tools beside a running ``mailrouter run``: the command changes the store, the
daemon's own outbox worker acts on it (hold, retry --all, release, delete), and ``trace``
then tells the whole story — across the process boundary, as an operator would use them."""

from __future__ import annotations

import json
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import run_cli, subprocess_env
from mailrouter.config import Settings, load_from_text
from servers import CaptureSmarthost, free_port

ROOT = Path(__file__).resolve().parents[2]

QUESTION = b"""From: Dana Customer <dana@customer.test>\r
To: sales@example.test\r
Subject: Broken hinge on order 5512\r
Date: Wed, 25 Nov 2026 10:00:00 +0000\r
Message-ID: <hinge-1@customer.test>\r
\r
The hinge broke after two days.\r
"""


def daemon_settings(tmp_path: Path, smarthost: CaptureSmarthost) -> Settings:
    text = f"""
state_dir = "{tmp_path / "state"}"
[templates]
directory = "{ROOT / "config" / "templates"}"
[smtp]
port = {free_port()}
[outbound]
type = "smtp"
host = "{smarthost.host}"
port = {smarthost.port}
tls = "none"
timeout = 10
[outbox]
poll_interval = 0.2
initial_backoff = 3600
max_backoff = 7200
[accounts.sales]
address = "sales@example.test"
"""
    path = tmp_path / "mailrouter.toml"
    path.write_text(text)
    return load_from_text(text, path)


def wait_until(predicate: Callable[[], Any], within: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    assert predicate(), f"not within {within:g}s: {what}"


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def daemon(
    tmp_path: Path, capture_smarthost: CaptureSmarthost
) -> Iterator[tuple[Settings, subprocess.Popen[bytes]]]:
    settings = daemon_settings(tmp_path, capture_smarthost)
    exe = Path(sys.executable).parent / "mailrouter"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mailrouter"]
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [*cmd, "-c", str(settings.config_path), "run"],
        env=subprocess_env(settings),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        wait_until(lambda: listening(settings.smtp.port) or proc.poll() is not None, what="ready")
        assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
        yield settings, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        log.close()


def queue(settings: Settings, *args: str) -> Any:
    code, out, err = run_cli(settings, "queue", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def job(settings: Settings, queue_id: str) -> dict[str, Any]:
    [found] = [r for r in queue(settings, "--all") if r["queue_id"] == queue_id]
    return found


def test_queue_commands_drive_a_running_daemon(
    tmp_path: Path,
    daemon: tuple[Settings, subprocess.Popen[bytes]],
    capture_smarthost: CaptureSmarthost,
) -> None:
    """451 → deferred an hour; hold: retry --all leaves it; release: the daemon sends it."""
    settings, proc = daemon
    with smtplib.SMTP("127.0.0.1", settings.smtp.port, timeout=10) as c:
        assert c.sendmail("dana@customer.test", ["sales@example.test"], QUESTION) == {}
    body = tmp_path / "reply.txt"
    body.write_text("We are sending a new hinge today.\n")

    # An agent reply, queued for the daemon; the smarthost greylists it once.
    capture_smarthost.fail_next(451, "4.7.1 greylisted, try again", at="data")
    code, out, err = run_cli(
        settings, "reply", "1", "--body-file", str(body), "--agent", "bob", "--queue-only"
    )
    assert code == 0, err
    reply_id = out.split("<", 1)[1].split(">", 1)[0]
    [reply] = [r for r in queue(settings) if r["kind"] == "reply"]
    qid = reply["queue_id"]
    wait_until(lambda: job(settings, qid)["attempts"] == 1, what="the daemon's first attempt")
    deferred = job(settings, qid)
    assert (deferred["status"], deferred["reason"]) == ("pending", "deferred")

    assert queue(settings, "hold", qid)["items"] == [{**_change(qid), "status": "held"}]
    assert queue(settings, "retry", "--all", "--queue-only") == {"made_due": 0, "attempted": 0}
    time.sleep(1.0)  # five of the daemon's polls
    assert capture_smarthost.messages == [] and job(settings, qid)["status"] == "held"

    released = queue(settings, "release", qid, "--queue-only")
    assert released == {"items": [{**_change(qid), "status": "pending"}], "attempted": 0}
    wait_until(lambda: job(settings, qid)["status"] == "sent", what="the daemon sends it")
    [sent] = capture_smarthost.messages
    assert sent.rcpt_tos == ("dana@customer.test",)

    code, out, err = run_cli(settings, "trace", reply_id, "--json")
    assert code == 0, err
    [copy] = json.loads(out)["messages"]
    [delivery] = copy["deliveries"]
    assert [a["status"] for a in delivery["attempts"]] == ["deferred", "sent"]
    assert "451 4.7.1 greylisted" in delivery["attempts"][0]["reply"]

    # A job the smarthost refuses for good: failed, then deleted; the daemon never tries again.
    capture_smarthost.fail_next(550, "5.7.1 rejected by policy", at="data")
    assert run_cli(settings, "reply", "1", "--body-file", str(body), "--queue-only")[0] == 0
    [second] = [r for r in queue(settings) if r["kind"] == "reply"]
    wait_until(lambda: job(settings, second["queue_id"])["status"] == "failed", what="5xx")
    code, out, err = run_cli(settings, "queue", "delete", second["queue_id"], "--yes")
    assert (code, out.strip()) == (0, f"{second['queue_id']}: deleted"), err
    assert queue(settings) == []

    proc.terminate()
    assert proc.wait(timeout=30) == 0


def _change(qid: str) -> dict[str, Any]:
    return {
        "queue_id": qid,
        "action": None,
        "rule": None,
        "interaction": None,
        "reason": None,
        "job": None,
    }
