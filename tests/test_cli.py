"""The ``mailrouter`` command: exit statuses, documented ``--json`` fields, no-change commands.

Exit status (README "Command reference"): 0 done, 1 refused or failed (nothing changed),
2 usage or configuration error.  ``--json`` field names are a stable interface for scripts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    SCENARIOS,
    config_text,
    maildir_messages,
    make_settings,
    pickup_messages,
    run_cli,
    subprocess_env,
)
from mailrouter.config import Settings

CHAIRS = SCENARIOS / "chairs-quote"
INTERACTION_FIELDS = {
    "id",
    "account",
    "origin_account",
    "created_at",
    "unread",
    "status",
    "distribution",
    "assigned_agent",
    "subject",
    "customer",
}
MESSAGE_FIELDS = {
    "message_id",
    "direction",
    "account",
    "routed_to",
    "from",
    "to",
    "subject",
    "date",
}
TRANSFER_FIELDS = {"id", "from", "to", "by", "at", "notification", "notification_message_id"}


def cli_json(settings: Settings, *args: str) -> Any:
    """Run a command that must succeed and return its parsed ``--json`` output."""
    code, out, err = run_cli(settings, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def ingest(settings: Settings, *files: str, account: str | None = None) -> list[dict[str, Any]]:
    extra = ["--account", account] if account else []
    result: list[dict[str, Any]] = cli_json(
        settings, "ingest", *extra, *(str(CHAIRS / f) for f in files)
    )
    return result


def snapshot(settings: Settings) -> dict[str, Any]:
    """Everything a no-change command must leave exactly as it was."""
    return {
        "interactions": cli_json(settings, "interactions"),
        "details": [
            cli_json(settings, "show", str(i["id"])) for i in cli_json(settings, "interactions")
        ],
        "queue": cli_json(settings, "queue", "--all"),
        "held": cli_json(settings, "held"),
        "maildirs": {a: maildir_messages(settings, a) for a in ("sales", "support", "billing")},
        "pickup": pickup_messages(settings),
    }


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def transferred(settings: Settings) -> Settings:
    """chairs-quote 01 and 02 ingested for sales, then interaction 1 moved to support."""
    ingest(settings, "01-customer-asks.eml", "02-customer-adds-detail.eml")
    code, _, err = run_cli(settings, "transfer", "1", "--to", "support", "--by", "bob")
    assert code == 0, err
    return settings


# --------------------------------------------------------------------------- --json shapes


def test_interactions_json_has_documented_fields(transferred: Settings) -> None:
    """`interactions --json` objects carry the documented field names and types."""
    [row] = cli_json(transferred, "interactions")
    assert row.keys() >= INTERACTION_FIELDS
    assert row["id"] == 1
    assert (row["account"], row["origin_account"]) == ("support", "sales")
    assert (row["unread"], row["status"], row["distribution"]) == (True, "open", "manual")
    assert row["assigned_agent"] is None
    assert row["subject"] == "Quote for 40 office chairs"
    # The customer address is the one of the mail that opened the interaction.
    assert row["customer"] == "anna.berg@customer.example"
    assert row["created_at"].endswith("+00:00")


def test_show_json_adds_messages_and_transfers(transferred: Settings) -> None:
    """`show --json` is an interactions object plus messages and transfers."""
    shown = cli_json(transferred, "show", "1")
    assert INTERACTION_FIELDS | {"messages", "transfers"} <= shown.keys()
    assert len(shown["messages"]) == 3  # two from the customer, the notice
    for m in shown["messages"]:
        assert m.keys() >= MESSAGE_FIELDS
        assert m["direction"] in ("inbound", "outbound")
        assert m["message_id"].startswith("<") and m["message_id"].endswith(">")
    first = shown["messages"][0]
    assert (first["message_id"], first["direction"], first["account"], first["routed_to"]) == (
        "<CAF3k9x1.chairs.0001@mail.customer.example>",
        "inbound",
        "sales",
        None,
    )
    assert (first["from"], first["to"]) == (
        "Anna Berg <anna.berg@customer.example>",
        "sales@example.test",
    )
    assert first["date"] == "2026-03-02T08:14:02+00:00"
    [t] = shown["transfers"]
    assert t.keys() >= TRANSFER_FIELDS
    assert (t["from"], t["to"], t["by"], t["notification"]) == ("sales", "support", "bob", "sent")
    assert t["notification_message_id"] == shown["messages"][2]["message_id"]


def test_ingest_json_reports_each_decision(settings: Settings) -> None:
    """`ingest --json` gives one decision object per file."""
    rows = ingest(settings, "01-customer-asks.eml", "02-customer-adds-detail.eml")
    assert [(r["action"], r["rule"], r["interaction"]) for r in rows] == [
        ("deliver", "new-interaction", 1),
        ("deliver", "in-reply-to", 1),
    ]
    assert rows[1]["matched"] == "<CAF3k9x1.chairs.0001@mail.customer.example>"
    assert {"file", "receiving", "owner", "deliver_to", "reason"} <= rows[0].keys()
    assert rows[0]["file"] == str(CHAIRS / "01-customer-asks.eml")


def test_transfer_json_describes_the_transfer(settings: Settings) -> None:
    """`transfer --json` names both accounts and the queued notice."""
    ingest(settings, "01-customer-asks.eml")
    r = cli_json(settings, "transfer", "1", "--to", "support", "--by", "bob")
    assert (r["interaction_id"], r["from_account"], r["to_account"]) == (1, "sales", "support")
    assert (r["notification"], r["reason"]) == ("queued", None)
    [notice] = pickup_messages(settings)
    assert f"Message-ID: <{r['notice_message_id']}>".encode() in notice


def test_report_json_attributes_to_current_account(transferred: Settings) -> None:
    """`report --json` says it counts by current account and lists every account."""
    r = cli_json(transferred, "report", "--from", "2000-01-01", "--to", "2100-01-01")
    assert r["attributed_to"] == "current account"
    assert (r["from"], r["to"]) == ("2000-01-01T00:00:00+00:00", "2100-01-01T00:00:00+00:00")
    rows = {row["account"]: row for row in r["accounts"]}
    assert set(rows) == {"sales", "support", "billing"}
    assert rows["sales"]["interactions"] == 0
    assert (rows["support"]["interactions"], rows["support"]["inbound"]) == (1, 2)
    code, _, err = run_cli(transferred, "report", "--from", "2026-02-01", "--to", "2026-01-01")
    assert code == 1
    assert "--to must be after --from" in err


# --------------------------------------------------------------------------- accounts


@pytest.mark.parametrize("how", ["name", "address", "upper-case address"])
def test_accounts_accepted_by_name_or_address(settings: Settings, how: str) -> None:
    """Every --account / --to takes an account's name or its address."""
    spell = {
        "name": lambda n: n,
        "address": lambda n: f"{n}@example.test",
        "upper-case address": lambda n: f"{n}@EXAMPLE.test".upper(),
    }[how]
    ingest(settings, "01-customer-asks.eml", account=spell("sales"))
    code, _, err = run_cli(settings, "transfer", "1", "--to", spell("support"))
    assert code == 0, err
    assert [i["id"] for i in cli_json(settings, "interactions", "--account", spell("support"))] == [
        1
    ]
    assert cli_json(settings, "interactions", "--account", spell("sales")) == []


def test_unknown_account_exits_1(settings: Settings) -> None:
    """An account that is not configured is an error (exit 1) naming the configured ones."""
    code, out, err = run_cli(settings, "interactions", "--account", "marketing")
    assert (code, out) == (1, "")
    assert "unknown account 'marketing' (configured: sales, support, billing)" in err


# --------------------------------------------------------------------------- refusals


def test_refused_transfer_exits_1_and_changes_nothing(tmp_path: Path) -> None:
    """A refused transfer exits 1 with the reason; store, mailboxes and outbox are untouched."""
    settings = make_settings(tmp_path)  # billing: no [transfer] table, so transfer disabled
    code, _, err = run_cli(
        settings, "ingest", str(SCENARIOS / "double-charge" / "01-customer-asks.eml")
    )
    assert code == 0, err
    before = snapshot(settings)
    for args, why in [
        (("1", "--to", "sales"), "transfer out of account billing is not enabled"),
        (("1", "--to", "marketing"), "unknown account 'marketing'"),
        (("1", "--to", "billing"), "interaction 1 already belongs to billing"),
        (("7", "--to", "sales"), "no interaction 7"),
    ]:
        code, out, err = run_cli(settings, "transfer", *args, "--by", "bob")
        assert (code, out) == (1, ""), args
        assert f"mailrouter: transfer refused: {why}" in err
    assert snapshot(settings) == before


def test_transfer_with_broken_template_transfers_and_reports_the_failed_notice(
    tmp_path: Path,
) -> None:
    """A notice template that fails to render no longer refuses the transfer: it happens,
    exits 0 and says the notice failed, naming file and line; `queue` lists the failure."""
    tdir = tmp_path / "templates"
    tdir.mkdir()
    (tdir / "notice.txt.j2").write_text("Hello,\nmoved to {{ toAcount }}.\n", "utf-8")
    settings = make_settings(
        tmp_path, template_dir=tdir, sales={"enabled": True, "notify": True, "template": "notice"}
    )
    ingest(settings, "01-customer-asks.eml")
    code, out, err = run_cli(settings, "transfer", "1", "--to", "support")
    assert code == 0, err
    assert out.startswith("interaction 1: sales -> support; notice failed (")
    assert f"{tdir / 'notice.txt.j2'}:2: undefined variable" in out
    assert "Traceback" not in err
    code, out, _ = run_cli(settings, "queue")
    assert code == 0
    assert "notify" in out and "notice template of account sales failed" in out


def test_show_unknown_interaction_exits_1(settings: Settings) -> None:
    """`show` of an id that does not exist exits 1."""
    code, out, err = run_cli(settings, "show", "42", "--json")
    assert (code, out) == (1, "")
    assert "no interaction 42" in err


def test_missing_argument_is_a_usage_error(settings: Settings) -> None:
    """A command line argparse rejects exits 2."""
    with pytest.raises(SystemExit) as exc:
        run_cli(settings, "transfer", "1")
    assert exc.value.code == 2


def test_config_error_exits_2_naming_file_line_and_key(tmp_path: Path) -> None:
    """A bad config exits 2 with file:line: key: problem on stderr."""
    settings = make_settings(tmp_path)
    path = settings.config_path
    text = config_text(tmp_path).replace('address = "support@example.test"', "address = 7")
    path.write_text(text, "utf-8")
    line = text.splitlines().index("address = 7") + 1
    code, out, err = run_cli(settings, "interactions")
    assert (code, out) == (2, "")
    assert err.strip() == (
        f"mailrouter: config error: {path}:{line}: accounts.support.address: "
        "expected a string, got an integer"
    )


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    """A config path that does not exist exits 2 and says how to give one."""
    settings = make_settings(tmp_path)
    settings.config_path.unlink()
    code, _, err = run_cli(settings, "check-config")
    assert code == 2
    assert "no such file (give -c PATH or set MAILROUTER_CONFIG)" in err


def test_check_config_reports_broken_template_and_exits_2(tmp_path: Path) -> None:
    """`check-config` trial-renders notice templates; a broken one is a config error."""
    tdir = tmp_path / "templates"
    tdir.mkdir()
    (tdir / "notice.txt.j2").write_text("{{ fromAccount }} {{ toAcount }}\n", "utf-8")
    settings = make_settings(
        tmp_path, template_dir=tdir, sales={"enabled": True, "notify": True, "template": "notice"}
    )
    code, out, _ = run_cli(settings, "check-config", "--json")
    assert code == 2
    report = json.loads(out)
    assert report["ok"] is False
    [problem] = report["problems"]
    assert problem.startswith("accounts.sales.transfer.template: ")
    assert "toAcount" in problem


def test_check_config_accepts_good_config(settings: Settings) -> None:
    """`check-config` on a good config exits 0 and shows the effective settings."""
    code, out, _ = run_cli(settings, "check-config", "--json")
    assert code == 0
    report = json.loads(out)
    assert (report["ok"], report["problems"]) == (True, [])
    assert report["settings"]["state_dir"] == str(settings.state_dir)


def _with_database(settings: Settings, url: str) -> Settings:
    text = settings.config_path.read_text("utf-8")
    old = 'url = "sqlite:///mailrouter.db"'
    assert old in text
    settings.config_path.write_text(text.replace(old, f"url = {json.dumps(url)}"), "utf-8")
    return settings


def test_check_config_refuses_a_database_it_cannot_reach(tmp_path: Path) -> None:
    """A valid URL that does not open is a problem named by its key, password masked."""
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://mr:s3cret@127.0.0.1:{port}/mailrouter"
    settings = _with_database(make_settings(tmp_path), url)
    code, out, err = run_cli(settings, "check-config")
    assert code == 2
    assert (
        f"error: database.url: cannot connect to postgresql+psycopg://mr:********@127.0.0.1:{port}/"
        in err
    )
    assert "s3cret" not in out + err
    assert "OK" not in err


def test_check_config_refuses_a_file_that_is_not_sqlite(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database, just bytes\n" * 100)
    settings = _with_database(make_settings(tmp_path), f"sqlite:///{junk}")
    code, _, err = run_cli(settings, "check-config")
    assert code == 2
    assert f"error: database.url: {junk}: cannot open as SQLite" in err


def test_check_config_creates_no_database(tmp_path: Path) -> None:
    """An SQLite file that does not exist yet is fine (the daemon makes it) and stays absent."""
    settings = make_settings(tmp_path)
    code, _, _ = run_cli(settings, "check-config")
    assert code == 0
    assert not (settings.state_dir / "mailrouter.db").exists()


# --------------------------------------------------------------------------- no-change commands


def test_explain_changes_nothing(transferred: Settings) -> None:
    """`explain` shows the decision ingest would take, and stores or delivers nothing."""
    before = snapshot(transferred)
    reply = str(CHAIRS / "03-customer-replies-to-sales.eml")
    explained = cli_json(transferred, "explain", reply)
    assert snapshot(transferred) == before
    assert (explained["action"], explained["rule"], explained["interaction"]) == (
        "route",
        "in-reply-to",
        1,
    )
    assert (explained["receiving"], explained["owner"], explained["deliver_to"]) == (
        "sales",
        "support",
        "support",
    )
    assert explained["matched"] == "<CAF3k9x1.chairs.0002@mail.customer.example>"
    [done] = cli_json(transferred, "ingest", reply)
    assert {k: done[k] for k in ("action", "rule", "interaction", "deliver_to")} == {
        k: explained[k] for k in ("action", "rule", "interaction", "deliver_to")
    }


def test_replay_dry_run_stores_nothing(settings: Settings) -> None:
    """`replay --dry-run` decides every message like a real replay but keeps nothing."""
    files = [
        str(CHAIRS / f"0{n}-{s}.eml")
        for n, s in [
            (1, "customer-asks"),
            (2, "customer-adds-detail"),
            (3, "customer-replies-to-sales"),
            (4, "customer-replies-references-only"),
            (5, "customer-cc-sales-and-support"),
        ]
    ]
    dry = cli_json(settings, "replay", "--dry-run", *files)
    assert (dry["messages"], dry["dry_run"], dry["delivered"]) == (5, True, 0)
    assert dry["actions"] == {"deliver": 5}
    assert cli_json(settings, "interactions") == []
    assert cli_json(settings, "queue", "--all") == []
    assert maildir_messages(settings, "sales") == []

    real = cli_json(settings, "replay", *files)
    assert (real["actions"], real["delivered"]) == (dry["actions"], 5)
    assert len(cli_json(settings, "show", "1")["messages"]) == 5
    assert len(maildir_messages(settings, "sales")) == 5


def test_replay_batch_the_store_refuses_is_retried_message_by_message(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch rolled back whole (another instance held one of its threads) is not lost:
    each of its messages is accepted on its own, and the summary counts them."""
    from mailrouter.pipeline import Pipeline, StoreUnavailable

    def refuse(self: Pipeline, batch: object, *, source: str) -> object:
        raise StoreUnavailable("its thread stayed busy on another instance")

    monkeypatch.setattr(Pipeline, "accept_many", refuse)
    files = [str(f) for f in sorted(CHAIRS.glob("0[1-3]-*.eml"))]
    real = cli_json(settings, "replay", "--batch", "2", *files)
    assert (real["messages"], real["store_errors"], real["actions"]) == (3, 0, {"deliver": 3})
    assert len(cli_json(settings, "show", "1")["messages"]) == 3


def test_queue_only_leaves_delivery_to_the_daemon(settings: Settings) -> None:
    """`ingest --queue-only` stores and queues; `queue flush` delivers later."""
    code, _, err = run_cli(settings, "ingest", "--queue-only", str(CHAIRS / "01-customer-asks.eml"))
    assert code == 0, err
    assert maildir_messages(settings, "sales") == []
    [item] = cli_json(settings, "queue")
    assert (item["kind"], item["account"], item["status"]) == ("deliver", "sales", "pending")
    code, out, _ = run_cli(settings, "queue", "flush")
    assert (code, out.strip()) == (0, "attempted 1 item(s)")
    assert cli_json(settings, "queue") == []
    assert len(maildir_messages(settings, "sales")) == 1


# --------------------------------------------------------------------------- installed command


def test_installed_command_runs_the_walkthrough(settings: Settings) -> None:
    """The installed `mailrouter` script ingests, transfers and shows, with exit 0."""
    exe = Path(sys.executable).parent / "mailrouter"
    if not exe.exists():
        pytest.skip(f"{exe} not installed (pip install -e .)")
    env = subprocess_env(settings)
    base = [str(exe), "-c", str(settings.config_path)]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    first = run("ingest", "--account", "sales", str(CHAIRS / "01-customer-asks.eml"))
    assert first.returncode == 0, first.stderr
    assert "event=decision" in first.stderr  # the routing log, one line per decision
    moved = run("transfer", "1", "--to", "support", "--by", "bob")
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout.strip() == "interaction 1: sales -> support; notice queued"
    shown = run("show", "1", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["account"] == "support"


def test_closed_interaction_cannot_be_transferred_and_new_mail_reopens_it(
    settings: Settings,
) -> None:
    """`close` then `transfer` is refused (exit 1, nothing changed); customer mail reopens it."""
    ingest(settings, "01-customer-asks.eml")
    assert run_cli(settings, "close", "1")[0] == 0
    before = snapshot(settings)
    code, _, err = run_cli(settings, "transfer", "1", "--to", "support")
    assert code == 1 and "transfer refused: interaction 1 is closed" in err
    assert snapshot(settings) == before
    ingest(settings, "02-customer-adds-detail.eml")
    [row] = cli_json(settings, "interactions")
    assert (row["status"], row["unread"], row["account"]) == ("open", True, "sales")


def test_pick_refuses_an_interaction_another_agent_picked(settings: Settings) -> None:
    """A second agent's `pick` exits 1 unless --force; the first pick marks it read."""
    ingest(settings, "01-customer-asks.eml")
    assert run_cli(settings, "pick", "1", "--agent", "alice")[0] == 0
    code, _, err = run_cli(settings, "pick", "1", "--agent", "bob")
    assert code == 1 and "already picked by alice" in err
    assert run_cli(settings, "pick", "1", "--agent", "bob", "--force")[0] == 0
    [row] = cli_json(settings, "interactions")
    assert (row["assigned_agent"], row["unread"]) == ("bob", False)


def test_log_format_json_gives_one_object_per_decision(settings: Settings) -> None:
    """--log-format json: each routing decision is one JSON object with the same fields."""
    import json

    code, _, err = run_cli(
        settings, "--log-format", "json", "ingest", str(CHAIRS / "01-customer-asks.eml")
    )
    assert code == 0
    decisions = [
        json.loads(line) for line in err.splitlines() if line.startswith("{") and "decision" in line
    ]
    assert len(decisions) == 1
    d = decisions[0]
    assert (d["event"], d["rule"], d["action"], d["account"]) == (
        "decision",
        "new-interaction",
        "deliver",
        "sales@example.test",
    )
    assert d["interaction"] == 1 and d["msgid"].startswith("<")


def test_read_only_commands_do_not_wait_for_the_write_lock(settings: Settings) -> None:
    """``interactions`` and ``show`` answer while another process holds SQLite's write lock."""
    import sqlite3

    assert run_cli(settings, "ingest", str(CHAIRS / "01-customer-asks.eml"))[0] == 0
    db_file = settings.database_url.removeprefix("sqlite:///")
    writer = sqlite3.connect(db_file, isolation_level=None, timeout=0.1)
    writer.execute("BEGIN IMMEDIATE")  # what a busy ingest holds for the length of a batch
    try:
        rows = cli_json(settings, "interactions")
        assert [r["id"] for r in rows] == [1]
        assert cli_json(settings, "show", "1")["id"] == 1
    finally:
        writer.rollback()
        writer.close()


def test_a_listing_into_a_closed_pipe_exits_quietly(settings: Settings, tmp_path: Path) -> None:
    """`mailrouter interactions | head -1` prints no BrokenPipeError traceback."""
    mail = tmp_path / "mail"
    mail.mkdir()
    for n in range(400):  # a listing well past the 64 KiB a pipe buffers
        (mail / f"{n}.eml").write_bytes(
            f"From: c{n}@customer.test\nTo: sales@example.test\nSubject: question {n}\n"
            f"Message-ID: <q{n}@customer.test>\n\nhello\n".encode()
        )
    assert run_cli(settings, "ingest", "--queue-only", str(mail))[0] == 0
    cmd = (
        f"{sys.executable} -m mailrouter -c {settings.config_path} interactions --json"
        " | head -c 10 > /dev/null"
    )
    done = subprocess.run(
        ["bash", "-c", cmd], env=subprocess_env(settings), capture_output=True, timeout=60
    )
    assert b"Traceback" not in done.stderr, done.stderr.decode()
    assert b"BrokenPipeError" not in done.stderr
