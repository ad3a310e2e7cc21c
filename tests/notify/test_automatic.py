"""Automatic mail is recognised (RFC 3834 and common practice), so no notice answers it.

Unit cases for every marker the issue names, then the bounce and auto-reply corpora: every
message there is classified automatic, except the few listed with the reason they are not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mailrouter.ingest.replay import split_mbox
from mailrouter.parse import parse

PERSONAL = b"From: Alice <alice@customer.test>\nTo: sales@example.test\nSubject: chairs\n"


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (b"Auto-Submitted: auto-replied\n", "auto-submitted: auto-replied"),
        (b"Auto-Submitted: auto-generated; owner-email=x@y\n", "auto-submitted: auto-generated"),
        (b"X-Autoreply: yes\n", "auto-reply (X-Autoreply)"),
        (b"X-Apple-Action: VACATION\n", "auto-reply (X-Apple-Action: vacation)"),
        (b"Precedence: bulk\n", "precedence: bulk"),
        (b"Precedence: junk\n", "precedence: junk"),
        (b"Precedence: list\n", "precedence: list"),
        (b"List-Id: <chairs.lists.test>\n", "mailing list (List-Id)"),
        (b"List-Subscribe: <mailto:x@lists.test>\n", "mailing list (List-Subscribe)"),
        (
            b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\n",
            "delivery or disposition report (multipart/report)",
        ),
        (b"Return-Path: <>\n", "null sender"),
        (b"Return-Path: <MAILER-DAEMON@mx.customer.test>\n", "bounce (return path mailer-daemon)"),
        (b"X-Loop: chairs@customer.test\n", "mail loop (X-Loop)"),
        (b"X-Mailrouter-Loop: mailrouter.example.test\n", "mail loop"),
    ],
)
def test_automatic_markers_are_recognised(headers: bytes, reason: str) -> None:
    """Each marker alone makes an otherwise personal message automatic."""
    assert parse(PERSONAL + b"\n").automatic is None
    automatic = parse(headers + PERSONAL + b"\nbody\n").automatic
    assert automatic is not None and automatic.startswith(reason)


@pytest.mark.parametrize(
    "sender",
    [
        b"MAILER-DAEMON@mx.customer.test",
        b"Mail Delivery System <MAILER-DAEMON@mx.customer.test>",
        b"MAILER-DAEMON (Mail Delivery System)",
        b"Postmaster <>",
        b"<Postmaster\\@xxx.test@xxx.test>",
        b'"System Administrator"@xxx.test',
        b"no-reply@shop.test",
    ],
)
def test_robot_senders_are_automatic(sender: bytes) -> None:
    """Bounce senders (MAILER-DAEMON, postmaster) and no-reply addresses are never answered."""
    raw = b"From: " + sender + b"\nTo: sales@example.test\nSubject: hello\n\nbody\n"
    assert parse(raw).automatic is not None


def test_null_envelope_sender_is_automatic() -> None:
    """MAIL FROM:<> is a bounce, whatever the headers say."""
    assert parse(PERSONAL + b"\n", envelope_sender="").automatic == "null sender"


def test_auto_submitted_no_is_personal_mail() -> None:
    """``Auto-Submitted: no`` is what a person's mail may say about itself."""
    assert parse(b"Auto-Submitted: no\n" + PERSONAL + b"\n").automatic is None


def test_a_customer_subject_about_a_failed_delivery_is_personal() -> None:
    """Subject markers are mail-system wordings, not words a customer writes."""
    raw = PERSONAL.replace(b"chairs", b"Delivery of order 7 failed") + b"\n"
    assert parse(raw).automatic is None


# --------------------------------------------------------------------------- corpora

# Messages in the bounce and auto-reply corpora that we do not classify automatic, each
# with the reason.  Any other unclassified message fails, and so does a listed one that
# becomes automatic (the list must stay true).
NOT_AUTOMATIC: dict[str, str] = {
    "flufl-bounce/simple_20.txt": (
        "a gateway's non-delivery note sent as ordinary mail: a person-like sender "
        "(Dsicspiibs.spi-internet@…), text/plain, no bounce header, subject 'RE: Your "
        "message to GPC-talk awaits moderator approval : non remis'; only the body says so"
    ),
    "sisimai/mailbox/mbox-0#35": (
        "a person forwarding a bounce ('Fwd: Returned mail: …'): written by a human, so "
        "rightly not automatic"
    ),
    "sisimai/maildir/not/is-not-bounce-01.eml": "upstream's counter-example: ordinary mail",
    "sisimai/maildir/not/is-not-bounce-02.eml": (
        "upstream's counter-example: ordinary mail with a message/rfc822 attachment"
    ),
}
# Upstream files sisimai/maildir/not/rb-issue-368-bug.eml as "not a bounce", but it says
# Auto-Submitted: auto-replied: for us it is automatic (no notice), which is what we want.

# Discourse's receiver spec says which of its fixtures are bounces or auto-generated.
DISCOURSE_AUTOMATIC = {
    "auto_reply.eml",
    "auto_generated_header.eml",
    "auto_generated_precedence.eml",
    "auto_generated_subject.eml",
    "bounced_email.eml",
    "bounced_email_multiple_status_codes.eml",
    "hard_bounce_via_verp.eml",
    "invalid_from_2.eml",
    "mailman_1.eml",
    "mailinglist_dmarc_fail.eml",
}

_METADATA = ("LICENSE", "COPYING", "NOTICE", "README", "SOURCE")


def messages(folder: Path) -> Iterator[tuple[str, bytes]]:
    """(label, raw) for every message in ``folder``; mbox members are ``file#index``."""
    root = folder.parent
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.name.startswith(_METADATA) or f.suffix == ".tsv":
            continue
        label = str(f.relative_to(root))
        data = f.read_bytes()
        if f.parent.name == "mailbox":
            for i, raw in enumerate(split_mbox(data)):
                yield f"{label}#{i}", raw
        else:
            yield label, data


@pytest.mark.corpora
@pytest.mark.parametrize("folder", ["flufl-bounce", "sisimai"])
def test_every_bounce_and_auto_reply_in_the_corpora_is_automatic(
    corpora: Path, folder: str
) -> None:
    """flufl-bounce and sisimai: all automatic but the listed exceptions."""
    seen, missed = 0, set()
    for label, raw in messages(corpora / folder):
        msg = parse(raw)
        if msg.problem is not None:
            continue  # sisimai's 0-, 1- and 3-byte mailboxes hold no message
        seen += 1
        if msg.automatic is None:
            missed.add(label)
    expected = {k for k in NOT_AUTOMATIC if k.startswith(f"{folder}/")}
    assert missed == expected
    assert seen > 100


@pytest.mark.corpora
def test_discourse_bounces_and_auto_replies_are_automatic_and_replies_are_not(
    corpora: Path,
) -> None:
    """The Discourse receiver fixtures split exactly as its spec says."""
    automatic = {
        label.rpartition("/")[2]
        for label, raw in messages(corpora / "discourse-email-receiver")
        if parse(raw).automatic is not None
    }
    assert automatic == DISCOURSE_AUTOMATIC
