"""``mailrouter db backup PATH``: a consistent SQLite copy taken while a real daemon takes
mail, restored by putting the file in place; refusals that write nothing."""

from __future__ import annotations

import json
import shutil
import smtplib
import sqlite3
import stat
import threading
import time
from pathlib import Path

from daemon_process import running_daemon
from helpers import make_settings, run_cli
from mailrouter.config import Settings
from mailrouter.store.migrate import head_revision


def mail(n: int) -> bytes:
    return (
        f"From: c{n}@customer.test\r\nTo: sales@example.test\r\nSubject: backup {n}\r\n"
        f"Message-ID: <backup-{n}@customer.test>\r\n\r\nhello {n}\r\n"
    ).encode()


def db_file(settings: Settings) -> Path:
    return Path(settings.database_url.removeprefix("sqlite:///"))


def test_backup_while_the_daemon_takes_mail_is_consistent_and_restores(tmp_path: Path) -> None:
    """Mail keeps arriving over SMTP during the backup: the copy passes SQLite's integrity
    check, is at the schema head, holds a prefix of what was accepted, is one private
    file; a new state directory with it as its database serves those interactions."""
    target = tmp_path / "backups" / "mailrouter-1.db"
    target.parent.mkdir()
    (tmp_path / "live").mkdir()
    with running_daemon(tmp_path / "live") as d:
        port = d.settings.smtp.port
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            for n in range(5):
                c.sendmail(f"c{n}@customer.test", ["sales@example.test"], mail(n))
        stop = threading.Event()
        sent: list[int] = []

        def more() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
                n = 100
                while not stop.is_set():
                    c.sendmail(f"c{n}@customer.test", ["sales@example.test"], mail(n))
                    sent.append(n)
                    n += 1

        writer = threading.Thread(target=more)
        writer.start()
        try:
            # Some of it accepted (250: committed) before the backup starts, more during it.
            deadline = time.monotonic() + 30
            while len(sent) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            accepted_before = len(sent)
            code, out, err = run_cli(d.settings, "db", "backup", str(target))
        finally:
            stop.set()
            writer.join(timeout=30)
        assert code == 0, err
        assert out.startswith(f"backup: {target} (") and head_revision() in out
        assert d.stop() == 0

    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no -wal, no partial
    with sqlite3.connect(target) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert copy.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert copy.execute("SELECT version_num FROM alembic_version").fetchone() == (
            head_revision(),
        )
        ids = [row[0] for row in copy.execute("SELECT message_id FROM messages ORDER BY id")]
    copy.close()
    assert len(ids) >= 5 and ids[:5] == [f"backup-{n}@customer.test" for n in range(5)]
    # What the copy has of the mail that kept coming is a prefix: one moment, no holes.
    later = [int(i.split("-")[1].split("@")[0]) for i in ids[5:]]
    assert len(later) >= accepted_before >= 3
    assert later == sent[: len(later)]

    # Restore: the file, put where a (stopped) daemon's database goes.
    restored = make_settings(tmp_path / "restored")
    db_file(restored).parent.mkdir(parents=True)
    shutil.copy2(target, db_file(restored))
    code, out, err = run_cli(restored, "interactions", "--json")
    assert code == 0, err
    assert len(json.loads(out)) == len(ids)


def test_backup_refuses_an_existing_target_and_writes_nothing(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    target = tmp_path / "taken.db"
    target.write_bytes(b"precious")
    code, _out, err = run_cli(settings, "db", "backup", str(target))
    assert code == 1
    assert f"{target} exists; remove it or give another name" in err
    assert target.read_bytes() == b"precious"
    code, _out, err = run_cli(settings, "db", "backup", str(tmp_path / "no" / "such" / "x.db"))
    assert code == 1 and "is not a directory" in err
    code, _out, err = run_cli(settings, "db", "backup")
    assert code == 1 and "needs the PATH" in err
    code, _out, err = run_cli(settings, "db", "upgrade", str(target))
    assert code == 1 and "takes no PATH" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".db") == ["taken.db"]


def test_backup_of_postgresql_points_at_pg_dump(tmp_path: Path) -> None:
    """No connection is made: the URL alone says it is not SQLite."""
    settings = make_settings(tmp_path)
    pg = settings.config_path.read_text("utf-8").replace(
        'url = "sqlite:///mailrouter.db"', 'url = "postgresql+psycopg://mr@127.0.0.1:1/mr"'
    )
    settings.config_path.write_text(pg, "utf-8")
    code, _out, err = run_cli(settings, "db", "backup", str(tmp_path / "pg.db"))
    assert code == 1 and "pg_dump" in err
    assert not (tmp_path / "pg.db").exists()
