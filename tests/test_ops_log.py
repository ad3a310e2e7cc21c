"""Logs for ops (docs/logging.md): every ingest, decision, delivery attempt, transfer, notice
and refusal is one line with the stable keys, and no secret ever appears."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helpers import SCENARIOS, config_text, make_settings, run_cli
from mailrouter.config import load
from servers import CaptureSmarthost

CHAIRS = SCENARIOS / "chairs-quote"
PICKUP = '[outbound]\ntype = "pickup"\npath = "pickup"\n'


def events(settings: Any, *args: str) -> tuple[int, list[dict[str, Any]]]:
    code, _out, err = run_cli(settings, "--log-format", "json", *args)
    return code, [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def one(found: list[dict[str, Any]], name: str, **match: Any) -> dict[str, Any]:
    [e] = [e for e in found if e["event"] == name and all(e.get(k) == v for k, v in match.items())]
    return e


def test_ingest_decision_delivery_transfer_notice_and_refusal_lines_carry_the_keys(
    tmp_path: Path,
) -> None:
    """The documented keys, with the documented values, on each kind of line."""
    settings = make_settings(tmp_path)
    code, found = events(settings, "ingest", str(CHAIRS / "01-customer-asks.eml"))
    assert code == 0
    decision = one(found, "decision")
    assert {k: decision[k] for k in ("interaction", "account", "owner", "rule", "action")} == {
        "interaction": 1,
        "account": "sales@example.test",
        "owner": "sales@example.test",
        "rule": "new-interaction",
        "action": "deliver",
    }
    assert decision["msgid"] == "<CAF3k9x1.chairs.0001@mail.customer.example>"
    assert (decision["source"], decision["step"]) == ("cli", "owner-receives")
    delivery = one(found, "outbox")
    assert {k: delivery[k] for k in ("msgid", "interaction", "account", "status", "dsn")} == {
        "msgid": decision["msgid"],
        "interaction": 1,
        "account": "sales@example.test",
        "status": "sent",
        "dsn": "2.0.0",
    }
    assert (delivery["relay"], delivery["attempt"]) == ("maildir", 1)
    assert isinstance(delivery["delay"], float) and delivery["delay"] >= 0

    code, found = events(settings, "transfer", "1", "--to", "support", "--by", "bob")
    assert code == 0
    moved = one(found, "transfer")
    assert (moved["interaction"], moved["account"], moved["owner"], moved["notice"]) == (
        1,
        "sales@example.test",
        "support@example.test",
        "queued",
    )
    notice = one(found, "outbox", kind="notify")
    assert (notice["msgid"], notice["status"], notice["relay"]) == (
        moved["notice_msgid"],
        "sent",
        "pickup",
    )

    code, found = events(settings, "transfer", "1", "--to", "support")
    assert code == 1
    refused = one(found, "refused")
    assert (refused["op"], refused["code"]) == ("transfer", "same-account")

    code, found = events(
        settings, "ingest", "--account", "sales", str(SCENARIOS / "malformed/empty.eml")
    )
    held = one(found, "decision")
    assert (held["action"], held["status"], held["level"]) == ("hold", "held", "warning")
    assert held["queue"] == f"m{held['message']}"


def test_no_password_appears_in_the_log(
    tmp_path: Path, capture_smarthost: CaptureSmarthost
) -> None:
    """A smarthost that will not take our AUTH: the line names the user, never the password."""
    secret = tmp_path / "smarthost-password"
    secret.write_text("s3cret-Passw0rd\n")
    text = config_text(tmp_path).replace(
        PICKUP,
        "[outbound]\n"
        'type = "smtp"\n'
        f'host = "{capture_smarthost.host}"\n'
        f"port = {capture_smarthost.port}\n"
        'tls = "none"\n'
        'user = "mailrouter"\n'
        f'password_file = "{secret}"\n',
    )
    (tmp_path / "mailrouter.toml").write_text(text, "utf-8")
    settings = load(tmp_path / "mailrouter.toml", env={})
    assert run_cli(settings, "ingest", str(CHAIRS / "01-customer-asks.eml"))[0] == 0
    code, _out, err = run_cli(settings, "-v", "transfer", "1", "--to", "support")
    assert code == 0
    assert "smtp-setup-failed" in err and "user=mailrouter" in err
    assert "s3cret-Passw0rd" not in err
    code, out, err = run_cli(settings, "status", "--json")
    assert "s3cret-Passw0rd" not in out + err
