"""The eleven seed rules (DESIGN §2), one test each, driven by recorded scenarios.

Every test plays a story from ``fixtures/scenarios/`` through the public API (the pipeline,
``transfer``, ``reply``, ``report``, the views behind ``--json``) and looks at what an
operator would look at: the store, the Maildir files on disk and the pickup directory.
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import mailrouter.deliver.outbox
import mailrouter.pipeline
import mailrouter.runtime
from helpers import (
    NOTICE_PLACEHOLDER,
    SCENARIOS,
    TEMPLATES,
    accept,
    counts,
    detail,
    flush,
    header,
    ids_in,
    interactions,
    maildir_messages,
    make_settings,
    pickup_messages,
    pipeline,
    plain_body,
    raw_headers,
    run_cli,
    scenario,
)
from mailrouter.notify import check_templates
from mailrouter.reply import reply
from mailrouter.report import report
from mailrouter.transfer import TransferRefused, transfer

CHAIRS = "chairs-quote"
CHAIRS_1 = "CAF3k9x1.chairs.0001@mail.customer.example"
CHAIRS_2 = "CAF3k9x1.chairs.0002@mail.customer.example"
INVOICE = "invoice-vat-chain"
INVOICE_2 = "20260305144736.8c02d4@werkstatt.example"


def trace(interaction_id: int, routed_from: str | None = None) -> bytes:
    """The header lines a delivered copy starts with (the Maildir file uses LF)."""
    out = f"X-Mailrouter-Interaction: {interaction_id}\n"
    if routed_from:
        out += f"X-Mailrouter-Routed-From: {routed_from}\n"
    return out.encode()


def start_chairs(p: mailrouter.runtime.Runtime, *files: str) -> int:
    """The customer's first two mails to sales@ (or the given ones), delivered; the id."""
    iid = None
    for f in files or ("01-customer-asks.eml", "02-customer-adds-detail.eml"):
        r = accept(p, scenario(CHAIRS, f))
        assert r.interaction_id is not None, r.decision
        iid = iid or r.interaction_id
        assert r.interaction_id == iid
    flush(p)
    assert iid is not None
    return iid


def template_dir_with(tmp_path: Path, **templates: str) -> Path:
    """The repository's templates plus extra ``NAME.txt.j2`` files, in a temporary dir."""
    target = tmp_path / "templates"
    shutil.copytree(TEMPLATES, target)
    for name, text in templates.items():
        (target / f"{name}.txt.j2").write_text(text, "utf-8")
    return target


# --------------------------------------------------------------------------- rule 1


@pytest.mark.parametrize(
    ("account", "table", "story"),
    [
        ("support", {"enabled": False}, "warranty-claim"),
        ("billing", None, "double-charge"),  # no [transfer] table: the default is false
    ],
    ids=["enabled-false", "default"],
)
def test_transfer_refused_when_source_account_has_transfer_disabled(
    tmp_path: Path, account: str, table: dict[str, bool] | None, story: str
) -> None:
    """Transfer out of an account without transfer.enabled is refused and changes nothing."""
    settings = make_settings(tmp_path, **{account: table})
    assert settings.account(account).transfer.enabled is False
    with pipeline(settings) as p:
        iid = accept(p, scenario(story, "01-customer-asks.eml")).interaction_id
        assert iid is not None
        flush(p)
        assert run_cli(settings, "pick", str(iid), "--agent", "alice")[0] == 0
        before, rows = detail(p, iid), counts(p)

        with pytest.raises(TransferRefused, match=f"out of account {account} is not enabled"):
            transfer(p, iid, "sales", actor="bob")
        flush(p)

        after = detail(p, iid)
        assert after == before
        assert (after["account"], after["unread"], after["assigned_agent"]) == (
            account,
            False,
            "alice",
        )
        assert after["transfers"] == []
        assert counts(p) == rows
    assert pickup_messages(settings) == []


# --------------------------------------------------------------------------- rule 2


def test_notice_sent_on_transfer_when_source_account_notifies(tmp_path: Path) -> None:
    """An account with transfer.notify sends the customer a notice on transfer, unasked."""
    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        iid = start_chairs(p, "01-customer-asks.eml")
        r = transfer(p, iid, "support", actor="bob")
        assert (r.notification, r.reason) == ("queued", None)
        assert flush(p) == 1
        t = detail(p, iid)["transfers"][0]
        assert t["notification"] == "sent"
        assert t["notification_message_id"] == f"<{r.notice_message_id}>"
    [notice] = pickup_messages(settings)
    assert header(notice, "Message-ID") == f"<{r.notice_message_id}>"
    assert header(notice, "To") == "Anna Berg <anna.berg@customer.example>"


@pytest.mark.parametrize(
    "sales", [{"enabled": True}, {"enabled": True, "notify": False}], ids=["default", "false"]
)
def test_no_notice_when_source_account_notify_off(tmp_path: Path, sales: dict[str, bool]) -> None:
    """Without transfer.notify (default off) a transfer sends the customer nothing."""
    settings = make_settings(tmp_path, sales=sales)
    assert settings.account("sales").transfer.notify is False
    with pipeline(settings) as p:
        iid = start_chairs(p)
        r = transfer(p, iid, "support", actor="bob")
        assert (r.notification, r.notice_message_id, r.outbox_id) == ("off", None, None)
        assert flush(p) == 0
        shown = detail(p, iid)
        assert [m["direction"] for m in shown["messages"]] == ["inbound", "inbound"]
        assert shown["transfers"][0]["notification"] == "off"
    assert pickup_messages(settings) == []


# --------------------------------------------------------------------------- rule 3


def test_notice_template_gets_fromAccount_and_toAccount(tmp_path: Path) -> None:
    """The template sees {{fromAccount}} and {{toAccount}} under exactly these names."""
    tdir = template_dir_with(tmp_path, moved="Moved from {{fromAccount}} to {{toAccount}}.\n")
    settings = make_settings(
        tmp_path,
        template_dir=tdir,
        sales={"enabled": True, "notify": True, "template": "moved"},
    )
    assert check_templates(settings) == []
    with pipeline(settings) as p:
        iid = start_chairs(p, "01-customer-asks.eml")
        transfer(p, iid, "support@example.test", actor="bob")
        flush(p)
    [notice] = pickup_messages(settings)
    assert plain_body(notice).strip() == "Moved from sales@example.test to support@example.test."
    # No subject template: the threading-friendly default, with the interaction's token.
    assert header(notice, "Subject") == f"Re: Quote for 40 office chairs [#{iid}]"


def test_notice_template_with_undefined_variable_fails_the_notice_not_the_transfer(
    tmp_path: Path,
) -> None:
    """A template naming an undefined variable is reported by check-config; at transfer
    time the transfer still happens, and the notice is recorded as failed with the error,
    visible in `show` and `queue` (it refused the transfer before, see CHANGELOG)."""
    tdir = template_dir_with(tmp_path, broken="From {{ fromAccount }} to {{ toAcount }}.\n")
    settings = make_settings(
        tmp_path,
        template_dir=tdir,
        sales={"enabled": True, "notify": True, "template": "broken"},
    )
    [problem] = check_templates(settings)
    assert problem.startswith("accounts.sales.transfer.template: ")
    assert f"{tdir / 'broken.txt.j2'}:1: undefined variable" in problem
    assert "toAcount" in problem
    error = r"notice template of account sales failed: .*broken\.txt\.j2:1: undefined variable"
    with pipeline(settings) as p:
        iid = start_chairs(p)
        r = transfer(p, iid, "support", actor="bob")
        assert (r.from_account, r.to_account, r.notification) == ("sales", "support", "failed")
        assert r.reason is not None and re.match(error, r.reason)
        assert r.notice_message_id is None and r.outbox_id is not None
        assert flush(p) == 0  # nothing to send: the failed row is never claimed
        shown = detail(p, iid)
    assert (shown["account"], shown["unread"], shown["distribution"]) == ("support", True, "manual")
    [t] = shown["transfers"]
    assert (t["from"], t["to"], t["notification"]) == ("sales", "support", "failed")
    assert re.match(error, t["notification_reason"])
    assert [m["direction"] for m in shown["messages"]] == ["inbound", "inbound"]
    code, out, _ = run_cli(settings, "queue", "--json")
    assert code == 0
    [row] = json.loads(out)
    assert (row["id"], row["kind"], row["status"], row["interaction"]) == (
        r.outbox_id,
        "notify",
        "failed",
        iid,
    )
    assert re.match(error, row["last_error"])
    assert pickup_messages(settings) == []


# --------------------------------------------------------------------------- rule 4


def test_notice_is_threaded_reply_to_last_customer_message_before_transfer(
    tmp_path: Path,
) -> None:
    """The notice answers the last customer mail: To, In-Reply-To, References, Subject, From."""
    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        iid = start_chairs(p)  # 01, then 02 (with a Reply-To): 02 is the one to answer
        r = transfer(p, iid, "support", actor="bob")
        flush(p)
    [notice] = pickup_messages(settings)
    assert b"\r\n\r\n" in notice  # SMTP line endings throughout
    assert header(notice, "To") == "purchasing@customer.example"  # Reply-To beats From
    assert header(notice, "From") == "Example Support <support@example.test>"  # the NEW account
    assert header(notice, "Message-ID") == f"<{r.notice_message_id}>"
    assert header(notice, "In-Reply-To") == f"<{CHAIRS_2}>"
    assert header(notice, "References") == f"<{CHAIRS_1}> <{CHAIRS_2}>"
    # Not "Re: Re:"; the token lets a reply that drops References thread.
    assert header(notice, "Subject") == f"Re: Quote for 40 office chairs [#{iid}]"
    assert header(notice, "Auto-Submitted") == "auto-generated"
    for name in ("Message-ID", "In-Reply-To", "References"):
        assert "=?" not in header(notice, name)


@pytest.mark.parametrize("automatic", ["02-customer-auto-reply.eml", "03-bounce.eml"])
def test_no_notice_when_last_customer_message_is_automatic(tmp_path: Path, automatic: str) -> None:
    """No notice answers an auto-reply or a bounce, even from a notifying account."""
    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        first = accept(p, scenario("out-of-office", "01-customer-asks.eml"))
        auto = accept(p, scenario("out-of-office", automatic))
        assert auto.interaction_id == first.interaction_id is not None
        flush(p)
        r = transfer(p, first.interaction_id, "support", actor="bob")
        assert r.notification == "suppressed"
        assert r.reason is not None
        assert r.reason.startswith("last customer message is automatic")
        flush(p)
        t = detail(p, first.interaction_id)["transfers"][0]
        assert (t["notification"], t["notification_message_id"]) == ("suppressed", None)
    assert pickup_messages(settings) == []


def test_chain_a_b_c_second_notice_names_b_as_fromAccount_and_follows_b_settings(
    tmp_path: Path,
) -> None:
    """In A→B→C the second notice follows B's settings, names B as fromAccount, is from C."""
    tdir = template_dir_with(
        tmp_path, handover="fromAccount={{fromAccount}}\ntoAccount={{toAccount}}\n"
    )
    settings = make_settings(
        tmp_path,
        template_dir=tdir,
        support={"enabled": True, "notify": True, "template": "handover"},
    )
    with pipeline(settings) as p:
        iid = accept(p, scenario(INVOICE, "01-customer-asks.eml")).interaction_id
        assert iid is not None
        first = transfer(p, iid, "support", actor="bob")
        accept(p, scenario(INVOICE, "02-customer-writes-to-support.eml"))
        second = transfer(p, iid, "billing", actor="carol")
        flush(p)
    assert (first.notification, second.notification) == ("queued", "queued")
    notice_ab, notice_bc = pickup_messages(settings)
    assert "passed it on from sales@example.test" in plain_body(notice_ab)  # A's template
    assert header(notice_ab, "From") == "Example Support <support@example.test>"
    assert (
        plain_body(notice_bc)
        == "fromAccount=support@example.test\ntoAccount=billing@example.test\n"
    )
    assert header(notice_bc, "From") == "Billing <billing@example.test>"
    assert header(notice_bc, "In-Reply-To") == f"<{INVOICE_2}>"  # the last before B→C
    assert header(notice_bc, "Subject") == f"Re: Invoice 2026-0412: wrong VAT rate [#{iid}]"


def test_chain_a_b_c_no_second_notice_when_b_does_not_notify(tmp_path: Path) -> None:
    """In A→B→C with B's notify off, only A→B sends a notice, though A notifies."""
    settings = make_settings(tmp_path, support={"enabled": True, "notify": False})
    with pipeline(settings) as p:
        iid = accept(p, scenario(INVOICE, "01-customer-asks.eml")).interaction_id
        assert iid is not None
        first = transfer(p, iid, "support", actor="bob")
        accept(p, scenario(INVOICE, "02-customer-writes-to-support.eml"))
        second = transfer(p, iid, "billing", actor="carol")
        flush(p)
    assert (first.notification, second.notification) == ("queued", "off")
    [notice] = pickup_messages(settings)
    assert header(notice, "Message-ID") == f"<{first.notice_message_id}>"


# --------------------------------------------------------------------------- rule 5


def test_transferred_interaction_is_unread_unassigned_in_new_account_list(tmp_path: Path) -> None:
    """After transfer the interaction is listed under the new account, unread and unassigned."""
    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        iid = start_chairs(p)
        assert run_cli(settings, "pick", str(iid), "--agent", "alice")[0] == 0
        picked = interactions(p, account="sales")[0]
        assert (picked["unread"], picked["assigned_agent"]) == (False, "alice")

        transfer(p, iid, "support", actor="alice")

        assert interactions(p, account="sales") == []
    code, out, _ = run_cli(settings, "interactions", "--account", "support", "--unread", "--json")
    assert code == 0
    [row] = json.loads(out)
    assert (row["id"], row["account"], row["unread"], row["assigned_agent"]) == (
        iid,
        "support",
        True,
        None,
    )


# --------------------------------------------------------------------------- rule 6


def test_no_automatic_return(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither time, the outbox worker nor new mail to the old address moves it back."""
    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        iid = start_chairs(p)
        transfer(p, iid, "support", actor="bob")
        flush(p)
        accept(p, scenario(CHAIRS, "03-customer-replies-to-sales.eml"))
        flush(p)
    # A year later, after a restart: whatever runs on a clock has had every chance to act.
    later = datetime.now(UTC) + timedelta(days=365)
    monkeypatch.setattr(mailrouter.pipeline, "utcnow", lambda: later)
    monkeypatch.setattr(mailrouter.deliver.outbox, "utcnow", lambda: later)
    with pipeline(settings) as p:
        assert flush(p) == 0
        r = accept(p, scenario(CHAIRS, "04-customer-replies-references-only.eml"))
        assert (r.decision.action, r.decision.owner) == ("route", "support")
        flush(p)
        shown = detail(p, iid)
        assert shown["account"] == "support"
        assert len(shown["transfers"]) == 1
        assert shown["last_activity_at"] == later.isoformat()
    assert len(maildir_messages(settings, "sales")) == 2  # only the two before the transfer
    assert len(maildir_messages(settings, "support")) == 2  # 03 and 04, routed


# --------------------------------------------------------------------------- rule 7


@pytest.mark.parametrize(
    ("reply_file", "rule"),
    [
        ("03-customer-replies-to-sales.eml", "in-reply-to"),
        ("04-customer-replies-references-only.eml", "references"),
    ],
    ids=["in-reply-to", "references-only"],
)
def test_reply_to_old_account_routes_to_new_owner(
    tmp_path: Path, reply_file: str, rule: str
) -> None:
    """A customer reply to the old account lands, byte for byte, in the new owner's Maildir."""
    settings = make_settings(tmp_path)
    raw = scenario(CHAIRS, reply_file)
    with pipeline(settings) as p:
        iid = start_chairs(p)
        transfer(p, iid, "support", actor="bob")
        r = accept(p, raw)  # addressed to sales@ only
        assert (r.interaction_id, r.decision.action, r.decision.rule) == (iid, "route", rule)
        assert r.decision.deliver_to == "support"
        flush(p)
    assert maildir_messages(settings, "support") == [trace(iid, "sales@example.test") + raw]
    assert maildir_messages(settings, "sales") == [
        trace(iid) + scenario(CHAIRS, "01-customer-asks.eml"),
        trace(iid) + scenario(CHAIRS, "02-customer-adds-detail.eml"),
    ]


def test_chain_a_b_c_old_address_reply_goes_to_current_owner(tmp_path: Path) -> None:
    """After A→B→C a reply addressed to A is delivered to C, the current owner."""
    settings = make_settings(tmp_path)
    raw = scenario(INVOICE, "03-customer-replies-to-sales.eml")
    with pipeline(settings) as p:
        iid = accept(p, scenario(INVOICE, "01-customer-asks.eml")).interaction_id
        assert iid is not None
        transfer(p, iid, "support", actor="bob")
        accept(p, scenario(INVOICE, "02-customer-writes-to-support.eml"))
        transfer(p, iid, "billing", actor="carol")
        r = accept(p, raw)
        assert (r.interaction_id, r.decision.action, r.decision.deliver_to) == (
            iid,
            "route",
            "billing",
        )
        flush(p)
    assert maildir_messages(settings, "billing") == [trace(iid, "sales@example.test") + raw]
    assert len(maildir_messages(settings, "sales")) == 1  # 01 only
    assert len(maildir_messages(settings, "support")) == 1  # 02 only


@pytest.mark.parametrize(
    "envelopes",
    [[("sales", "support")], [("sales",), ("support",)], [("support",), ("sales",)]],
    ids=["one-delivery", "sales-copy-first", "support-copy-first"],
)
def test_cc_to_old_and_new_account_is_stored_once_and_delivered_once(
    tmp_path: Path, envelopes: list[tuple[str, ...]]
) -> None:
    """A mail to sales@ with Cc support@ attaches once and the owner gets one copy."""
    settings = make_settings(tmp_path)
    raw = scenario(CHAIRS, "05-customer-cc-sales-and-support.eml")
    with pipeline(settings) as p:
        iid = start_chairs(p)
        transfer(p, iid, "support", actor="bob")
        actions = [accept(p, raw, *accounts).decision.action for accounts in envelopes]
        assert actions[1:] == ["attach"] * (len(envelopes) - 1)
        flush(p)
        messages = [m for m in detail(p, iid)["messages"] if m["direction"] == "inbound"]
        assert [m["message_id"] for m in messages].count(
            "<CAF3k9x1.chairs.0005@mail.customer.example>"
        ) == 1
    [copy] = maildir_messages(settings, "support")
    assert copy.endswith(raw)
    assert len(maildir_messages(settings, "sales")) == 2  # 01 and 02 only


# --------------------------------------------------------------------------- rule 8


def test_transferred_interaction_is_manual_distribution(tmp_path: Path) -> None:
    """A new interaction is queue-distributed; after a transfer it is picked (manual)."""
    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        iid = start_chairs(p)
        assert detail(p, iid)["distribution"] == "queue"
        transfer(p, iid, "support", actor="bob")
        assert detail(p, iid)["distribution"] == "manual"
        accept(p, scenario(CHAIRS, "03-customer-replies-to-sales.eml"))  # new mail: still
        assert detail(p, iid)["distribution"] == "manual"


# --------------------------------------------------------------------------- rule 9


def test_messages_keep_original_addresses_and_routed_copy_has_trace_headers(
    tmp_path: Path,
) -> None:
    """Messages keep the account they were addressed to or sent from; routed copies get traces."""
    settings = make_settings(tmp_path)
    raw = scenario(CHAIRS, "03-customer-replies-to-sales.eml")
    with pipeline(settings) as p:
        iid = start_chairs(p)
        before = reply(p, iid, "Thank you, the quote follows today.\n", agent="alice")
        transfer(p, iid, "support", actor="alice")
        accept(p, raw)
        after = reply(p, iid, "Support here: we take it from now.\n", agent="dave")
        flush(p)
    code, out, _ = run_cli(settings, "show", str(iid), "--json")
    assert code == 0
    shown = json.loads(out)
    rows = [(m["direction"], m["account"], m["routed_to"], m["source"]) for m in shown["messages"]]
    assert rows == [
        ("inbound", "sales", None, "test"),
        ("inbound", "sales", None, "test"),
        ("outbound", "sales", None, "reply"),  # sent before the transfer: from sales@
        ("outbound", "support", None, "transfer-notice"),  # sent by the system after: support@
        ("inbound", "sales", "support", "test"),  # addressed to sales@, routed to support
        ("outbound", "support", None, "reply"),
    ]
    assert shown["messages"][2]["from"] == "Example Sales <sales@example.test>"
    assert shown["messages"][3]["from"] == "Example Support <support@example.test>"
    assert shown["messages"][4]["to"] == "sales@example.test"
    assert shown["messages"][5]["from"] == "Example Support <support@example.test>"

    [routed] = maildir_messages(settings, "support")
    headers = raw_headers(routed)
    assert headers["x-mailrouter-interaction"] == [str(iid)]
    assert headers["x-mailrouter-routed-from"] == ["sales@example.test"]
    assert headers["from"] == ["Anna Berg <anna.berg@customer.example>"]
    assert headers["to"] == ["sales@example.test"]
    assert routed.endswith(raw)  # every original header and the body, untouched
    sent = {header(m, "Message-ID"): m for m in pickup_messages(settings)}
    assert header(sent[f"<{before.message_id}>"], "From") == "Example Sales <sales@example.test>"
    assert header(sent[f"<{after.message_id}>"], "From") == (
        "Example Support <support@example.test>"
    )


# --------------------------------------------------------------------------- rule 10


def test_report_counts_interaction_under_current_account(tmp_path: Path) -> None:
    """The same report for the same period moves the interaction's figures with a transfer."""
    settings = make_settings(tmp_path)
    start = datetime.now(UTC) - timedelta(days=1)
    end = start + timedelta(days=2)

    def figures(p: mailrouter.runtime.Runtime) -> dict[str, dict[str, int]]:
        with p.db.read() as s:
            return {
                row["account"]: {k: v for k, v in row.items() if k not in ("account", "address")}
                for row in report(s, p, start, end)
            }

    zero = dict.fromkeys(
        ("interactions", "inbound", "outbound", "transfers_in", "transfers_out"), 0
    )
    with pipeline(settings) as p:
        iid = start_chairs(p)
        before = figures(p)
        transfer(p, iid, "support", actor="bob")  # sales notifies: one outbound notice
        after = figures(p)
    assert before == {
        "sales": {**zero, "interactions": 1, "inbound": 2},
        "support": zero,
        "billing": zero,
    }
    assert after == {
        "sales": {**zero, "transfers_out": 1},
        "support": {**zero, "interactions": 1, "inbound": 2, "outbound": 1, "transfers_in": 1},
        "billing": zero,
    }


# --------------------------------------------------------------------------- rule 11


def test_interaction_id_and_created_at_unchanged_by_transfer(tmp_path: Path) -> None:
    """Transfers keep the interaction's id and created_at, and each one is recorded."""
    settings = make_settings(
        tmp_path, support={"enabled": True, "notify": True, "template": "transfer_notice"}
    )
    with pipeline(settings) as p:
        iid = accept(p, scenario(INVOICE, "01-customer-asks.eml")).interaction_id
        assert iid is not None
        created = detail(p, iid)
        t0 = datetime.now(UTC)
        ab = transfer(p, iid, "support", actor="bob")
        accept(p, scenario(INVOICE, "02-customer-writes-to-support.eml"))
        bc = transfer(p, iid, "billing", actor="carol")
        t1 = datetime.now(UTC)
        flush(p)
        shown = detail(p, iid)
        assert ids_in(interactions(p)) == [iid]
    assert (shown["id"], shown["created_at"]) == (created["id"], created["created_at"])
    assert shown["origin_account"] == "sales"
    assert [(t["from"], t["to"], t["by"], t["notification"]) for t in shown["transfers"]] == [
        ("sales", "support", "bob", "sent"),
        ("support", "billing", "carol", "sent"),
    ]
    assert [t["notification_message_id"] for t in shown["transfers"]] == [
        f"<{ab.notice_message_id}>",
        f"<{bc.notice_message_id}>",
    ]
    at = [datetime.fromisoformat(t["at"]) for t in shown["transfers"]]
    assert t0 <= at[0] <= at[1] <= t1
    assert [header(m, "Message-ID") for m in pickup_messages(settings)] == [
        f"<{ab.notice_message_id}>",
        f"<{bc.notice_message_id}>",
    ]


# --------------------------------------------------------------------------- ingest


@pytest.mark.parametrize(
    "second", ["01-customer-asks.eml", "01-customer-asks.redelivered.eml"], ids=["same", "mta"]
)
def test_redelivered_message_is_not_duplicated(tmp_path: Path, second: str) -> None:
    """The same message delivered twice for the same account is stored and delivered once."""
    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        first = accept(p, scenario("redelivery", "01-customer-asks.eml"))
        flush(p)
        again = accept(p, scenario("redelivery", second))
        assert again.decision.action == "duplicate"
        assert again.message_pk == first.message_pk
        assert flush(p) == 0
        assert first.interaction_id is not None
        assert len(detail(p, first.interaction_id)["messages"]) == 1
        assert counts(p)["messages"] == 1
    assert len(maildir_messages(settings, "sales")) == 1


def test_message_without_message_id_gets_stable_synthetic_id(tmp_path: Path) -> None:
    """A message without Message-ID gets an id from its content, the same on redelivery."""
    settings = make_settings(tmp_path)
    story = "no-message-id"
    with pipeline(settings) as p:
        first = accept(p, scenario(story, "01-web-form-without-message-id.eml"))
        again = accept(p, scenario(story, "01-web-form-without-message-id.redelivered.eml"))
        assert first.interaction_id is not None
        [m] = detail(p, first.interaction_id)["messages"]
    assert again.decision.action == "duplicate"
    assert m["synthetic_id"] is True
    assert m["message_id"].endswith("@synthetic.mailrouter.invalid>")
    # Stable across runs and stores: a second, fresh store computes the same id.
    with pipeline(make_settings(tmp_path / "other")) as p2:
        r = accept(p2, scenario(story, "01-web-form-without-message-id.redelivered.eml"))
        assert r.interaction_id is not None
        assert detail(p2, r.interaction_id)["messages"][0]["message_id"] == m["message_id"]


def test_malformed_message_is_held_with_reason(tmp_path: Path) -> None:
    """An empty or headerless file is held with its reason, listed by `held`, not delivered."""
    settings = make_settings(tmp_path)
    files = [str(SCENARIOS / "malformed" / f) for f in ("empty.eml", "no-headers.eml")]
    code, out, _ = run_cli(settings, "ingest", "--account", "sales", "--json", *files)
    assert code == 0
    assert [d["action"] for d in json.loads(out)] == ["hold", "hold"]
    code, out, _ = run_cli(settings, "held", "--json")
    assert code == 0
    reasons = sorted(m["hold_reason"] for m in json.loads(out))
    assert reasons == ["empty message", "no header fields (not an RFC 5322 message)"]
    assert all(m["account"] == "sales" and m["status"] == "held" for m in json.loads(out))
    assert maildir_messages(settings, "sales") == []
    assert json.loads(run_cli(settings, "interactions", "--json")[1]) == []


def test_outbound_notice_message_id_threads_customer_reply(tmp_path: Path) -> None:
    """A customer reply to the notice joins the interaction and goes to the current owner."""
    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        iid = start_chairs(p)
        notice = transfer(p, iid, "support", actor="bob")
        assert notice.notice_message_id is not None
        transfer(p, iid, "billing", actor="dave")  # the owner has moved on since the notice
        raw = scenario(
            CHAIRS,
            "06-customer-replies-to-notice.eml",
            **{NOTICE_PLACEHOLDER: notice.notice_message_id},
        )
        r = accept(p, raw)  # addressed to support@, the notice's From
        assert r.interaction_id == iid
        assert (r.decision.rule, r.decision.matched_id) == ("in-reply-to", notice.notice_message_id)
        assert (r.decision.action, r.decision.deliver_to) == ("route", "billing")
        flush(p)
    assert maildir_messages(settings, "billing") == [trace(iid, "support@example.test") + raw]


def test_no_notice_when_the_last_message_came_with_a_null_envelope_sender(
    tmp_path: Path,
) -> None:
    """The classification stored at ingest (MAIL FROM:<>) decides, not a re-parse of the
    raw bytes, which do not carry the envelope."""
    from mailrouter.parse import parse
    from mailrouter.pipeline import Pipeline

    settings = make_settings(tmp_path)
    question = scenario(CHAIRS, "01-customer-asks.eml")
    with pipeline(settings) as p:
        first = accept(p, question)
        assert first.interaction_id is not None
        # Looks like personal mail from the customer; only the envelope says "bounce".
        answer = (
            b"From: Alice <alice@customer.test>\nTo: sales@example.test\n"
            b"Message-ID: <nullsender-1@customer.test>\n"
            b"In-Reply-To: <" + parse(question).message_id.encode() + b">\n"
            b"Subject: Re: chairs\n\nno bounce markers in here\n"
        )
        r = Pipeline(p).accept(
            answer, [settings.account("sales")], source="test", envelope_sender=""
        )
        assert r.interaction_id == first.interaction_id
        t = transfer(p, first.interaction_id, "support", actor="bob")
        assert t.notification == "suppressed"
        assert t.reason == "last customer message is automatic: null sender"
        flush(p)
    assert pickup_messages(settings) == []
