"""Maildir delivery: crash-safe and idempotent per outbox key, batched, and never a
directory scan (the scale finding: its cost grew with the mailbox)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from mailrouter.deliver import maildir
from mailrouter.deliver.maildir import (
    Drop,
    maildir_deliver,
    maildir_deliver_batch,
    maildir_settle,
)

RAW = b"From: a@b.test\r\nSubject: hi\r\n\r\nbody\r\n"


def files(box: Path) -> list[Path]:
    return sorted(f for sub in ("new", "cur") for f in (box / sub).iterdir())


@pytest.fixture
def no_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any directory listing fails the test: delivery must cost the same at any size."""

    def refuse(path: object = ".") -> object:
        raise AssertionError(f"listed {path}")

    monkeypatch.setattr(os, "listdir", refuse)
    monkeypatch.setattr(os, "scandir", refuse)


def test_a_retry_finds_the_copy_a_crashed_attempt_left_even_after_it_was_read(
    tmp_path: Path,
) -> None:
    """Crash after the link, before "sent": the retry does not deliver again, even when
    the agent's mail client already moved the file to cur/ and flagged it."""
    box = tmp_path / "box"
    first = maildir_deliver(box, RAW, "7xabc")
    assert not first.earlier and first.file.parent == box / "new"
    first.file.rename(box / "cur" / (first.file.name + ":2,S"))
    again = maildir_deliver(box, RAW, "7xabc")
    assert again.earlier
    assert files(box) == [box / "cur" / (first.file.name + ":2,S")]


def test_neither_a_delivery_nor_its_retry_lists_the_mailbox(
    tmp_path: Path, no_listing: None
) -> None:
    """The retry's check is one stat of the key's tmp/ name, however full the box is."""
    box = tmp_path / "box"
    maildir.ensure_maildir(box)
    for n in range(50):
        (box / "cur" / f"{n}.old:2,S").write_bytes(b"x")
    first = maildir_deliver(box, RAW, "7xabc")
    assert first.file.read_bytes() == RAW.replace(b"\r\n", b"\n")
    assert maildir_deliver(box, RAW, "7xabc").earlier


def test_a_settled_delivery_leaves_nothing_in_tmp(tmp_path: Path) -> None:
    """Once the outcome is recorded the evidence goes; the delivered copy stays."""
    box = tmp_path / "box"
    drop = Drop(box, RAW, "9x123")
    [stored] = maildir_deliver_batch([drop])
    assert not isinstance(stored, OSError)
    assert drop.evidence.stat().st_nlink == 2
    maildir_settle([drop])
    assert list((box / "tmp").iterdir()) == []
    assert files(box) == [stored.file]


def test_a_tmp_file_that_was_never_linked_is_written_again(tmp_path: Path) -> None:
    """A crash mid-write leaves a partial tmp/ file with one link: the retry starts over."""
    box = tmp_path / "box"
    maildir.ensure_maildir(box)
    drop = Drop(box, RAW, "5xfff")
    drop.evidence.write_bytes(b"From: a@b.te")  # cut short
    stored = maildir_deliver(box, RAW, "5xfff")
    assert not stored.earlier
    assert [f.read_bytes() for f in files(box)] == [RAW.replace(b"\r\n", b"\n")]


def test_a_copy_the_reader_deleted_before_the_retry_is_delivered_again(tmp_path: Path) -> None:
    """The documented window: crash before "sent", the copy expunged, then the retry."""
    box = tmp_path / "box"
    first = maildir_deliver(box, RAW, "3xaaa")
    first.file.unlink()
    again = maildir_deliver(box, RAW, "3xaaa")
    assert not again.earlier and files(box) == [again.file]


def test_a_batch_fsyncs_each_mailbox_directory_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 messages into two mailboxes: 40 file fsyncs, two directory fsyncs per mailbox
    (tmp/ before the links, new/ after them), not one per file."""
    synced: list[Path] = []
    real = maildir._fsync_dir
    monkeypatch.setattr(maildir, "_fsync_dir", lambda p: (synced.append(p), real(p))[1])
    drops = [Drop(tmp_path / ("a" if n % 2 else "b"), RAW, f"{n}xk") for n in range(40)]
    outcomes = maildir_deliver_batch(drops)
    assert not [o for o in outcomes if isinstance(o, OSError)]
    assert sorted(synced) == sorted(tmp_path / box / sub for box in "ab" for sub in ("new", "tmp"))
    assert len(files(tmp_path / "a")) == len(files(tmp_path / "b")) == 20


def test_a_batch_is_named_in_job_order(tmp_path: Path) -> None:
    """Files are written in parallel, but their names sort as the jobs were given."""
    drops = [Drop(tmp_path / "box", RAW + str(n).encode(), f"{n}xk") for n in range(30)]
    outcomes = maildir_deliver_batch(drops)
    names = [o.file.name for o in outcomes if not isinstance(o, OSError)]
    assert names == sorted(names) and len(names) == 30
    assert [f.read_bytes()[-2:] for f in files(tmp_path / "box")[:3]] == [b"\n0", b"\n1", b"\n2"]


def test_a_broken_mailbox_fails_only_its_own_drops(tmp_path: Path) -> None:
    """One mailbox that cannot be created: its drops fail, the other box's are delivered."""
    (tmp_path / "broken").write_bytes(b"a file where a Maildir should be")
    outcomes = maildir_deliver_batch(
        [Drop(tmp_path / "broken", RAW, "1xa"), Drop(tmp_path / "ok", RAW, "2xb")]
    )
    assert isinstance(outcomes[0], OSError)
    assert not isinstance(outcomes[1], OSError) and outcomes[1].file.is_file()


def test_files_are_private_to_the_service(tmp_path: Path) -> None:
    """Customer mail is 0600 in 0700 directories, whatever the umask."""
    old = os.umask(0o022)
    try:
        out = maildir_deliver(tmp_path / "box", RAW, "8xdef")
    finally:
        os.umask(old)
    assert out.file.stat().st_mode & 0o777 == 0o600
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


def test_without_hard_links_the_file_is_renamed_into_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem that refuses link() still gets its mail, by rename."""

    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    stored = maildir_deliver(tmp_path / "box", RAW, "4xbbb")
    assert files(tmp_path / "box") == [stored.file]
    assert list((tmp_path / "box" / "tmp").iterdir()) == []
