"""Crash during transfer: a transfer and its notice are one transaction (issue 9, faults 5).

Many ``mailrouter transfer`` runs (the command's own ``main``, one run per transfer, in a
driver process) move conversations back and forth between two accounts that both notify;
the driver is SIGKILLed at random points five times and the daemon, which sends the
notices meanwhile, once.  Afterwards there is never a transfer without its notice outbox
row, nor a notice without its transfer; every finished step happened exactly once; each
notice was written out exactly once; the owner is the last transfer's target.
"""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from chaos import (
    DaemonProcess,
    outbox_open,
    state_paths,
    subprocess_env,
    wait_until,
    write_config,
)
from test_kill_ingest import seed

from mailrouter.config import load
from mailrouter.pipeline import Pipeline
from mailrouter.runtime import opened

DRIVER = r"""
import json, sys
from pathlib import Path
from mailrouter.cli import main


def drive(config: str, plan: str, progress: str) -> None:
    steps = json.loads(Path(plan).read_text())
    done = set(Path(progress).read_text().split()) if Path(progress).exists() else set()
    with open(progress, "a") as out:
        for k, (iid, to, queue_only) in enumerate(steps):
            if str(k) in done:
                continue
            args = ["-c", config, "transfer", str(iid), "--to", to, "--by", f"step-{k}"]
            # 1 = refused: a step that committed just before a kill is already done.
            assert main(args + (["--queue-only"] if queue_only else [])) in (0, 1)
            out.write(f"{k}\n")
            out.flush()


# The main-module guard: notice renders run in a forkserver child, which imports the
# main module (as any multiprocessing program must allow; the mailrouter command has it).
if __name__ == "__main__":
    drive(*sys.argv[1:4])
"""

CONVERSATIONS, ROUNDS, DRIVER_KILLS = 12, 3, 5


def test_sigkill_during_many_transfers_never_splits_a_transfer_from_its_notice(
    tmp_path: Path,
) -> None:
    """36 transfers, 5 driver kills and a daemon kill: transfers and notices pair up 1:1."""
    rnd = random.Random(seed() or random.SystemRandom().randrange(1 << 30))
    notify = '[accounts.{0}.transfer]\nenabled = true\nnotify = true\ntemplate = "transfer_notice"'
    config = write_config(
        tmp_path,
        outbox={"poll_interval": 0.3, "initial_backoff": 0.3, "max_backoff": 2.0},
        accounts={n: notify.format(n) for n in ("sales", "support")},
        names=("sales", "support"),
    )
    settings = load(config, env={})
    iids = []
    with opened(settings) as rt:
        for t in range(CONVERSATIONS):
            raw = (
                f"From: Customer {t} <customer{t}@customer.test>\r\nTo: sales@example.test\r\n"
                f"Subject: Chairs {t}\r\nMessage-ID: <move-{t}@customer.test>\r\n\r\nHello\r\n"
            ).encode()
            got = Pipeline(rt).accept(raw, [settings.account("sales")], source="test")
            assert got.interaction_id is not None
            iids.append(got.interaction_id)
    steps = [
        (iid, "support" if r % 2 == 0 else "sales", rnd.random() < 0.7)
        for r in range(ROUNDS)
        for iid in iids
    ]
    plan, progress, script = tmp_path / "plan.json", tmp_path / "progress", tmp_path / "drive.py"
    plan.write_text(json.dumps(steps))
    script.write_text(DRIVER)
    db, _ = state_paths(tmp_path)

    def finished() -> int:
        return len(progress.read_text().split()) if progress.exists() else 0

    def driver() -> subprocess.Popen[bytes]:
        with (tmp_path / "driver.log").open("ab") as log:
            return subprocess.Popen(
                [sys.executable, str(script), str(config), str(plan), str(progress)],
                env=subprocess_env(),
                stdout=log,
                stderr=log,
            )

    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    daemon.start()
    proc = driver()
    kills: list[int] = []
    try:
        daemon.wait_ready()
        points = sorted(rnd.sample(range(2, len(steps) - 2), DRIVER_KILLS))
        daemon_kill_at = rnd.choice(points)
        for point in points:
            wait_until(lambda p=point: finished() >= p, 240, f"{point} transfers done")
            time.sleep(rnd.uniform(0.0, 0.2))  # somewhere inside the next run
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            kills.append(finished())
            if point == daemon_kill_at:  # the notices' sender goes down too
                daemon.kill()
                daemon.start()
                daemon.wait_ready()
            proc = driver()
        assert proc.wait(300) == 0, (tmp_path / "driver.log").read_text()[-3000:]
        wait_until(lambda: outbox_open(db) == 0, 60, "every notice written out")
        assert daemon.stop() == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        if daemon.alive:
            daemon.kill()

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    transfers = conn.execute(
        "SELECT t.id, t.interaction_id, f.name, d.name, t.actor, t.notification,"
        " t.notification_message_id, t.notification_outbox_id"
        " FROM transfers t JOIN accounts f ON f.id = t.from_account_id"
        " JOIN accounts d ON d.id = t.to_account_id ORDER BY t.id"
    ).fetchall()
    notices = {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT o.id, o.interaction_id, o.status, m.message_id FROM outbox o"
            " LEFT JOIN messages m ON m.id = o.message_pk WHERE o.kind = 'notify'"
        )
    }
    outbound = conn.execute(
        "SELECT m.message_id FROM messages m WHERE m.direction = 'outbound'"
    ).fetchall()
    owners = dict(
        conn.execute(
            "SELECT i.id, a.name FROM interactions i JOIN accounts a ON a.id = i.account_id"
        )
    )
    conn.close()

    # Never a transfer without its notice, nor a notice without its transfer.
    for tid, iid, _src, _dst, _actor, state, mid, outbox_id in transfers:
        assert state == "queued" and outbox_id in notices, f"transfer {tid} has no notice"
        n_iid, _status, n_mid = notices[outbox_id]
        assert (n_iid, n_mid) == (iid, mid.strip("<>")), f"transfer {tid}: another notice"
    referenced = Counter(t[7] for t in transfers)
    assert set(referenced) == set(notices), "a notice without its transfer"
    assert max(referenced.values()) == 1
    assert len(outbound) == len(notices)  # each notice stored once as our outbound message
    assert {s for _i, s, _m in notices.values()} == {"sent"}

    # Every step the driver finished happened exactly once; the rest at most once.
    actors = Counter(t[4] for t in transfers)
    assert max(actors.values()) == 1
    done = {f"step-{k}" for k in progress.read_text().split()}
    assert done == {f"step-{k}" for k in range(len(steps))}
    assert set(actors) == done
    # Each conversation's transfers chain (from = the previous to), ending at its owner.
    for iid in iids:
        chain = [(src, dst) for _t, i, src, dst, *_ in transfers if i == iid]
        assert [c[0] for c in chain] == ["sales", *[c[1] for c in chain[:-1]]]
        assert owners[iid] == chain[-1][1]

    # Written out once each: one pickup file per notice, every Message-ID once.
    pickup = sorted((tmp_path / "state" / "pickup").glob("*.eml"))
    ids = [
        next(
            line.split(b"<", 1)[1].split(b">", 1)[0].decode()
            for line in f.read_bytes().splitlines()
            if line.lower().startswith(b"message-id:")
        )
        for f in pickup
    ]
    assert sorted(ids) == sorted(m for _i, _s, m in notices.values())
    print(f"transfers: {len(transfers)}, driver killed after {kills} finished steps")
