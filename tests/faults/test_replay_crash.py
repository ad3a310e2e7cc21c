"""Bulk import under a crash: ``mailrouter replay`` commits a batch of messages per
transaction, so a kill -9 must leave whole batches only, and a rerun must finish the job
without storing anything twice or splitting a conversation (issue 10: "a crash leaves
nothing half-applied and a rerun is idempotent")."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from chaos import state_paths, subprocess_env, wait_until, write_config, write_corpus

N = 1200
BATCH = 50


def stored(db: Path) -> tuple[int, int]:
    """(inbound messages, delivery jobs) as the store holds them right now."""
    if not db.exists():
        return 0, 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        (messages,) = conn.execute("SELECT count(*) FROM messages").fetchone()
        (jobs,) = conn.execute("SELECT count(*) FROM outbox WHERE kind = 'deliver'").fetchone()
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0, 0
    finally:
        conn.close()
    return int(messages), int(jobs)


def replay(config: Path, corpus: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "mailrouter", "-c", str(config), "replay", str(corpus)]
    return subprocess.Popen(
        [*cmd, "--batch", str(BATCH), *extra],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_replay_killed_mid_run_leaves_whole_batches_and_a_rerun_completes(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path)
    db, _folders = state_paths(tmp_path)
    items = write_corpus(tmp_path / "corpus", N, seed=7)
    (tmp_path / "corpus" / "manifest.jsonl").unlink()  # not mail

    first = replay(config, tmp_path / "corpus")
    try:
        wait_until(lambda: stored(db)[0] >= 3 * BATCH, 120.0, "three batches committed")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate(timeout=30)
    messages, jobs = stored(db)
    assert 0 < messages < N, "the kill came after the run had finished"
    # Every routed message has exactly one delivery job here (one owner, no copies), and
    # a batch is one transaction: a kill leaves whole batches, never a message without
    # its job or half a batch.
    assert messages % BATCH == 0, messages
    assert jobs == messages

    second = replay(config, tmp_path / "corpus", "--json")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    summary = json.loads(out)
    assert summary["messages"] == N
    assert summary["actions"].get("duplicate") == messages  # the first run's, recognised
    assert summary["store_errors"] == 0

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT message_id, count(*), min(interaction_id) FROM messages GROUP BY message_id"
        ).fetchall()
    finally:
        conn.close()
    by_id = {mid: (count, iid) for mid, count, iid in rows}
    assert len(by_id) == N and all(count == 1 for count, _ in by_id.values())
    threads: dict[int, set[int]] = {}
    for item in items:
        threads.setdefault(item.thread, set()).add(by_id[item.message_id][1])
    split = {t: iids for t, iids in threads.items() if len(iids) != 1}
    assert not split, split
    assert len({iid for iids in threads.values() for iid in iids}) == len(threads)
