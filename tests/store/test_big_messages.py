"""Big messages through the store and into a Maildir: stored byte for byte (through an
incremental blob on SQLite, a plain bind on PostgreSQL), recognised again as duplicates,
and delivered with LF line endings converted a slice at a time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, select, text

from helpers import accept, flush, maildir_messages, make_settings, pipeline
from mailrouter.config import Settings
from mailrouter.deliver.maildir import maildir_deliver
from mailrouter.parse import lf_slices
from mailrouter.pipeline import Pipeline
from mailrouter.store.blobs import BLOB_THRESHOLD
from mailrouter.store.models import Message

MIB = 1024 * 1024


def big_message(size: int, msgid: str = "big-1") -> bytes:
    head = (
        "From: Carol Customer <carol@customer.test>\r\nTo: sales@example.test\r\n"
        f"Subject: Scans\r\nMessage-ID: <{msgid}@customer.test>\r\n\r\n"
    ).encode()
    # Distinct lines, so a misplaced slice would show; CR-only and CRCRLF lines too.
    lines = [b"line %07d of the scan data, CRLF\r\n" % n for n in range(size // 36)]
    lines[100:110] = [b"odd\rline\r\r\n"] * 10
    return head + b"".join(lines)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    """The test's settings on SQLite, then on the session's PostgreSQL database."""
    settings = make_settings(tmp_path)
    if request.param == "sqlite":
        yield settings
        return
    url = request.getfixturevalue("postgres_url")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    yield settings.with_(database_url=url)


def test_a_big_message_is_stored_and_delivered_byte_for_byte(store_settings: Settings) -> None:
    """A 3 MiB message: the stored raw is the message, the Maildir copy its LF form."""
    raw = big_message(3 * MIB)
    assert len(raw) > BLOB_THRESHOLD
    statements: list[str] = []
    with pipeline(store_settings) as rt:
        sqlite = rt.db.engine.dialect.name == "sqlite"

        def traced(dbapi: Any, _record: Any, _proxy: Any) -> None:
            # The driver's own trace: hot-path inserts bypass SQLAlchemy's events.
            if sqlite:
                dbapi.set_trace_callback(statements.append)

        event.listen(rt.db.engine, "checkout", traced)
        result = accept(rt, raw, "sales", source="smtp")
        event.remove(rt.db.engine, "checkout", traced)
        with rt.db.read() as s:
            stored = s.execute(
                select(Message.raw, Message.size).where(Message.id == result.message_pk)
            ).one()
        assert stored.raw == raw and stored.size == len(raw)
        if sqlite:
            # The blob is written in slices (the insert binds only its length, SQLite's
            # trace shows bound values: no 3 MiB in the statement); PostgreSQL binds it.
            [insert_sql] = [st for st in statements if st.startswith("INSERT INTO messages")]
            assert "zeroblob(" in insert_sql and len(insert_sql) < 10_000
        assert flush(rt) == 1
    (delivered,) = maildir_messages(store_settings, "sales")
    # Read back from the store in slices on SQLite; our trace field written in front.
    head, _, _ = delivered.partition(b"From: ")
    assert head.startswith(b"X-Mailrouter-Interaction: ") and head.endswith(b"\n")
    assert delivered.endswith(raw[len(raw) // 2 :].replace(b"\r\n", b"\n"))
    assert delivered.replace(b"\n", b"\r\n").endswith(raw[-MIB:])


def test_a_big_message_sent_again_is_a_duplicate(store_settings: Settings) -> None:
    """The second copy of a big message meets the stored hash: one row, one delivery."""
    raw = big_message(2 * MIB, "big-again")
    with pipeline(store_settings) as rt:
        first = accept(rt, raw, "sales", source="smtp")
        again = accept(rt, raw, "sales", source="smtp")
        assert again.decision.step == "duplicate"
        assert again.message_pk == first.message_pk
        with rt.db.read() as s:
            assert s.execute(select(Message.id)).all() == [(first.message_pk,)]


def test_maildir_copy_converts_line_endings_across_slice_edges(tmp_path: Path) -> None:
    """A CRLF split between two write slices is still one LF in the file."""
    raw = b"Subject: s\r\n\r\n" + b"abcdef\r\nxy\r\r\n\r\n\r" * 300
    for size in (2, 3, 7, 64):
        assert b"".join(lf_slices(raw, 0, size)) == raw.replace(b"\r\n", b"\n")
        assert b"".join(lf_slices(raw, 5, size)) == raw[5:].replace(b"\r\n", b"\n")
    out = maildir_deliver(tmp_path / "box", raw, "9xabc").file
    assert out.read_bytes() == raw.replace(b"\r\n", b"\n")


def test_a_big_held_message_released_keeps_its_key_and_bytes(store_settings: Settings) -> None:
    """Held (no header fields), then released: held again as the same row, byte for byte."""
    raw = b"not a header line\r\n" + big_message(2 * MIB, "held")
    with pipeline(store_settings) as rt:
        held = accept(rt, raw, "sales", source="smtp")
        assert held.decision.action == "hold" and held.message_pk is not None
        again = Pipeline(rt).release(held.message_pk)
        assert (again.decision.action, again.message_pk) == ("hold", held.message_pk)
        with rt.db.read() as s:
            assert s.execute(select(Message.raw)).scalars().all() == [raw]
