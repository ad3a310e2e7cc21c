"""Recorded mail as an ingest source: ``.eml`` files, directories, Maildirs and mbox files.

``mailrouter replay`` feeds them, in Date order, through the very pipeline the daemon
uses, so a recorded scenario reproduces what the daemon would have decided.
"""

from __future__ import annotations

import gzip
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
from mailrouter.parse import decode_text, parse

__all__ = ["Recorded", "accounts_for", "collect", "date_order", "split_mbox"]

# Files that sit beside messages in corpora and archives but are not mail.
_NOT_MAIL = re.compile(
    r"^(LICENSE|COPYING|NOTICE|README|SOURCE|CHANGELOG)|\.(md|json|tsv|html|html\.gz|py|sh|txt\.expected)$",
    re.IGNORECASE,
)
_ENVELOPE_HEADERS = ("To", "Cc", "Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To")


@dataclass(frozen=True)
class Recorded:
    origin: str  # file path, or "path#N" for the Nth message of an mbox
    raw: bytes


def split_mbox(data: bytes) -> Iterator[bytes]:
    """Messages of an mbox: a ``From `` line at the start or after an empty line begins one."""
    current: list[bytes] = []
    prev_blank = True
    for line in data.splitlines(keepends=True):
        if line.startswith(b"From ") and prev_blank:
            if current:
                yield b"".join(current)
            current = []
            prev_blank = False
            continue  # the separator line is not part of the message
        current.append(line)
        prev_blank = line.strip() == b""
    if current and b"".join(current).strip():
        yield b"".join(current)


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


def collect(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Recorded]:
    """Every message under ``paths`` (files, directories recursively, Maildirs, mbox files)."""
    for p in map(Path, paths):
        if p.is_dir():
            if _is_maildir(p):
                files = sorted(
                    f
                    for sub in ("new", "cur")
                    if (p / sub).is_dir()
                    for f in (p / sub).iterdir()
                    if f.is_file()
                )
            else:
                files = sorted(
                    f
                    for f in p.rglob("*")
                    if f.is_file()
                    and not any(part.startswith(".") for part in f.relative_to(p).parts)
                )
            for f in files:
                if not _NOT_MAIL.search(f.name):
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
    msg = parse(raw).headers
    values = [decode_text(v) for h in _ENVELOPE_HEADERS for v in msg.get_all(h) or []]
    out: list[AccountSettings] = []
    for _name, addr in getaddresses(values):
        acc = settings.account_for_address(addr)
        if acc is not None and acc not in out:
            out.append(acc)
    return out
