"""What we send can be aimed only at the customer and carries no injected text: own
accounts and reflected Reply-Tos refused, control characters stripped, subjects and
notices capped, the loop header and the subject token on every message we write."""

from __future__ import annotations

import email
import email.policy
import itertools
import re
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailrouter.config import AccountSettings, NotifySettings, Settings, TransferSettings
from mailrouter.notify import (
    Composed,
    NoticeSuppressed,
    answer_address,
    compose_notice,
    compose_reply,
    notice_variables,
    suppression_reason,
)
from mailrouter.parse import ParsedMessage, parse

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "config" / "templates"
NOW = datetime(2024, 3, 12, 10, 30, tzinfo=UTC)
SALES = AccountSettings(
    "sales", "sales@example.test", "Sales", TransferSettings(True, True, "transfer_notice")
)
SUPPORT = AccountSettings("support", "support@example.test", "Support")
OWN = frozenset({SALES.address, SUPPORT.address})


def settings(**notify: object) -> Settings:
    return Settings(
        config_path=TEMPLATES / "mailrouter.toml",
        state_dir=TEMPLATES,
        database_url="sqlite://",
        auto_upgrade=False,
        accounts=(SALES, SUPPORT),
        template_dir=TEMPLATES,
        hostname="mr.example.test",
        notify=NotifySettings(**notify),  # type: ignore[arg-type]
    )


def customer(*headers: str, subject: str = "Order 7") -> ParsedMessage:
    lines = [
        *headers,
        "To: sales@example.test",
        f"Subject: {subject}",
        "Message-ID: <c1@cust.test>",
    ]
    return parse(("\r\n".join(lines) + "\r\n\r\nWhere is my order?\r\n").encode())


def notice(msg: ParsedMessage, s: Settings | None = None, iid: int = 42) -> Composed:
    return compose_notice(
        s or settings(),
        template="transfer_notice",
        from_account=SALES,
        to_account=SUPPORT,
        customer=msg,
        interaction_id=iid,
        agent="bob",
        now=NOW,
    )


def reply(msg: ParsedMessage, s: Settings | None = None) -> Composed:
    return compose_reply(
        s or settings(),
        account=SUPPORT,
        customer=msg,
        body_text="Here you are.\n",
        interaction_id=42,
        agent="bob",
        now=NOW,
    )


def headers_of(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


# --------------------------------------------------------------------------- our own accounts


def test_reply_to_naming_our_own_account_never_makes_us_mail_ourselves() -> None:
    """Reply-To: sales@… is ignored: notice and reply go to the customer's From."""
    msg = customer("From: Ann <ann@cust.test>", "Reply-To: sales@example.test")
    for composed in (notice(msg), reply(msg)):
        assert composed.envelope_to == ["ann@cust.test"]
        assert headers_of(composed.raw)["To"].addresses[0].addr_spec == "ann@cust.test"


def test_no_notice_to_a_customer_address_that_is_one_of_our_accounts() -> None:
    """A message From: support@… (one of ours) gets no notice: a loop in the making."""
    msg = customer("From: Support <support@example.test>")
    reason = "customer address support@example.test is one of our own accounts"
    assert suppression_reason(msg, OWN) == reason
    with pytest.raises(NoticeSuppressed, match="one of our own accounts"):
        notice(msg)


def test_agent_reply_to_one_of_our_accounts_is_refused() -> None:
    """An agent's reply is never addressed to one of our own accounts either."""
    with pytest.raises(ValueError, match="one of our own accounts"):
        reply(customer("From: sales@example.test"))


# --------------------------------------------------------------------------- reflector


def test_reply_to_in_another_domain_gets_no_automatic_notice() -> None:
    """RFC 3834 §4: an outsider's Reply-To would make the notice a reflector: suppressed."""
    msg = customer("From: Mallory <m@evil.test>", "Reply-To: victim@elsewhere.test")
    reason = suppression_reason(msg, OWN)
    assert reason == (
        "Reply-To victim@elsewhere.test is in another domain than From m@evil.test: "
        "not answered automatically (RFC 3834 §4)"
    )
    with pytest.raises(NoticeSuppressed):
        notice(msg)


def test_reply_to_in_the_senders_domain_is_answered() -> None:
    """Rule 4 stands: a Reply-To in the From's domain (or a subdomain) gets the notice."""
    for reply_to in ("orders@cust.test", "orders@eu.cust.test"):
        msg = customer("From: Ann <ann@cust.test>", f"Reply-To: {reply_to}")
        assert answer_address(msg, automatic=True, own=OWN) == (reply_to, None)
        assert notice(msg).envelope_to == [reply_to]


def test_agent_reply_follows_a_reply_to_in_another_domain() -> None:
    """A person chose to answer: their reply follows the Reply-To (rule 4) wherever it is."""
    msg = customer("From: Ann <ann@gmail.test>", "Reply-To: ann@work.test")
    assert reply(msg).envelope_to == ["ann@work.test"]


def test_notice_is_addressed_only_to_an_address_the_customer_named() -> None:
    """Envelope and To are the one address chosen from the customer's own headers."""
    msg = customer("From: Ann <ann@cust.test>", "Reply-To: orders@cust.test", "Cc: x@y.test")
    composed = notice(msg)
    parsed = headers_of(composed.raw)
    assert composed.envelope_to == ["orders@cust.test"]
    assert [a.addr_spec for a in parsed["To"].addresses] == ["orders@cust.test"]
    assert parsed["Cc"] is None and parsed["Bcc"] is None


# --------------------------------------------------------------------------- sizes


def test_a_huge_subject_is_capped_in_the_notice() -> None:
    """A 210 KB Subject gives a notice of a few KB, its subject cut to 200 characters."""
    msg = customer("From: Ann <ann@cust.test>", subject="A" * 210_000)
    composed = notice(msg)
    assert len(composed.raw) < 10_000
    subject = headers_of(composed.raw)["Subject"]
    assert subject.startswith("Re: AAAA") and subject.endswith("… [#42]")
    assert len(subject) <= 200 + len("Re: ") + len(" [#42]")
    assert len(reply(msg).raw) < 10_000


def test_template_variables_are_one_line_without_controls_and_capped() -> None:
    """Customer text reaches templates cleaned: no CR/LF or control bytes, at most 200."""
    msg = replace(
        customer("From: Ann <ann@cust.test>"),
        subject="Order\x007\x1b[2J\r\nBcc: x@y.test " + "z" * 500,
        from_name="Ann\r\n\x1b]0;pwned\x07 Lee",
    )
    variables = notice_variables(
        from_account=SALES,
        to_account=SUPPORT,
        interaction_id=1,
        customer=msg,
        agent=None,
        transferred_at=NOW,
    )
    for key in ("subject", "base_subject", "reply_subject", "customer_name"):
        value = str(variables[key])
        assert not re.search(r"[\x00-\x1f\x7f-\x9f]", value), key
        assert len(value) <= 200 + len("Re: ")
    assert variables["customer_name"] == "Ann ]0;pwned Lee"
    assert str(variables["subject"]).startswith("Order7[2J Bcc: x@y.test zzz")


# --------------------------------------------------------------------------- control characters


def test_nul_and_escape_in_the_subject_never_reach_a_header() -> None:
    """A NUL or an ESC in the customer's subject is stripped from the notice's Subject."""
    msg = replace(customer("From: Ann <ann@cust.test>"), subject="Order\x00 7\x1b[31m")
    for composed in (notice(msg), reply(msg)):
        head = composed.raw.partition(b"\r\n\r\n")[0]
        assert not re.search(rb"[\x00-\x08\x0b-\x1f\x7f]", head.replace(b"\r\n", b""))
        assert headers_of(composed.raw)["Subject"] == "Re: Order 7[31m [#42]"


def test_control_characters_in_the_display_name_are_stripped() -> None:
    """The customer's name is written without controls (and without a line break)."""
    msg = replace(customer("From: Ann <ann@cust.test>"), from_name="Ann\x00\x1b Lee\r\nBcc: x")
    to = headers_of(notice(msg).raw)["To"].addresses[0]
    assert (to.display_name, to.addr_spec) == ("Ann Lee Bcc: x", "ann@cust.test")


# --------------------------------------------------------------------------- loop header, token


def test_outbound_mail_carries_the_loop_header_and_notices_suppress_auto_replies() -> None:
    """Notices and replies carry X-Mailrouter-Loop; notices also Auto-Submitted and XARS."""
    msg = customer("From: Ann <ann@cust.test>")
    n, r = headers_of(notice(msg).raw), headers_of(reply(msg).raw)
    assert n["X-Mailrouter-Loop"] == r["X-Mailrouter-Loop"] == "mr.example.test"
    assert (n["Auto-Submitted"], n["X-Auto-Response-Suppress"]) == ("auto-generated", "All")
    assert (r["Auto-Submitted"], r["X-Auto-Response-Suppress"]) == (None, None)


def test_our_own_mail_coming_back_is_recognised_as_automatic() -> None:
    """A notice or reply of ours that comes back in is never answered."""
    msg = customer("From: Ann <ann@cust.test>")
    assert parse(notice(msg).raw).automatic is not None
    assert parse(reply(msg).raw).automatic == "mail loop (X-Mailrouter-Loop: mr.example.test)"


def test_message_ids_carry_no_guessable_counter() -> None:
    """128 random bits and the domain: no interaction id, no sequence."""
    msg = customer("From: Ann <ann@cust.test>")
    ids = [notice(msg, iid=i).message_id for i in range(1, 21)]
    randoms = []
    for i, mid in enumerate(ids, start=1):
        m = re.fullmatch(r"mailrouter\.([0-9a-f]{32})@example\.test", mid)
        assert m is not None, mid
        assert str(i) not in mid.split("@")[0].split(".")
        randoms.append(int(m.group(1), 16))
    assert len(set(randoms)) == len(randoms)
    # Consecutive ids are not close to each other, as a counter's would be.
    assert all(abs(a - b) > 2**64 for a, b in itertools.pairwise(randoms))


def test_notice_and_reply_subjects_carry_the_interaction_token() -> None:
    """The default token is [#<interaction>], once, at the end."""
    msg = customer("From: Ann <ann@cust.test>")
    assert notice(msg).subject == "Re: Order 7 [#42]"
    assert reply(msg).subject == "Re: Order 7 [#42]"
    again = customer("From: Ann <ann@cust.test>", subject="Re: Order 7 [#42]")
    assert notice(again).subject == "Re: Order 7 [#42]"  # not doubled


def test_subject_token_can_be_reshaped_or_turned_off() -> None:
    """[notify] subject_token decides the token; "" leaves subjects alone."""
    msg = customer("From: Ann <ann@cust.test>")
    assert notice(msg, settings(subject_token="[Ticket#{id}]")).subject == (
        "Re: Order 7 [Ticket#42]"
    )
    assert notice(msg, settings(subject_token="")).subject == "Re: Order 7"


def test_a_literal_encoded_word_in_the_subject_cannot_become_a_header() -> None:
    """A broken encoded-word left as text is not decoded again into CR/LF + Bcc:
    (found by tests/notify/test_fuzz.py; CPython < 3.11.10 wrote it raw, CVE-2024-6923)."""
    raw = (
        b"From: Ann <ann@cust.test>\r\nTo: sales@example.test\r\n"
        b"Subject: \xc2\xa1=?utf-8?q?=0D=0ABcc:_victim@evil.test?=\r\n"
        b"Message-ID: <c1@cust.test>\r\n\r\nhi\r\n"
    )
    msg = parse(raw)
    for composed in (notice(msg), reply(msg)):
        head = composed.raw.partition(b"\r\n\r\n")[0]
        assert not any(line.lower().startswith(b"bcc:") for line in head.split(b"\r\n"))
        subject = headers_of(composed.raw)["Subject"]
        assert "\r" not in subject and "\n" not in subject
        assert subject == "Re: ¡= ?utf-8?q?=0D=0ABcc:_victim@evil.test?= [#42]"


def test_an_address_that_would_need_quoting_is_not_usable() -> None:
    """Only dot-atom@host addresses are answered; others are refused, never half-written."""
    for address in (".@cust.test", "a..b@cust.test", "ann@cust..test", '"a b"@cust.test'):
        msg = customer(f"From: <{address}>")
        assert suppression_reason(msg, OWN) == "last customer message has no usable address"
        with pytest.raises(ValueError, match="no usable address"):
            reply(msg)
