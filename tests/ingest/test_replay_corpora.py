"""``mailrouter replay`` over every third-party corpus, and ``collect()`` on the real layouts.

Replay must survive all of it — malformed MIME, empty files, 3 MB messages, bounces — with
no traceback, and account for every message: stored, held with a reason, or recognised as a
duplicate.  Nothing is dropped.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from mailrouter import cli
from mailrouter.config import load
from mailrouter.ingest.replay import collect, split_mbox
from mailrouter.parse import content_hash, parse
from mailrouter.store.db import open_database
from mailrouter.store.models import Message

pytestmark = pytest.mark.corpora

# What corpora/README.md calls metadata, plus the oracles' own data formats.
METADATA = re.compile(
    r"^(LICENSE|COPYING|NOTICE|README|SOURCE\.md$)|\.(json|tsv|html\.gz)$", re.IGNORECASE
)


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    """Every record cli.main logs; the 'mailrouter' logger is put back as it was after."""
    logger = logging.getLogger("mailrouter")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    rec = Recorder()
    real = cli.setup_logging

    def setup(fmt: str = "kv", level: str = "INFO", stream: object = None) -> None:
        real(fmt, level, io.StringIO())
        logger.addHandler(rec)

    monkeypatch.setattr(cli, "setup_logging", setup)
    yield rec
    logger.handlers[:], logger.level, logger.propagate = saved


def write_config(tmp_path: Path) -> Path:
    config = tmp_path / "mailrouter.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        '[accounts.sales]\naddress = "sales@example.test"\n'
        '[accounts.support]\naddress = "support@example.test"\n',
        encoding="utf-8",
    )
    return config


def corpus_folders(corpora: Path) -> list[Path]:
    return sorted(d for d in corpora.iterdir() if d.is_dir())


# ---------------------------------------------------------------------------- replay


def test_replay_every_corpus_stores_or_holds_every_message(
    corpora: Path,
    tmp_path: Path,
    recorder: Recorder,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """replay --account sales over all corpora: exit 0, no traceback, every message counted."""
    monkeypatch.delenv("MAILROUTER_STATE_DIR", raising=False)
    config = write_config(tmp_path)
    folders = [str(d) for d in corpus_folders(corpora)]
    items = list(collect(folders))

    code = cli.main(
        ["-c", str(config), "replay", "--account", "sales", "--queue-only", "--json", *folders]
    )

    captured = capsys.readouterr()
    assert code == 0
    assert "Traceback" not in captured.err
    crashed = [r for r in recorder.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not crashed, [r.getMessage() for r in crashed]
    # One routing-log line per message: the recorder does see what the pipeline logs.
    assert len([r for r in recorder.records if r.name == "mailrouter.routing"]) == len(items)
    summary = json.loads(captured.out)
    actions = summary["actions"]
    assert summary["messages"] == len(items)
    assert sum(actions.values()) == len(items)
    assert set(actions) <= {"deliver", "route", "hold", "duplicate", "attach"}
    assert (summary["unroutable"], summary["store_errors"]) == (0, 0)

    db = open_database(load(config, env={}).database_url)
    try:
        with db.read() as s:
            rows = s.execute(
                select(
                    Message.status,
                    Message.hold_reason,
                    Message.content_hash,
                    Message.size,
                    Message.rule,
                )
            ).all()
    finally:
        db.dispose()
    assert len(rows) == actions.get("deliver", 0) + actions.get("route", 0) + actions.get("hold", 0)
    held = {(r.content_hash, r.hold_reason) for r in rows if r.status == "held"}
    assert len(held) == actions.get("hold", 0)
    # Held are exactly the messages the parser finds unroutable, each with that reason; none
    # is held because routing crashed on it.
    problems = {
        (m.content_hash, m.problem) for m in map(parse, (i.raw for i in items)) if m.problem
    }
    assert held == problems
    assert not [r for r in rows if r.rule == "internal-error"]
    assert ("held", "empty message") in {(r.status, r.hold_reason) for r in rows if r.size == 0}
    stalwart_019 = (corpora / "stalwart-mail-parser/malformed/019.eml").read_bytes()
    assert (content_hash(stalwart_019), "no header fields (not an RFC 5322 message)") in held


# ---------------------------------------------------------------------------- collect


def test_collect_reads_every_file_but_metadata(corpora: Path) -> None:
    """Every corpus file that is not a licence, SOURCE.md or oracle data yields messages."""
    expected = {f for f in corpora.rglob("*") if f.is_file() and not METADATA.search(f.name)} - {
        corpora / "README.md"
    }
    origins = {Path(i.origin.split("#", 1)[0]) for i in collect(corpus_folders(corpora))}
    assert origins == expected


def test_collect_reads_nested_maildirs_with_loose_files(corpora: Path) -> None:
    """notmuch/default is a Maildir with nested folders (bar/baz/cur …) and loose files: all 53."""
    default = corpora / "notmuch/default"
    items = list(collect([default]))
    assert len(items) == 53
    assert {Path(i.origin) for i in items} == {f for f in default.rglob("*") if f.is_file()}


def test_collect_reads_a_plain_maildir(corpora: Path) -> None:
    """notmuch/lkml (cur/ only) yields one message per file."""
    lkml = corpora / "notmuch/lkml"
    assert len(list(collect([lkml]))) == len(list((lkml / "cur").iterdir())) == 210


def test_collect_skips_maildir_tmp_hidden_and_server_state(tmp_path: Path) -> None:
    """tmp/ (deliveries in progress), dot entries and Dovecot files are not messages."""
    box = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp", ".Sent/cur", "Archive/cur"):
        (box / sub).mkdir(parents=True)
    message = b"Message-ID: <a@b>\n\nbody\n"
    for path in ("cur/1:2,S", "new/2", "tmp/3", ".Sent/cur/4", "Archive/cur/5", "loose"):
        (box / path).write_bytes(message)
    for path in ("dovecot-uidlist", "dovecot.index.log", "maildirfolder", ".hidden"):
        (box / path).write_bytes(b"state\n")
    got = sorted(Path(i.origin).relative_to(box).as_posix() for i in collect([box]))
    assert got == ["Archive/cur/5", "cur/1:2,S", "loose", "new/2"]


def test_gzipped_mbox_is_split_into_its_292_messages(corpora: Path) -> None:
    """fedora-devel 2010-01 (.txt.gz): 292 messages, each with its own Message-ID."""
    path = corpora / "fedora-devel-2010-01/2010-January.txt.gz"
    items = list(collect([path]))
    assert len(items) == 292
    assert [i.origin for i in items[:2]] == [f"{path}#1", f"{path}#2"]
    assert len({parse(i.raw).message_id for i in items}) == 292
    assert all(not parse(i.raw).synthetic_id for i in items)


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("testbox", 10),
        ("testbox-2", 3),
        ("testbox-3", 3),
        ("testbox-4", 7),
        ("testbox-5", 4),
        ("testbox-6", 6),
        ("testbox-7", 1),
        ("testbox-8", 3),
        ("testbox-9", 6),
    ],
)
def test_mbox_split_matches_the_documented_counts(corpora: Path, name: str, count: int) -> None:
    """Mail::Thread testboxes split into the counts SOURCE.md gives (testbox-6 has no blank
    lines before its From_ lines)."""
    msgs = list(split_mbox((corpora / "perl-mail-thread" / name).read_bytes()))
    assert len(msgs) == count
    assert len({parse(m).message_id for m in msgs}) == count


def test_pipermail_mbox_with_at_obfuscated_from_lines(corpora: Path) -> None:
    """HyperKitty's pipermail archive (``From user at host  date``) holds 6 posts."""
    assert len(list(collect([corpora / "hyperkitty/non-ascii-headers.txt"]))) == 6


def test_mbox_message_equals_the_message_file(tmp_path: Path) -> None:
    """The empty line before a From_ line is the mbox's, not the message's: same hash as .eml."""
    one = b"Message-ID: <1@x>\nSubject: a\n\nfirst body\n"
    two = b"Message-ID: <2@x>\nSubject: b\n\nsecond body\nFrom here on, a body line.\n"
    mbox = b"From a@x Mon Jan  1 00:00:00 2024\n" + one + b"\n"
    mbox += b"From b@x Mon Jan  1 00:00:01 2024\n" + two + b"\n"
    assert list(split_mbox(mbox)) == [one, two]
    (tmp_path / "box.mbox").write_bytes(mbox)
    assert [content_hash(i.raw) for i in collect([tmp_path])] == [
        content_hash(one),
        content_hash(two),
    ]


def test_empty_message_inside_an_mbox_is_kept(tmp_path: Path) -> None:
    """Two From_ lines in a row: the empty message between them is yielded (to be held)."""
    mbox = b"From a@x Mon Jan  1 00:00:00 2024\nFrom b@x Mon Jan  1 00:00:01 2024\nX: y\n\nz\n"
    assert list(split_mbox(mbox)) == [b"", b"X: y\n\nz\n"]


def test_gzip_is_read_by_content_not_only_by_mbox(tmp_path: Path) -> None:
    """A gzipped single message (not an mbox) is one message."""
    path = tmp_path / "one.eml.gz"
    path.write_bytes(gzip.compress(b"Message-ID: <g@x>\n\nbody\n"))
    assert [parse(i.raw).message_id for i in collect([path])] == ["g@x"]


def test_replay_does_not_follow_a_symlink_out_of_the_folder(tmp_path: Path) -> None:
    """A link in a replayed folder is skipped (and logged), not read."""
    from mailrouter.ingest.replay import collect

    outside = tmp_path / "secret.eml"
    outside.write_bytes(b"From: x@y.test\nTo: sales@example.test\nSubject: s\n\nsecret\n")
    folder = tmp_path / "replay"
    folder.mkdir()
    (folder / "ok.eml").write_bytes(b"From: a@b.test\nTo: sales@example.test\nSubject: ok\n\nhi\n")
    (folder / "link.eml").symlink_to(outside)
    assert [Path(r.origin).name for r in collect([folder])] == ["ok.eml"]
