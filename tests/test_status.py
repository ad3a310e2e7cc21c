"""``mailrouter status``: stage health, the queue, IMAP syncs, schema and version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers import accept, config_text, flush, make_settings, pipeline, run_cli, scenario
from mailrouter import __version__
from mailrouter.config import load
from mailrouter.store import imap_state
from mailrouter.store.migrate import head_revision
from mailrouter.transfer import transfer


def status_json(settings: Any) -> dict[str, Any]:
    code, out, err = run_cli(settings, "status", "--json")
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def test_status_json_on_an_empty_store(tmp_path: Path) -> None:
    """Fresh: every queue empty, schema at head, the version, the listeners, the accounts."""
    out = status_json(make_settings(tmp_path))
    assert out["ok"] is True and out["version"] == __version__
    assert out["schema"] == {
        "current": head_revision(),
        "head": head_revision(),
        "up_to_date": True,
    }
    assert {q: v["count"] for q, v in out["queue"].items()} == {
        "pending": 0,
        "deferred": 0,
        "sending": 0,
        "failed": 0,
        "held": 0,
        "held-messages": 0,
    }
    assert [(lst["name"], lst["enabled"]) for lst in out["listeners"]] == [
        ("smtp", False),
        ("lmtp", False),
    ]
    assert [a["name"] for a in out["accounts"]] == ["sales", "support", "billing"]
    assert out["accounts"][0]["delivery"] == "maildir" and out["outbound"] == "pickup"
    assert {n: st["state"] for n, st in out["stages"].items()} == {
        "deliver": "ok",
        "ingest": "ok",
        "store": "ok",
    }


def test_status_json_counts_the_queue_and_its_oldest_item(tmp_path: Path) -> None:
    """A queued notice and a held message: counted, with their ages; ingest warns."""
    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        first = accept(p, scenario("chairs-quote", "01-customer-asks.eml"), "sales")
        assert first.interaction_id is not None
        flush(p)
        transfer(p, first.interaction_id, "support")
        accept(p, b"", "sales")
    out = status_json(settings)
    assert out["queue"]["pending"]["count"] == 1
    assert out["queue"]["pending"]["oldest_age_seconds"] >= 0
    assert out["queue"]["held-messages"]["count"] == 1 and out["held_messages"] == 1
    assert out["stages"]["ingest"]["state"] == "warning"
    assert out["ok"] is True  # warnings need a look; only errors are "not ok"


def test_status_shows_the_last_imap_sync_of_each_watched_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watched account: its mailbox, UID mark and the time of the last complete sync."""
    monkeypatch.setenv("TEST_IMAP_PASSWORD", "secret-imap-password")
    text = config_text(tmp_path) + (
        '\n[accounts.sales.imap]\nhost = "127.0.0.1"\nport = 1143\n'
        'password_env = "TEST_IMAP_PASSWORD"\n'
    )
    path = tmp_path / "mailrouter.toml"
    path.write_text(text, "utf-8")
    settings = load(path)
    with pipeline(settings) as p, p.db.write() as s:
        imap_state.reset_mark(s, p.accounts.id("sales"), "INBOX", 77)
        imap_state.advance_mark(s, p.accounts.id("sales"), "INBOX", 77, 5)
        imap_state.mark_synced(s, p.accounts.id("sales"), "INBOX")
    code, out, err = run_cli(settings, "status", "--json")
    assert code == 0, err
    assert "secret-imap-password" not in out
    report = json.loads(out)
    imap = report["accounts"][0]["imap"]
    assert (imap["mailbox"], imap["uidvalidity"], imap["last_uid"]) == ("INBOX", 77, 5)
    assert imap["last_sync_at"] is not None and imap["last_sync_age_seconds"] < 60
    assert report["stages"]["imap:sales"] == {"state": "ok"}
    assert report["accounts"][1]["imap"] is None


def test_status_text_names_every_stage_and_queue(tmp_path: Path) -> None:
    """The plain text says ok, the schema, and lists stages, queues, listeners, accounts."""
    code, out, _ = run_cli(make_settings(tmp_path), "status")
    assert code == 0
    assert out.splitlines()[0].startswith(f"mailrouter {__version__}: ok; schema {head_revision()}")
    for word in ("stages:", "queue:", "held-messages", "listeners:", "accounts:", "sales"):
        assert word in out
