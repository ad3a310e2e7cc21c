"""Trace headers on delivered copies: ours only, every other byte as it came in."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from helpers import accept, flush, maildir_messages, make_settings, pipeline, raw_headers
from mailrouter.config import OutboundSettings
from mailrouter.deliver.errors import PermanentDeliveryError
from mailrouter.deliver.mailbox import send_outbound, with_trace_headers
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
