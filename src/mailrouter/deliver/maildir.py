"""Maildir delivery (the embedded default), many messages per batch, and the outbound
pickup directory.

Written by hand rather than with ``mailbox.Maildir`` for two reasons: a batch shares its
directory fsyncs, and a delivery retried after a crash between "file delivered" and "row
marked sent" must find its copy without listing a mailbox that may hold 100,000 files.

The protocol is qmail's original one, with link instead of rename:

1. write ``tmp/mr<key>`` (a name fixed by the outbox key) and fsync it, for every message
   of the batch (a few threads at once: their fsyncs share journal commits);
2. fsync ``tmp/`` once, then hard-link each file into ``new/`` under a unique Maildir name
   that still carries the key (``<time>.M<usec>P<pid>Q<n>.mr<key>.<host>``);
3. fsync ``new/`` once per mailbox per batch — after this the batch is durable;
4. the caller commits the outcomes, then calls :func:`maildir_settle`, which unlinks the
   ``tmp/`` names of the jobs it recorded as done.

While a job is not recorded, its ``tmp/mr<key>`` is the evidence: a retry needs one
``stat`` of it.  Absent: nothing was delivered (a fresh write).  Present with two or more
links: the copy in ``new/`` (or in ``cur/``, where a mail client moved it — a rename keeps
the inode) exists, so nothing is written again.  Present with one link: the link was never
made, or did not survive a power loss, so it is written again.

The one crash window: the daemon dies after step 3 and before the commit, *and* before
the retry (seconds later) the mailbox's reader expunges that new copy.  The file then has
one link again, and the retry delivers it a second time.  A ``tmp/`` file left by a crash
after the commit is harmless (its row is done and never retried); Maildir readers such as
Dovecot remove ``tmp/`` files older than 36 hours.  On a filesystem without hard links the
file is renamed instead, and a crash before the commit means a second copy.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from mailrouter.parse import lf_slices

__all__ = [
    "Drop",
    "Stored",
    "ensure_maildir",
    "maildir_deliver",
    "maildir_deliver_batch",
    "maildir_settle",
    "pickup_write",
]

_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"
# Files written at once within a batch: fsyncs issued together share the journal's
# commits (measured here: 1,250 files/s in one thread, 1,800/s in four).
WRITERS = 4


@dataclass(frozen=True)
class Drop:
    """One message for the Maildir at ``path``, delivered at most once per ``key``."""

    path: Path
    raw: bytes
    key: str
    head: bytes = b""  # fields written in front of ``raw`` (our trace fields)

    @property
    def evidence(self) -> Path:
        """The key's fixed name in ``tmp/``: what a retry stats."""
        return self.path / "tmp" / f"mr{self.key}"


@dataclass(frozen=True)
class Stored:
    """A drop that is in the mailbox: ``file`` in ``new/``, or ``earlier`` (an attempt
    that crashed before its bookkeeping delivered it; ``file`` is then its tmp name)."""

    file: Path
    earlier: bool = False


def ensure_maildir(path: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True, mode=0o700)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: Iterable[bytes]) -> None:
    # 0600 whatever the umask: these files are customer mail.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as f:
        for piece in data:
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())


class _Names:
    """Unique Maildir names that sort in the order they are handed out (a batch is named
    in job order before its files are written in parallel)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0
        self._count = 0

    def next(self, key: str) -> str:
        with self._lock:
            # Microseconds since the epoch, strictly increasing within this process.
            now = max(int(time.time() * 1e6), self._last + 1)
            self._last = now
            self._count += 1
            count = self._count
        secs, usec = divmod(now, 1_000_000)
        # Zero-padded microseconds: names then sort in delivery order within a second.
        return f"{secs}.M{usec:06d}P{os.getpid()}Q{count}.mr{key}.{_HOST}"


_names = _Names()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _writers() -> ThreadPoolExecutor:
    """The process's file writers, started once (a pool per batch cost a thread start per
    file: 4% of the daemon's CPU under load)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(WRITERS, "mailrouter-maildir")
        return _pool


def _prepare(drop: Drop) -> Stored | None:
    """Write the drop's tmp file unless an earlier attempt's copy is linked (a Stored)."""
    evidence = drop.evidence
    try:
        links = evidence.stat().st_nlink
    except FileNotFoundError:
        links = 0
    if links >= 2:
        return Stored(evidence, earlier=True)  # delivered before a crash: do not duplicate
    if links == 1:
        evidence.unlink()  # written, maybe partly, never linked: start over
    # Maildir files use the local line ending; converted in slices, never a whole copy.
    _write_synced(evidence, chain(lf_slices(drop.head), lf_slices(drop.raw)))
    return None


# A filesystem without hard links answers one of these to link().
_NO_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK})


def _link(evidence: Path, final: Path) -> None:
    try:
        os.link(evidence, final)
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        # No hard links here (some network and FUSE filesystems): rename, as Maildir
        # writers commonly do.  The retry's stat then finds nothing, so a crash between
        # this and the "sent" commit delivers the message again.
        os.rename(evidence, final)


def maildir_deliver_batch(drops: Sequence[Drop]) -> list[Stored | OSError]:
    """Deliver every drop (see the module's protocol); one outcome per drop, in order.

    A failure is the drop's own (a full disk while writing it), or its mailbox's (a
    directory that cannot be created or synced: every drop into it fails).  Nothing is
    ever left half-delivered: a drop either has its ``new/`` link or it has none.
    """
    outcomes: list[Stored | OSError | None] = [None] * len(drops)
    boxes: dict[Path, list[int]] = {}
    for i, drop in enumerate(drops):
        boxes.setdefault(drop.path, []).append(i)
    for path, indexes in list(boxes.items()):
        try:
            ensure_maildir(path)
        except OSError as exc:
            for i in indexes:
                outcomes[i] = exc
            del boxes[path]

    def prepare(i: int) -> None:
        try:
            outcomes[i] = _prepare(drops[i])
        except OSError as exc:
            outcomes[i] = exc

    todo = [i for indexes in boxes.values() for i in indexes]
    if len(todo) > 1:
        list(_writers().map(prepare, todo))
    else:
        for i in todo:
            prepare(i)

    for path, indexes in boxes.items():
        fresh = [i for i in indexes if outcomes[i] is None]
        try:
            if fresh:
                # The tmp names are the evidence a retry relies on: durable before any
                # link, so a link never survives a power loss without its evidence.
                _fsync_dir(path / "tmp")
            for i in fresh:
                final = path / "new" / _names.next(drops[i].key)
                try:
                    _link(drops[i].evidence, final)
                except OSError as exc:
                    outcomes[i] = exc
                else:
                    outcomes[i] = Stored(final)
            if fresh:
                _fsync_dir(path / "new")  # once per mailbox per batch, not once per file
        except OSError as exc:
            # Not known to be durable: reported as failed, and a retry's stat decides.
            for i in fresh:
                outcomes[i] = exc
    done: list[Stored | OSError] = []
    for outcome in outcomes:
        assert outcome is not None
        done.append(outcome)
    return done


def maildir_settle(drops: Sequence[Drop]) -> None:
    """The drops' outcomes are committed: their tmp evidence is no longer needed.

    No fsync: a tmp name that comes back after a power loss only means its row, which is
    done, would have been found delivered.
    """
    for drop in drops:
        drop.evidence.unlink(missing_ok=True)


def maildir_deliver(path: Path, raw: bytes, key: str) -> Stored:
    """Deliver one message (a batch of one); raises the OSError it failed with.

    The caller calls :func:`maildir_settle` once it has recorded the delivery.
    """
    [outcome] = maildir_deliver_batch([Drop(path, raw, key)])
    if isinstance(outcome, OSError):
        raise outcome
    return outcome


def _write_atomic(tmp: Path, final: Path, data: bytes) -> None:
    _write_synced(tmp, (data,))
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def pickup_write(path: Path, raw: bytes, key: str) -> Path:
    """Write an outbound message as ``<key>.eml`` (idempotent by name)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = path / f"{key}.eml"
    if final.exists():
        return final
    tmp = path / f".{key}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    _write_atomic(tmp, final, raw)
    return final
