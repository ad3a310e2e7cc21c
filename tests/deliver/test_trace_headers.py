"""Trace headers on delivered copies: ours only, every other byte as it came in; and the
envelope an MDA records (Return-Path, Delivered-To) on the copies we deliver ourselves."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path
from typing import Any

import pytest

from daemon_process import running_daemon
from helpers import accept, flush, maildir_messages, make_settings, pipeline, raw_headers
from mailrouter.config import OutboundSettings
from mailrouter.deliver.errors import PermanentDeliveryError
from mailrouter.deliver.mailbox import send_outbound, trace_head
from mailrouter.pipeline import Pipeline
from mailrouter.transfer import transfer

FORGED = (
    b"From: Alice <alice@customer.test>\r\n"
    b"To: sales@example.test\r\n"
    b"X-Mailrouter-Routed-From: ceo@example.test\r\n"
    b"X-MAILROUTER-Interaction: 1\r\n"
    b"  folded continuation of the forgery\r\n"
    b"Subject: chairs\r\n"
    b"Message-ID: <forged-1@customer.test>\r\n"
    b"\r\n"
    b"X-Mailrouter-Routed-From: in the body stays\r\n"
)


def with_trace_headers(raw: bytes, *args: Any, **kw: Any) -> bytes:
    """The copy a delivery writes: trace_head()'s fields, then the message."""
    head, body = trace_head(raw, *args, **kw)
    return head + body


def test_a_message_with_nothing_to_strip_is_not_copied() -> None:
    """The body trace_head() hands back is the stored bytes themselves: a big message is
    never copied to put our fields in front (the Maildir writer writes both)."""
    raw = b"From: carol@customer.test\nSubject: x\n\n" + b"y" * 100_000
    head, body = trace_head(raw, 3, "sales@example.test", return_path="carol@customer.test")
    assert body is raw
    assert head.startswith(b"Return-Path: <carol@customer.test>\n")


def test_inbound_copies_of_our_trace_headers_are_removed() -> None:
    """A forged X-Mailrouter-Routed-From never reaches the mailbox; ours replaces it."""
    out = with_trace_headers(FORGED, 7, "support@example.test")
    headers = raw_headers(out)
    assert headers["x-mailrouter-routed-from"] == ["support@example.test"]
    assert headers["x-mailrouter-interaction"] == ["7"]
    assert b"ceo@example.test" not in out
    assert b"folded continuation" not in out
    assert out.endswith(b"\r\n\r\nX-Mailrouter-Routed-From: in the body stays\r\n")


def test_trace_headers_leave_every_other_byte_as_it_was() -> None:
    """Without inbound X-Mailrouter-* fields the original follows ours byte for byte."""
    raw = b"From: a@b.test\nSubject:  odd  spacing \t\n\tfolded\n\nbody\n"
    assert with_trace_headers(raw, 3, None) == b"X-Mailrouter-Interaction: 3\n" + raw
    stripped = with_trace_headers(FORGED, None, None)
    assert stripped == FORGED.replace(
        b"X-Mailrouter-Routed-From: ceo@example.test\r\n"
        b"X-MAILROUTER-Interaction: 1\r\n"
        b"  folded continuation of the forgery\r\n",
        b"",
    )


def test_an_inbound_loop_header_is_kept() -> None:
    """X-Mailrouter-Loop only marks mail automatic; it must survive to stop the next hop."""
    raw = b"From: a@b.test\nX-Mailrouter-Loop: other.example\n\nbody\n"
    assert with_trace_headers(raw, 3, None).endswith(raw)


def test_routed_copy_carries_only_our_trace_headers(tmp_path: Path) -> None:
    """Through the pipeline: delivered and routed copies name the real facts, once."""
    settings = make_settings(tmp_path, sales={"enabled": True})
    reply = FORGED.replace(
        b"Message-ID: <forged-1@customer.test>\r\n",
        b"Message-ID: <forged-2@customer.test>\r\nIn-Reply-To: <forged-1@customer.test>\r\n",
    )
    with pipeline(settings) as p:
        first = accept(p, FORGED)
        assert first.interaction_id is not None
        flush(p)
        transfer(p, first.interaction_id, "support")
        assert accept(p, reply).decision.action == "route"
        flush(p)
    [delivered] = maildir_messages(settings, "sales")
    assert "x-mailrouter-routed-from" not in raw_headers(delivered)
    assert raw_headers(delivered)["x-mailrouter-interaction"] == [str(first.interaction_id)]
    [routed] = maildir_messages(settings, "support")
    headers = raw_headers(routed)
    assert headers["x-mailrouter-routed-from"] == ["sales@example.test"]
    assert headers["x-mailrouter-interaction"] == [str(first.interaction_id)]
    assert b"ceo@example.test" not in delivered + routed


def test_an_empty_outbound_message_is_never_sent(tmp_path: Path) -> None:
    """A row with nothing composed in it fails permanently instead of mailing nothing."""
    outbound = OutboundSettings(type="pickup", path=tmp_path / "pickup")
    with pytest.raises(PermanentDeliveryError, match="nothing to send"):
        asyncio.run(
            send_outbound(
                outbound, b"", envelope_from="a@b.test", envelope_to=["c@d.test"], key="1"
            )
        )
    assert not (tmp_path / "pickup").exists() or not any((tmp_path / "pickup").iterdir())


# --------------------------------------------------------------------------- envelope


WITH_RETURN_PATH = (
    b"Return-Path: <forged@elsewhere.test>\r\n"
    b"Delivered-To: relay-hop@isp.test\r\n"
    b"From: Alice <alice@customer.test>\r\n"
    b"RETURN-PATH:\r\n <second@elsewhere.test>\r\n"
    b"Subject: chairs\r\n"
    b"\r\n"
    b"Return-Path: <in the body stays>\r\n"
)


def test_the_envelope_sender_and_mailbox_go_on_top_as_an_mda_writes_them() -> None:
    """Return-Path first, then Delivered-To, then our trace headers, then the original."""
    raw = b"From: a@b.test\r\nSubject: x\r\n\r\nbody\r\n"
    out = with_trace_headers(
        raw, 4, None, return_path="alice@customer.test", delivered_to="support@example.test"
    )
    assert out == (
        b"Return-Path: <alice@customer.test>\r\n"
        b"Delivered-To: support@example.test\r\n"
        b"X-Mailrouter-Interaction: 4\r\n" + raw
    )


def test_inbound_return_paths_are_replaced_and_delivered_to_fields_kept() -> None:
    """RFC 5321 §4.4: the final delivery writes Return-Path, so inbound ones go (folded
    ones too); earlier hops' Delivered-To fields stay below ours (loop detection)."""
    out = with_trace_headers(
        WITH_RETURN_PATH, None, None, return_path="bob@x.test", delivered_to="sales@example.test"
    )
    headers = raw_headers(out)
    assert headers["return-path"] == ["<bob@x.test>"]
    assert headers["delivered-to"] == ["sales@example.test", "relay-hop@isp.test"]
    assert b"elsewhere.test" not in out
    assert out.endswith(b"\r\n\r\nReturn-Path: <in the body stays>\r\n")


def test_the_null_sender_is_written_as_empty_angle_brackets() -> None:
    """A bounce (MAIL FROM:<>) is delivered with Return-Path: <>."""
    out = with_trace_headers(b"From: MAILER-DAEMON@x.test\n\nbody\n", None, None, return_path="")
    assert out.startswith(b"Return-Path: <>\nFrom:")


def test_an_unknown_envelope_keeps_the_inbound_return_path() -> None:
    """Replayed or IMAP-watched mail has no envelope here: what its own MDA wrote stays."""
    out = with_trace_headers(WITH_RETURN_PATH, 2, None, delivered_to="sales@example.test")
    assert out.endswith(WITH_RETURN_PATH)
    assert b"Return-Path: <" not in out[: -len(WITH_RETURN_PATH)]


def test_an_envelope_sender_cannot_break_out_of_its_field() -> None:
    """Whatever reaches the store, the generated field stays one field with one address."""
    out = with_trace_headers(b"From: a@b.test\n\n", None, None, return_path="x>\r\nBcc: <y@z")
    assert out.split(b"\n", 1)[0] == b"Return-Path: <xBcc: y@z>"


def test_a_routed_copy_names_the_envelope_sender_and_the_new_mailbox(tmp_path: Path) -> None:
    """Through the pipeline: the routed copy says who the envelope came from and which
    mailbox it was delivered into (the new owner's), the first copy likewise."""
    settings = make_settings(tmp_path, sales={"enabled": True})
    reply = FORGED.replace(
        b"Message-ID: <forged-1@customer.test>\r\n",
        b"Message-ID: <forged-2@customer.test>\r\nIn-Reply-To: <forged-1@customer.test>\r\n",
    )
    with pipeline(settings) as p:
        sales = [p.settings.account("sales")]
        first = Pipeline(p).accept(
            FORGED, sales, source="smtp", envelope_sender="alice@customer.test"
        )
        assert first.interaction_id is not None
        flush(p)
        transfer(p, first.interaction_id, "support")
        routed = Pipeline(p).accept(reply, sales, source="smtp", envelope_sender="")
        assert routed.decision.action == "route"
        flush(p)
    [delivered] = maildir_messages(settings, "sales")
    assert delivered.startswith(b"Return-Path: <alice@customer.test>\nDelivered-To: sales@")
    [copy] = maildir_messages(settings, "support")
    headers = raw_headers(copy)
    assert headers["return-path"] == ["<>"]
    assert headers["delivered-to"] == ["support@example.test"]
    assert headers["x-mailrouter-routed-from"] == ["sales@example.test"]


def test_over_smtp_into_the_daemon_the_maildir_copy_carries_the_envelope(
    tmp_path: Path,
) -> None:
    """A real SMTP session into `mailrouter run`: MAIL FROM becomes the Return-Path."""
    with running_daemon(tmp_path) as d:
        with smtplib.SMTP("127.0.0.1", d.settings.smtp.port, timeout=10) as c:
            assert c.sendmail("bounces+7@customer.test", ["sales@example.test"], FORGED) == {}
        d.err.wait_for(lambda e: e.get("event") == "outbox" and e.get("status") == "sent")
        assert d.stop() == 0
    [copy] = maildir_messages(d.settings, "sales")
    headers = raw_headers(copy)
    assert copy.startswith(b"Return-Path: <bounces+7@customer.test>\n")
    assert headers["delivered-to"] == ["sales@example.test"]


def test_mail_without_an_envelope_keeps_its_own_return_path(tmp_path: Path) -> None:
    """Replayed (or IMAP-watched) mail has no envelope here: no Return-Path or
    Delivered-To is made up, and the one its first MDA wrote stays."""
    settings = make_settings(tmp_path)
    raw = b"Return-Path: <first-mda@customer.test>\r\n" + FORGED
    with pipeline(settings) as p:
        iid = accept(p, raw, "sales").interaction_id
        flush(p)
    [delivered] = maildir_messages(settings, "sales")
    assert delivered.startswith(
        f"X-Mailrouter-Interaction: {iid}\nReturn-Path: <first-mda@customer.test>\n".encode()
    )
    assert b"Delivered-To" not in delivered
