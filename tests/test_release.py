"""Releasing held messages: routed again in one transaction, never lost on the way."""

from __future__ import annotations

from pathlib import Path

import pytest

import mailrouter.pipeline
from helpers import accept, flush, maildir_messages, make_settings, pipeline, run_cli, scenario
from mailrouter.pipeline import NotHeld, Pipeline
from mailrouter.views import held_messages

CHAIRS = "chairs-quote"


def test_message_held_by_a_routing_crash_is_delivered_when_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug holds a message (internal-error); after the fix, release routes it normally."""
    settings = make_settings(tmp_path)
    raw = scenario(CHAIRS, "01-customer-asks.eml")

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated routing bug")

    with pipeline(settings) as p:
        # The routing code itself fails: the one place a stand-in is the point of the test.
        monkeypatch.setattr(mailrouter.pipeline, "decide", broken)
        held = accept(p, raw)
        assert (held.decision.action, held.decision.rule) == ("hold", "internal-error")
        monkeypatch.undo()
        assert held.message_pk is not None
        released = Pipeline(p).release(held.message_pk)
        assert (released.decision.action, released.decision.rule) == ("deliver", "new-interaction")
        flush(p)
        with p.db.read() as s:
            assert held_messages(s) == []
    assert maildir_messages(settings, "sales")[0].endswith(raw)


def test_release_of_a_still_broken_message_keeps_it_held(tmp_path: Path) -> None:
    """An empty message released again is held again with its reason (exit 1), not dropped."""
    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        held = accept(p, b"", "sales")
        assert held.decision.action == "hold"
    code, out, _err = run_cli(settings, "release", str(held.message_pk))
    assert code == 1 and "hold" in out and "empty message" in out
    with pipeline(settings) as p, p.db.read() as s:
        rows = held_messages(s)
    assert [r["hold_reason"] for r in rows] == ["empty message"]


def test_release_refuses_a_message_that_is_not_held(tmp_path: Path) -> None:
    """Releasing a delivered message is refused and changes nothing."""
    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        ok = accept(p, scenario(CHAIRS, "01-customer-asks.eml"))
        assert ok.message_pk is not None
        with pytest.raises(NotHeld):
            Pipeline(p).release(ok.message_pk)
    code, _out, err = run_cli(settings, "release", str(ok.message_pk))
    assert code == 1 and "not held" in err
