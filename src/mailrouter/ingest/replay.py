"""Recorded mail as an ingest source: ``.eml`` files, directories, Maildirs and mbox files.

``mailrouter replay`` feeds them, in Date order, through the very pipeline the daemon
uses, so a recorded scenario reproduces what the daemon would have decided.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from pathlib import Path

from mailrouter.config import AccountSettings, Settings
from mailrouter.log import event
from mailrouter.parse import decode_text

__all__ = ["Recorded", "accounts_for", "collect", "date_order", "split_mbox"]

log = logging.getLogger("mailrouter.replay")

# Files that sit beside messages in corpora and archives but are not mail.
_NOT_MAIL = re.compile(
    r"^(LICENSE|COPYING|NOTICE|README|SOURCE|CHANGELOG)|\.(md|json|tsv|html|html\.gz|py|sh|txt\.expected)$",
    re.IGNORECASE,
)
# State that mail servers keep inside Maildirs (Dovecot, Courier): never messages.
_SERVER_STATE = re.compile(
    r"^(dovecot[-.]|courierimap|maildirfolder$|subscriptions$)", re.IGNORECASE
)
# An mbox From_ line: "From " sender asctime-date (RFC 4155), e.g.
# "From user@domain  Fri Feb 22 17:06:23 2008" or "From - Sat Mar 15 00:00:00 2003".
_FROM_LINE = re.compile(
    rb"^From \S.*\s(Mon|Tue|Wed|Thu|Fri|Sat|Sun)\s+"
    rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)\s+"
    rb"\d{1,2}\s+\d{1,2}:\d{2}(:\d{2})?\s.*\d{4}\s*$"
)
_ENVELOPE_HEADERS = ("To", "Cc", "Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To")


@dataclass(frozen=True)
class Recorded:
    origin: str  # file path, or "path#N" for the Nth message of an mbox
    raw: bytes


def split_mbox(data: bytes) -> Iterator[bytes]:
    """Messages of an mbox, without their ``From `` separator lines.

    A ``From `` line after an empty line begins a message; so does a complete From_ line
    (sender and asctime date) right after text, since real archives omit the empty line
    (Mail::Thread's ``testbox-6``).  The empty line before a separator, and at the end of
    the file, belongs to the mbox format (RFC 4155), not to the message: keeping it would
    make the same message hash differently in an mbox and in a Maildir.
    """
    current: list[bytes] | None = None  # None: before the first separator
    prev_blank = True
    for line in data.splitlines(keepends=True):
        if line.startswith(b"From ") and (prev_blank or _FROM_LINE.match(line)):
            if current is not None:
                yield _mbox_message(current, prev_blank)
            current = []
            prev_blank = False
            continue  # the separator line is not part of the message
        if current is None:
            current = []
        current.append(line)
        prev_blank = line.strip() == b""
    if current is not None and b"".join(current).strip():
        yield _mbox_message(current, prev_blank)


def _mbox_message(lines: list[bytes], ends_blank: bool) -> bytes:
    return b"".join(lines[:-1] if ends_blank and lines else lines)


def _read(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data


def _from_file(path: Path) -> Iterator[Recorded]:
    data = _read(path)
    if data.startswith(b"From "):
        for n, raw in enumerate(split_mbox(data), start=1):
            yield Recorded(f"{path}#{n}", raw)
    else:
        yield Recorded(str(path), data)


def _is_maildir(path: Path) -> bool:
    return (path / "cur").is_dir() or (path / "new").is_dir()


def _files(root: Path) -> list[Path]:
    """Files under ``root``, sorted: hidden entries and Maildir ``tmp/`` folders left out.

    Maildirs nest (notmuch, Dovecot's ``LAYOUT=fs``: ``foo/cur``, ``foo/bar/new`` …) and
    notmuch keeps loose messages beside ``cur``/``new``, so every subfolder is read; only
    ``tmp/`` holds deliveries still being written.
    """
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        skip_tmp = _is_maildir(here)
        dirnames[:] = [
            d for d in dirnames if not d.startswith(".") and not (skip_tmp and d == "tmp")
        ]
        for f in filenames:
            path = here / f
            if f.startswith("."):
                continue
            if path.is_symlink():
                # A link in a replayed folder may point anywhere (another user's mail, the
                # store itself): what is not in the folder is not replayed.
                event(log, "replay-symlink-skipped", logging.WARNING, path=str(path))
                continue
            if path.is_file():
                out.append(path)
    return sorted(out)


def collect(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Recorded]:
    """Every message under ``paths`` (files, directories recursively, Maildirs, mbox files)."""
    for p in map(Path, paths):
        if p.is_dir():
            for f in _files(p):
                if not (_NOT_MAIL.search(f.name) or _SERVER_STATE.search(f.name)):
                    yield from _from_file(f)
        elif p.exists():
            yield from _from_file(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")


def date_order(items: list[Recorded]) -> list[Recorded]:
    """Sort by Date header; an undated message keeps its place after its predecessor."""
    keyed: list[tuple[datetime, int, Recorded]] = []
    last = datetime.min.replace(tzinfo=UTC)
    parser = BytesHeaderParser(policy=compat32)
    for n, item in enumerate(items):
        try:
            from email.utils import parsedate_to_datetime

            value = parser.parsebytes(item.raw).get("Date")
            when = parsedate_to_datetime(decode_text(value)) if value else None
            if when is not None:
                when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
        except (TypeError, ValueError, IndexError, OverflowError):
            when = None
        if when is not None:
            last = when
        keyed.append((when or last, n, item))
    keyed.sort(key=lambda t: (t[0], t[1]))
    return [item for _, _, item in keyed]


def accounts_for(raw: bytes, settings: Settings) -> list[AccountSettings]:
    """Configured accounts among the message's recipient and delivery headers."""
    # Only the header fields are needed; a full parse() (hash, ids, auto-reply checks) costs
    # three times as much, and replay parses every message again in accept().
    msg = BytesHeaderParser(policy=compat32).parsebytes(raw)
    values = [decode_text(v) for h in _ENVELOPE_HEADERS for v in msg.get_all(h) or []]
    out: list[AccountSettings] = []
    for _name, addr in getaddresses(values):
        acc = settings.account_for_address(addr)
        if acc is not None and acc not in out:
            out.append(acc)
    return out
