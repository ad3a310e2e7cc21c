"""Reload under load (issue 9, faults 6): SIGHUP a real ``mailrouter run`` again and again
while a retrying MTA process keeps four SMTP sessions busy.

What must hold: no session is dropped (the client opens each of its sessions once and never
has to retry), no message is refused or lost, each is delivered exactly once into its
conversation's mailbox, and every reload is applied (``event=reloaded``): the billing
account is added and removed in turn, so the account map really changes under the open
sessions.  ``FAULT_SEED=n`` replays one run.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

from chaos import (
    ADDRESSES,
    DaemonProcess,
    Maildirs,
    MtaProcess,
    RunResult,
    _check,
    free_port,
    outbox_open,
    state_paths,
    store_facts,
    wait_until,
    write_config,
    write_corpus,
)

N = 400
RELOADS = 6
SESSIONS = 4


def test_sighup_under_load_drops_no_session_and_loses_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("FAULT_SEED") or random.SystemRandom().randrange(1 << 30))
    rnd = random.Random(seed)
    port = free_port()
    with_billing = tuple(ADDRESSES)
    without_billing = ("sales", "support")
    config = write_config(tmp_path, smtp_port=port, names=without_billing)
    db, folders = state_paths(tmp_path)
    items = write_corpus(tmp_path / "corpus", N, seed=seed)
    boxes = Maildirs(folders)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    daemon.start()
    daemon.wait_ready()
    mta = MtaProcess(
        tmp_path / "corpus", tmp_path / "acks.jsonl", port=port, sessions=SESSIONS,
        deadline=300.0, seed=seed,
    )  # fmt: skip
    result = RunResult(proto="smtp", seed=seed, messages=N)
    reloads_seen: list[int] = []
    try:
        # Reload points spread over the first 80 % of the run, so each SIGHUP finds the
        # client mid-transaction on its open sessions.
        points = sorted(rnd.sample(range(N // 10, N * 8 // 10), RELOADS))
        for k, point in enumerate(points, 1):
            wait_until(
                lambda point=point: len(mta.acked()) >= point or mta.proc.poll() is not None,
                120.0,
                f"{point} messages acknowledged (seed {seed})",
                interval=0.02,
            )
            assert mta.proc.poll() is None, f"the client finished before reload {k}"
            before = daemon.count("event=reloaded")
            # Toggle an account: the reload swaps the account map under open sessions.
            write_config(tmp_path, smtp_port=port, names=with_billing if k % 2 else without_billing)
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGHUP)
            wait_until(
                lambda before=before: (
                    daemon.count("event=reloaded") > before
                    or daemon.count("event=reload-refused") > 0
                ),
                30.0,
                f"reload {k} applied (seed {seed})",
                interval=0.02,
            )
            reloads_seen.append(len(mta.acked()))
        result.client = mta.wait(300.0)
        want = {i.message_id for i in items}
        wait_until(lambda: want <= boxes.scan().keys(), 120.0, f"all delivered (seed {seed})")
        wait_until(lambda: outbox_open(db) == 0, 30.0, "the outbox empty")
        assert daemon.stop() == 0
    finally:
        mta.close()
        if daemon.alive:
            daemon.kill()
    assert daemon.count("event=reload-refused") == 0, daemon.tail()
    assert daemon.count("event=reloaded") == RELOADS, daemon.tail()
    result.acked = len(mta.acked())
    _check(result, items, mta, boxes, store_facts(db), daemon)
    summary = f"seed={seed} reloads at acks {reloads_seen} client={result.client}"
    assert not result.problems, summary + "\n" + "\n".join(result.problems[:40])
    assert (result.acked, result.lost, result.duplicated, result.split) == (N, 0, 0, 0), summary
    # No session dropped: each of the client's sessions was opened once and never retried.
    assert result.client["connects"] == SESSIONS, summary
    assert (result.client["retries"], result.client["tempfail"]) == (0, 0), summary
