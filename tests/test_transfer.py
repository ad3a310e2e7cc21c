"""Transfer and its notice under trouble: a slow or broken template, a conversation that
changes meanwhile, a customer who already got today's share, our own accounts."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import mailrouter.transfer
from helpers import (
    TEMPLATES,
    accept,
    detail,
    flush,
    header,
    make_settings,
    pickup_messages,
    pipeline,
    run_cli,
    scenario,
)
from mailrouter.config import NotifySettings, Settings
from mailrouter.deliver.queue import requeue
from mailrouter.notify import check_templates
from mailrouter.reply import reply
from mailrouter.transfer import transfer

# Every test here runs on SQLite and on the real PostgreSQL (tests/servers.py).
pytestmark = pytest.mark.usefixtures("backend")

CHAIRS = "chairs-quote"
CHAIRS_2 = "CAF3k9x1.chairs.0002@mail.customer.example"
NESTED_LOOP = "{% set r = range(10000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}"


def with_template(tmp_path: Path, text: str, **notify: Any) -> Settings:
    tdir = tmp_path / "templates"
    shutil.copytree(TEMPLATES, tdir)
    (tdir / "custom.txt.j2").write_text(text, "utf-8")
    settings = make_settings(
        tmp_path, template_dir=tdir, sales={"enabled": True, "notify": True, "template": "custom"}
    )
    return settings.with_(notify=NotifySettings(**notify))


def mail(sender: str, mid: str, extra: str = "") -> bytes:
    return (
        f"From: {sender}\nTo: sales@example.test\nSubject: chairs\nMessage-ID: <{mid}>\n"
        f"{extra}\nhello\n"
    ).encode()


def test_a_template_that_loops_for_real_data_does_not_hold_the_write_lock(
    tmp_path: Path,
) -> None:
    """The notice renders outside the write transaction: other mail is stored meanwhile,
    and the transfer still happens when the render is stopped at its time limit."""
    settings = with_template(
        tmp_path,
        "{% if customer_name == 'Anna Berg' %}" + NESTED_LOOP + "{% endif %}Moved.\n",
        render_timeout=2.0,
    )
    assert check_templates(settings) == []  # the sample customer does not trigger it
    with pipeline(settings) as p:
        iid = accept(p, scenario(CHAIRS, "01-customer-asks.eml")).interaction_id
        assert iid is not None
        done: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: done.setdefault("r", transfer(p, iid, "support", actor="bob"))
        )
        worker.start()
        time.sleep(0.5)  # the render is under way
        started = time.monotonic()
        other = accept(p, mail("Bo <bo@other.test>", "bo-1@other.test"))
        stored_in = time.monotonic() - started
        worker.join(30)
        assert not worker.is_alive()
    assert other.interaction_id not in (None, iid)
    assert stored_in < 1.0  # it did not wait for the render
    r = done["r"]
    assert (r.to_account, r.notification) == ("support", "failed")
    assert "rendering took longer than 2 s (stopped)" in r.reason


def test_transfer_starts_over_when_the_interaction_changed_while_composing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A customer message arriving during the render is the one the notice answers."""
    settings = make_settings(tmp_path)
    calls: list[str] = []
    compose = mailrouter.transfer.compose_notice
    with pipeline(settings) as p:
        iid = accept(p, scenario(CHAIRS, "01-customer-asks.eml")).interaction_id
        assert iid is not None

        def compose_while_the_customer_writes(*args: Any, **kwargs: Any) -> Any:
            calls.append(kwargs["customer"].message_id)
            if len(calls) == 1:
                assert accept(p, scenario(CHAIRS, "02-customer-adds-detail.eml")).interaction_id
            return compose(*args, **kwargs)

        monkeypatch.setattr(
            mailrouter.transfer, "compose_notice", compose_while_the_customer_writes
        )
        r = transfer(p, iid, "support", actor="bob")
        flush(p)
        assert len(detail(p, iid)["transfers"]) == 1
    assert len(calls) == 2 and calls[1] == CHAIRS_2
    assert r.notification == "queued"
    [notice] = pickup_messages(settings)
    assert header(notice, "In-Reply-To") == f"<{CHAIRS_2}>"


def test_a_failed_notice_is_never_sent_even_when_retried(tmp_path: Path) -> None:
    """`queue retry` on a notice whose template failed fails again; nothing leaves."""
    settings = with_template(tmp_path, "{{ nope }}\n")
    with pipeline(settings) as p:
        iid = accept(p, scenario(CHAIRS, "01-customer-asks.eml")).interaction_id
        assert iid is not None
        flush(p)
        r = transfer(p, iid, "support")
        assert r.notification == "failed" and r.outbox_id is not None
        requeue(p, r.outbox_id)
        assert flush(p) == 1
    code, out, _ = run_cli(settings, "queue", "--json")
    assert code == 0 and '"status": "failed"' in out and "nothing to send" in out
    assert pickup_messages(settings) == []


def test_notices_to_one_customer_are_capped_per_day(tmp_path: Path) -> None:
    """Beyond notify.max_auto_per_customer_per_day, notices are suppressed with a reason."""
    settings = make_settings(tmp_path).with_(notify=NotifySettings(max_auto_per_customer_per_day=2))
    with pipeline(settings) as p:
        results = []
        for n in range(3):
            iid = accept(p, mail("Ann <ann@cust.test>", f"ann-{n}@cust.test")).interaction_id
            assert iid is not None
            results.append(transfer(p, iid, "support"))
        other = accept(p, mail("Bo <bo@other.test>", "bo-1@other.test")).interaction_id
        assert other is not None
        results.append(transfer(p, other, "support"))
        flush(p)
    assert [r.notification for r in results] == ["queued", "queued", "suppressed", "queued"]
    assert results[2].reason == (
        "automatic mail limit reached: 2 notices to ann@cust.test in 24 hours "
        "(notify.max_auto_per_customer_per_day = 2)"
    )
    assert len(pickup_messages(settings)) == 3


def test_no_notice_when_the_customer_is_one_of_our_accounts(tmp_path: Path) -> None:
    """Mail from support@ (ours) to sales@ gets no notice on transfer: we never mail us."""
    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        iid = accept(p, mail("Support <support@example.test>", "s-1@example.test")).interaction_id
        assert iid is not None
        r = transfer(p, iid, "billing")
        flush(p)
    assert (r.notification, r.reason) == (
        "suppressed",
        "customer address support@example.test is one of our own accounts",
    )
    assert pickup_messages(settings) == []


def test_reply_to_our_own_account_never_makes_us_mail_ourselves(tmp_path: Path) -> None:
    """Reply-To: sales@example.test: the notice and the agent's reply go to the From."""
    settings = make_settings(tmp_path)
    raw = mail("Ann <ann@cust.test>", "ann-1@cust.test", "Reply-To: sales@example.test\n")
    with pipeline(settings) as p:
        iid = accept(p, raw).interaction_id
        assert iid is not None
        assert transfer(p, iid, "support").notification == "queued"
        assert reply(p, iid, "Here you are.", agent="bob").to == ["ann@cust.test"]
        flush(p)
    sent = pickup_messages(settings)
    assert [header(m, "To") for m in sent] == ["Ann <ann@cust.test>"] * 2


def test_our_notice_coming_back_gets_no_notice(tmp_path: Path) -> None:
    """Our own notice routed back in (the loop header, Auto-Submitted) is never answered."""
    settings = make_settings(
        tmp_path, support={"enabled": True, "notify": True, "template": "transfer_notice"}
    )
    with pipeline(settings) as p:
        iid = accept(p, scenario(CHAIRS, "01-customer-asks.eml")).interaction_id
        assert iid is not None
        transfer(p, iid, "support")
        flush(p)
        [notice] = pickup_messages(settings)
        # Sent straight back to us (a forwarding rule at the customer's end, say).
        back = notice.replace(
            b"\r\nTo: Anna Berg <anna.berg@customer.example>", b"\r\nTo: support@example.test"
        )
        came_back = accept(p, back.replace(b"Message-ID: <", b"Message-ID: <again."))
        assert came_back.interaction_id == iid
        r = transfer(p, iid, "sales")
        flush(p)
    assert r.notification == "suppressed"
    assert r.reason is not None and r.reason.startswith("last customer message is automatic")
    assert len(pickup_messages(settings)) == 1
