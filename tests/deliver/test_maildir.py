"""Maildir delivery: crash-safe and idempotent per outbox key, without a directory scan on
the first attempt (the scale finding: cost grew with the mailbox)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailrouter.deliver import maildir
from mailrouter.deliver.maildir import maildir_deliver

RAW = b"From: a@b.test\r\nSubject: hi\r\n\r\nbody\r\n"


def test_first_attempt_does_not_list_the_mailbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first attempt cannot have a predecessor: delivering costs no listdir."""
    box = tmp_path / "box"
    maildir.ensure_maildir(box)
    for n in range(50):
        (box / "cur" / f"{n}.old:2,S").write_bytes(b"x")

    def no_listing(path: object) -> list[str]:
        raise AssertionError(f"listed {path}")

    monkeypatch.setattr(os, "listdir", no_listing)
    out = maildir_deliver(box, RAW, "7xabc", retry=False)
    assert out.parent == box / "new"
    assert out.read_bytes() == RAW.replace(b"\r\n", b"\n")


def test_a_retry_finds_the_copy_a_crashed_attempt_left_even_after_it_was_read(
    tmp_path: Path,
) -> None:
    """Crash after the rename, before "sent": the retry does not deliver again, even when
    the agent's mail client already moved the file to cur/ and flagged it."""
    box = tmp_path / "box"
    first = maildir_deliver(box, RAW, "7xabc", retry=False)
    first.rename(box / "cur" / (first.name + ":2,S"))
    again = maildir_deliver(box, RAW, "7xabc", retry=True)
    assert again == box / "cur" / (first.name + ":2,S")
    assert len(list((box / "new").iterdir())) + len(list((box / "cur").iterdir())) == 1


def test_files_are_private_to_the_service(tmp_path: Path) -> None:
    """Customer mail is 0600 in 0700 directories, whatever the umask."""
    old = os.umask(0o022)
    try:
        out = maildir_deliver(tmp_path / "box", RAW, "8xdef", retry=False)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o600
    for sub in ("tmp", "new", "cur"):
        assert (tmp_path / "box" / sub).stat().st_mode & 0o777 == 0o700


def test_the_sqlite_store_is_private_to_the_service(tmp_path: Path) -> None:
    """mailrouter.db holds every raw message: 0600, whatever the umask."""
    from mailrouter.store.db import open_database

    old = os.umask(0o022)
    try:
        db = open_database(f"sqlite:///{tmp_path / 'state' / 'mailrouter.db'}")
        with db.write() as s:
            s.connection().exec_driver_sql("CREATE TABLE t (x)")
        db.dispose()
    finally:
        os.umask(old)
    assert (tmp_path / "state" / "mailrouter.db").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
