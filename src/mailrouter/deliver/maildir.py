"""Maildir delivery (the embedded default) and the outbound pickup directory.

Written by hand rather than with ``mailbox.Maildir`` for one reason: the file name carries
the outbox key, so a delivery retried after a crash between "file written" and "row marked
sent" finds its file and does not deliver twice.  Write to ``tmp/``, fsync, rename into
``new/``, fsync the directory: the Maildir protocol's crash safety.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from mailrouter.parse import lf_slices

__all__ = ["ensure_maildir", "maildir_deliver", "pickup_write"]

_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"


def ensure_maildir(path: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True, mode=0o700)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(tmp: Path, final: Path, data: Iterable[bytes]) -> None:
    # 0600 whatever the umask: these files are customer mail.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as f:
        for piece in data:
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def maildir_deliver(path: Path, raw: bytes, key: str, *, retry: bool = True) -> Path:
    """Deliver ``raw`` into the Maildir at ``path`` once per ``key``; returns the file.

    ``retry`` says an earlier attempt of this key may have delivered already (it crashed
    between the rename and the "sent" commit): only then are ``new/`` and ``cur/``
    searched for the key — a search whose cost grows with the mailbox, so a first
    attempt, which cannot have a predecessor, never pays it.
    """
    ensure_maildir(path)
    marker = f".mr{key}."
    if retry:
        for sub in ("new", "cur"):
            for name in os.listdir(path / sub):
                if marker in name:
                    return path / sub / name  # delivered before a crash: do not duplicate
    now = time.time()
    # Zero-padded microseconds: names then sort in delivery order within a second.
    name = f"{int(now)}.M{int(now * 1e6) % 1_000_000:06d}P{os.getpid()}{marker}{_HOST}"
    final = path / "new" / name
    # Maildir files use the local line ending.  Converted a slice at a time: a replace() of
    # the whole message was one more copy of it at the delivery's peak.
    _write_atomic(path / "tmp" / name, final, lf_slices(raw))
    return final


def pickup_write(path: Path, raw: bytes, key: str) -> Path:
    """Write an outbound message as ``<key>.eml`` (idempotent by name)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = path / f"{key}.eml"
    if final.exists():
        return final
    tmp = path / f".{key}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    _write_atomic(tmp, final, (raw,))
    return final
