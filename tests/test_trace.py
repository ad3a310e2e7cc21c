"""``mailrouter trace MESSAGE-ID``: a message's whole life, read from the store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import mailrouter.pipeline
from helpers import accept, flush, make_settings, pipeline, run_cli, scenario
from mailrouter.config import Settings
from mailrouter.transfer import transfer

CHAIRS = "chairs-quote"
FIRST = "CAF3k9x1.chairs.0001@mail.customer.example"
SECOND = "CAF3k9x1.chairs.0002@mail.customer.example"
THIRD = "CAF3k9x1.chairs.0003@mail.customer.example"


def trace_json(settings: Settings, message_id: str) -> dict[str, Any]:
    code, out, err = run_cli(settings, "trace", message_id, "--json")
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.fixture
def routed(tmp_path: Path) -> Settings:
    """chairs-quote 01, 02 to sales; transferred to support (notice sent); 03 to sales, routed."""
    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        first = accept(p, scenario(CHAIRS, "01-customer-asks.eml"), "sales")
        accept(p, scenario(CHAIRS, "02-customer-adds-detail.eml"), "sales")
        assert first.interaction_id is not None
        flush(p)
        transfer(p, first.interaction_id, "support", actor="bob")
        flush(p)
        accept(p, scenario(CHAIRS, "03-customer-replies-to-sales.eml"), "sales")
        flush(p)
    return settings


def test_trace_of_a_routed_message_shows_arrival_decision_and_delivery(routed: Settings) -> None:
    """03 went to sales@ after the transfer: routed to support by in-reply-to, delivered."""
    out = trace_json(routed, f"<{THIRD}>")
    assert out["message_id"] == f"<{THIRD}>"
    [copy] = out["messages"]
    msg, decision = copy["message"], copy["decision"]
    assert (msg["source"], msg["account"], msg["recipients"]) == ("test", "sales", ["sales"])
    assert msg["from"] == "Anna Berg <anna.berg@customer.example>"
    assert (decision["rule"], decision["action"], decision["routed_to"]) == (
        "in-reply-to",
        "route",
        "support",
    )
    assert decision["matched"] == f"<{SECOND}>" and decision["step"]
    assert copy["interaction"]["id"] == 1 and copy["interaction"]["account"] == "support"
    [job] = copy["deliveries"]
    assert (job["kind"], job["account"], job["status"]) == ("deliver", "support", "sent")
    [attempt] = job["attempts"]
    assert (attempt["status"], attempt["relay"], attempt["dsn"]) == ("sent", "maildir", "2.0.0")
    assert "maildir/support/new/" in attempt["reply"]
    assert copy["transfers"] == []  # the transfer came before it
    events = [e["event"] for e in copy["timeline"]]
    assert events == ["received", "decision", "queued", "sent"]


def test_trace_of_the_answered_message_shows_its_notice_and_the_later_transfer(
    routed: Settings,
) -> None:
    """02 was the last customer mail before the transfer: the notice answered it."""
    [copy] = trace_json(routed, SECOND)["messages"]  # without <>
    [t] = copy["transfers"]
    assert (t["from"], t["to"], t["by"], t["notification"]) == ("sales", "support", "bob", "sent")
    [notice] = copy["answers"]
    assert (notice["kind"], notice["transfer"], notice["account"]) == ("notice", t["id"], "support")
    [job] = notice["deliveries"]
    assert (job["kind"], job["status"]) == ("notify", "sent")
    assert [a["relay"] for a in job["attempts"]] == ["pickup"]
    events = [e["event"] for e in copy["timeline"]]
    assert events == [
        "received",
        "decision",
        "queued",
        "sent",
        "transfer",
        "notice",
        "queued",
        "sent",
    ]


def test_trace_of_a_held_message_shows_why_and_its_queue_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message the routing crashed on: held (internal-error), m<N>, no interaction, no job."""
    settings = make_settings(tmp_path)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated routing bug")

    with pipeline(settings) as p:
        monkeypatch.setattr(mailrouter.pipeline, "decide", broken)
        held = accept(p, scenario(CHAIRS, "01-customer-asks.eml"), "sales")
        monkeypatch.undo()
    [copy] = trace_json(settings, FIRST)["messages"]
    assert copy["message"]["status"] == "held"
    assert copy["message"]["queue_id"] == f"m{held.message_pk}"
    assert (copy["decision"]["action"], copy["decision"]["rule"]) == ("hold", "internal-error")
    assert "simulated routing bug" in copy["decision"]["hold_reason"]
    assert copy["interaction"] is None and copy["deliveries"] == []

    code, out, _ = run_cli(settings, "trace", FIRST)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"<{FIRST}>"
    [decision] = [line for line in lines if " decision " in line]
    assert f"held (m{held.message_pk}): internal error: RuntimeError" in decision


def test_trace_text_is_a_timeline(routed: Settings) -> None:
    """Plain text: the id, the interaction, then one line per event, oldest first."""
    code, out, _ = run_cli(routed, "trace", THIRD)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"<{THIRD}>"
    assert "interaction 1: owned by support (from sales)" in out
    received = next(i for i, line in enumerate(lines) if " received " in line)
    assert "received via test for sales from Anna Berg" in lines[received]
    assert "route by rule in-reply-to" in lines[received + 1]
    assert "relay=maildir dsn=2.0.0" in lines[-1]


def test_trace_of_an_unknown_message_id_exits_1(tmp_path: Path) -> None:
    """Nothing stored under that id: refused, exit 1, the sentence on stderr."""
    settings = make_settings(tmp_path)
    code, _, err = run_cli(settings, "trace", "<nobody@nowhere.test>")
    assert code == 1 and "no stored message has Message-ID <nobody@nowhere.test>" in err
