"""The header-only parse: the email package never sees a body, the content hash is the one
stored hashes were made with, and the facts read from bodies (reports, bounces, malformed
input) are still found.

``_old_hash`` and ``_old_headers`` are the implementations before the header-only parse,
kept here as the reference: a duplicate is found by comparing a new message's hash with
stored ones, so the hash of any input must never change.
"""

from __future__ import annotations

import contextlib
import hashlib
import tracemalloc
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrouter import parse as parse_module
from mailrouter.parse import TRACE_HEADERS, content_hash, decode_text, header_section, parse

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MIB = 1024 * 1024


def _old_hash(raw: bytes) -> str:
    """content_hash() as it was: normalise, partition, hash line by line."""
    data = raw.replace(b"\r\n", b"\n")
    head, sep, body = data.partition(b"\n\n")
    if not sep:
        head, body = data, b""
    h = hashlib.sha256()
    keep = True
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if keep:
                h.update(line + b"\n")
            continue
        name = line.split(b":", 1)[0].strip().lower()
        keep = name not in TRACE_HEADERS
        if keep:
            h.update(line + b"\n")
    h.update(b"\n")
    h.update(body)
    return h.hexdigest()


def _old_headers(raw: bytes) -> Message:
    return BytesParser(policy=compat32).parsebytes(raw, headersonly=True)


def _mail_files(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*") if p.is_file())


def test_content_hash_unchanged_over_fixtures_and_corpora(corpora: Path) -> None:
    """Every fixture and corpus file, and its CRLF form, hashes as before."""
    files = _mail_files(FIXTURES, corpora)
    assert len(files) > 500
    for path in files:
        raw = path.read_bytes()
        crlf = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        for variant in (raw, crlf):
            assert content_hash(variant) == _old_hash(variant), path


def test_header_fields_unchanged_over_fixtures_and_corpora(corpora: Path) -> None:
    """The header section alone yields the very fields the whole message did."""
    for path in _mail_files(FIXTURES, corpora):
        raw = path.read_bytes()
        new = BytesParser(policy=compat32).parsebytes(header_section(raw), headersonly=True)
        old = _old_headers(raw)
        assert list(new.raw_items()) == list(old.raw_items()), path
        assert new.get_unixfrom() == old.get_unixfrom(), path


def _old_decode_text(value: object) -> str:
    """decode_text() as it was, decoding every field (the fast path skips fields that
    hold no encoded-word)."""
    if value is None:
        return ""
    text = parse_module._header_text(value)
    with contextlib.suppress(ValueError, LookupError, UnicodeError, AssertionError):
        text = str(make_header(decode_header(text)))
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return parse_module._WS_RE.sub(" ", text).strip()


def test_decoded_header_text_unchanged_over_fixtures_and_corpora(corpora: Path) -> None:
    """Every field of every fixture and corpus file reads as the same text as before."""
    fields = 0
    for path in _mail_files(FIXTURES, corpora):
        msg = _old_headers(path.read_bytes())
        for name, value in msg.items():
            assert decode_text(value) == _old_decode_text(value), (path, name)
            fields += 1
    assert fields > 5000


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(' \t\r\nab=?é\udce9\x00QqB_-<>@"(),;:'))))
def test_decoded_text_unchanged_for_generated_field_values(value: str) -> None:
    assert decode_text(value) == _old_decode_text(value)


# Bytes that matter to line splitting, separators and trace-field names.
_PIECES = st.sampled_from(
    [
        b"\r\n",
        b"\n",
        b"\r",
        b"\r\r\n",
        b"\n\r\n",
        b" ",
        b"\t",
        b":",
        b"Received",
        b"RETURN-PATH",
        b"  received  ",
        b"Subject: x",
        b"From ",
        b"body",
        b"\xc3\xa9",
        b"\x0c",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=30).map(b"".join))
def test_content_hash_unchanged_for_odd_line_endings(raw: bytes) -> None:
    """Mixed CR, LF and CRLF, folded and padded trace names: the hash is as before."""
    assert content_hash(raw) == _old_hash(raw)


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=30).map(b"".join))
def test_header_section_parses_as_the_whole_message(raw: bytes) -> None:
    """For any line-ending mix, the header section gives the same header fields."""
    new = BytesParser(policy=compat32).parsebytes(header_section(raw), headersonly=True)
    assert list(new.raw_items()) == list(_old_headers(raw).raw_items())


def test_content_hash_slices_keep_a_crlf_split_between_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CRLF that straddles two hash slices is still read as one LF."""
    monkeypatch.setattr(parse_module, "_SLICE", 7)
    raw = b"Subject: s\r\n\r\n" + b"abcdef\r\nxy\r\r\n\r\n" * 50
    assert content_hash(raw) == _old_hash(raw)


def _big(size: int) -> bytes:
    head = (
        b"From: Carol <carol@customer.test>\r\nTo: sales@example.test\r\n"
        b"Subject: scans\r\nMessage-ID: <big@customer.test>\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAx\r\n"
    return head + line * (size // len(line)) + b"--b1--\r\n"


def test_the_email_package_never_sees_the_body(monkeypatch: pytest.MonkeyPatch) -> None:
    """parse() hands the email package the header section only."""
    raw = _big(MIB)
    seen: list[int] = []
    real = BytesParser.parsebytes

    def spy(self: BytesParser, text: bytes, headersonly: bool = False) -> Message:
        seen.append(len(text))
        return real(self, text, headersonly)

    monkeypatch.setattr(BytesParser, "parsebytes", spy)
    msg = parse(raw)
    assert msg.subject == "scans" and msg.message_id == "big@customer.test"
    assert seen and max(seen) == raw.index(b"\r\n\r\n") + 2


def test_parse_of_a_big_message_allocates_a_fraction_of_it() -> None:
    """parse() with its hash allocates well under the message's size at its peak."""
    raw = _big(8 * MIB)
    tracemalloc.start()
    try:
        msg = parse(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert msg.content_hash == _old_hash(raw)
    # One hash slice (and its CRLF → LF copy) plus the header objects; was 7.7x the size.
    assert peak < 0.5 * len(raw)


REPORT = (
    b"From: MAILER-DAEMON@mx.customer.test (Mail Delivery System)\r\n"
    b"To: sales@example.test\r\n"
    b"Subject: Undelivered Mail Returned to Sender\r\n"
    b"Message-ID: <dsn-1@mx.customer.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/report; report-type=delivery-status;\r\n"
    b'\tboundary="RB"\r\n\r\n'
    b"--RB\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
    b"--RB\r\nContent-Type: message/delivery-status\r\n\r\n"
    b"Reporting-MTA: dns; mx.customer.test\r\n\r\n"
    b"Final-Recipient: rfc822; carol@customer.test\r\n"
    b"Action: failed\r\nStatus: 5.1.1\r\n"
    b"Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n\r\n"
    b"--RB\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    b"Message-ID: <notice-7@example.test>\r\nSubject: Your request\r\n\r\n"
    b"--RB--\r\n"
)


def test_a_delivery_report_is_still_recognised_from_its_body() -> None:
    """A multipart/report is automatic by its header; its parts are read for the bounce."""
    msg = parse(REPORT)
    assert msg.automatic is not None and "multipart/report" in msg.automatic
    assert msg.bounce is not None
    assert msg.bounce.original_message_id == "notice-7@example.test"
    assert [(r.address, r.status) for r in msg.bounce.recipients] == [
        ("carol@customer.test", "5.1.1")
    ]


def test_a_personal_message_body_is_never_read_for_a_bounce() -> None:
    """Mail that is not automatic by its headers has no bounce, whatever its body says."""
    raw = b"From: carol@customer.test\r\nSubject: hi\r\n\r\n" + REPORT
    msg = parse(raw)
    assert msg.automatic is None and msg.bounce is None


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "empty message"),
        (b" \r\n\t\r\n", "empty message"),
        (b"just text\r\n\r\nmore", "no header fields (not an RFC 5322 message)"),
        (b"\r\nSubject: after a blank line\r\n", "no header fields (not an RFC 5322 message)"),
    ],
)
def test_malformed_input_is_still_found(raw: bytes, problem: str) -> None:
    """Empty and header-less input still carries the problem that holds it."""
    assert parse(raw).problem == problem
