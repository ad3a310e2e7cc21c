"""A legal message naming 40,000 ancestors: accepted, stored with bounded refs, threaded.

The probe that found the quadratic References was 1.6 MB of ids; its 250 took 94–145 s on
the writer thread.  These tests check the outcome (bounded rows and look-ups, the right
thread), never a duration: ``bench/references_bench.py`` prints the timings.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import select

from mailrouter.config import Settings, load, load_from_text
from mailrouter.daemon import Daemon
from mailrouter.parse import MAX_REFERENCES, parse
from mailrouter.pipeline import Accepted, Pipeline
from mailrouter.runtime import Runtime
from mailrouter.store.models import MESSAGE_REFS, MESSAGES
from mailrouter.threads import resolve

SALES = "sales@example.test"
HOSTILE = 40_000
ROOT_ID = "root@customer.example"
PARENT_ID = "nearest@customer.example"


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    config = tmp_path / "mailrouter.toml"
    config.write_text(
        f'state_dir = "{tmp_path}"\n[accounts.sales]\naddress = "{SALES}"\n', encoding="utf-8"
    )
    p = Pipeline(Runtime.open(load(config, env={})))
    yield p
    p.rt.close()


def ancestors(n: int = HOSTILE) -> list[str]:
    """``ROOT_ID``, ``n - 2`` ids of messages never seen, then ``PARENT_ID``."""
    return [ROOT_ID, *(f"unseen-{k:06d}.probe@hostile.example" for k in range(n - 2)), PARENT_ID]


def mail(mid: str, fields: Sequence[str] = (), body: str = "Where is my order?") -> bytes:
    lines = [
        "From: Customer <customer@example.net>",
        f"To: {SALES}",
        "Subject: Order 7",
        "Date: Tue, 12 Mar 2024 10:00:00 +0000",
        f"Message-ID: <{mid}>",
        *fields,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


def folded(name: str, ids: Sequence[str]) -> str:
    return f"{name}: " + "\r\n ".join(f"<{i}>" for i in ids)


def accept(p: Pipeline, raw: bytes) -> Accepted:
    return p.accept(raw, p.settings.accounts, source="test")


def stored_refs(p: Pipeline, message_pk: int | None) -> list[str]:
    """The ``message_refs`` rows of one message, nearest first."""
    with p.db.read() as s:
        rows = s.scalars(
            select(MESSAGE_REFS.c.ref_id)
            .where(MESSAGE_REFS.c.message_pk == message_pk)
            .order_by(MESSAGE_REFS.c.position)
        )
        return list(rows)


def test_forty_thousand_references_thread_to_the_nearest_stored_parent(
    pipeline: Pipeline,
) -> None:
    """Root and nearest parent stored in two interactions: the nearest parent's wins."""
    root = accept(pipeline, mail(ROOT_ID))
    parent = accept(pipeline, mail(PARENT_ID, body="Another order"))
    assert root.interaction_id != parent.interaction_id
    probe = accept(pipeline, mail("probe@hostile.example", [folded("References", ancestors())]))
    assert probe.decision.rule == "references"
    assert probe.decision.matched_id == PARENT_ID
    assert probe.interaction_id == parent.interaction_id


def test_forty_thousand_references_keep_the_root(pipeline: Pipeline) -> None:
    """Only the first id (the root) is stored: 39,999 ids later, it still finds the thread."""
    root = accept(pipeline, mail(ROOT_ID))
    probe = accept(pipeline, mail("probe@hostile.example", [folded("References", ancestors())]))
    assert probe.decision.rule == "references"
    assert probe.decision.matched_id == ROOT_ID
    assert probe.interaction_id == root.interaction_id


def test_forty_thousand_references_store_a_bounded_number_of_refs(pipeline: Pipeline) -> None:
    """message_refs gets the root and the nearest ancestors, not one row per id named."""
    ids = ancestors()
    sent = mail("probe@hostile.example", [folded("References", ids)])
    probe = accept(pipeline, sent)
    refs = stored_refs(pipeline, probe.message_pk)
    assert len(refs) == MAX_REFERENCES
    assert refs[0] == PARENT_ID
    assert refs[-1] == ROOT_ID
    with pipeline.db.read() as s:
        text, raw = s.execute(
            select(MESSAGES.c.references, MESSAGES.c.raw).where(MESSAGES.c.id == probe.message_pk)
        ).one()
    # The References column is trimmed the same way; the message itself is kept whole.
    assert text.split() == [f"<{i}>" for i in [ids[0], *ids[-(MAX_REFERENCES - 1) :]]]
    assert raw == sent


def test_forty_thousand_in_reply_to_ids_thread_to_the_first(pipeline: Pipeline) -> None:
    """An In-Reply-To of 40,000 ids counts its first; one ref row is stored."""
    parent = accept(pipeline, mail(ROOT_ID))
    probe = accept(pipeline, mail("probe@hostile.example", [folded("In-Reply-To", ancestors())]))
    assert probe.decision.rule == "in-reply-to"
    assert probe.interaction_id == parent.interaction_id
    assert stored_refs(pipeline, probe.message_pk) == [ROOT_ID]


def test_forty_thousand_references_fields_are_bounded_too(pipeline: Pipeline) -> None:
    """One ``References:`` field per id: the same trimmed refs, the same thread."""
    parent = accept(pipeline, mail(PARENT_ID))
    fields = [f"References: <{i}>" for i in ancestors()]
    probe = accept(pipeline, mail("probe@hostile.example", fields))
    assert probe.decision.matched_id == PARENT_ID
    assert probe.interaction_id == parent.interaction_id
    assert len(stored_refs(pipeline, probe.message_pk)) == MAX_REFERENCES


class RecordingIndex:
    """A ThreadIndex that knows nothing and records how many ids each look-up names."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def interactions_of(self, ids: Sequence[str]) -> dict[str, int]:
        self.sizes.append(len(ids))
        return {}

    def interactions_referencing(self, ids: Sequence[str]) -> dict[str, int]:
        self.sizes.append(len(ids))
        return {}


@pytest.mark.parametrize("n", [1_000, HOSTILE])
def test_resolution_looks_up_the_same_bounded_ids_however_many_are_named(n: int) -> None:
    """Each store look-up names the message, its In-Reply-To and at most MAX_REFERENCES."""
    msg = parse(
        mail(
            "probe@hostile.example",
            [f"In-Reply-To: <{PARENT_ID}>", folded("References", ancestors(n))],
        )
    )
    index = RecordingIndex()
    assert resolve(msg, index).rule == "new-interaction"
    # Both look-ups ran, and neither grew with n: own id + In-Reply-To + trimmed References
    # (the In-Reply-To id is also the last References id, so it counts once).
    assert index.sizes == [1 + MAX_REFERENCES, 1 + MAX_REFERENCES]


# ---------------------------------------------------------------------------- over SMTP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def daemon_settings(tmp_path: Path) -> Settings:
    text = f"""
state_dir = "{tmp_path / "state"}"
[smtp]
port = {_free_port()}
[accounts.sales]
address = "{SALES}"
"""
    path = tmp_path / "mailrouter.toml"
    path.write_text(text)
    return load_from_text(text, path)


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    d = Daemon(daemon_settings(tmp_path))
    await d.startup()
    try:
        yield d
    finally:
        d.stop.set()
        await d.shutdown()


def _send(port: int, data: bytes) -> dict[str, tuple[int, bytes]]:
    # The timeout only keeps a regression from hanging the suite; nothing is timed.
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as c:
        return c.sendmail("customer@example.net", [SALES], data)


def _ref_rows(settings: Settings) -> list[tuple[str, int]]:
    db = settings.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT m.message_id, count(r.ref_id) FROM messages m"
            " LEFT JOIN message_refs r ON r.message_pk = m.id GROUP BY m.id ORDER BY m.id"
        ).fetchall()
    conn.close()
    return [(str(mid), int(n)) for mid, n in rows]


async def test_smtp_accepts_forty_thousand_references_and_the_next_mail(daemon: Daemon) -> None:
    """Both get 250 from the daemon, each committed with bounded refs before its answer."""
    port = daemon.settings.smtp.port
    probe = mail("probe@hostile.example", [folded("References", ancestors())])
    assert len(probe) > 1_500_000
    assert await asyncio.to_thread(_send, port, probe) == {}
    assert await asyncio.to_thread(_send, port, mail("next@customer.example")) == {}
    assert _ref_rows(daemon.settings) == [
        ("probe@hostile.example", MAX_REFERENCES),
        ("next@customer.example", 0),
    ]
