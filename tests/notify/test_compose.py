"""Composed notices and agent replies, checked on the raw bytes they produce (DESIGN §2 rule 4)."""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import replace
from datetime import UTC, datetime
from email.message import EmailMessage, MIMEPart
from pathlib import Path

import pytest

from mailrouter.config import AccountSettings, Settings, TransferSettings
from mailrouter.notify import (
    Composed,
    NoticeSuppressed,
    TemplateError,
    compose_notice,
    compose_reply,
    reply_threading,
    suppression_reason,
)
from mailrouter.parse import ParsedMessage, parse

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_TEMPLATES = ROOT / "config" / "templates"
FIXTURES = ROOT / "fixtures" / "notify"
NOW = datetime(2024, 3, 12, 10, 30, 5, tzinfo=UTC)

SALES = AccountSettings(
    "sales",
    "sales@example.test",
    "Sales Team",
    TransferSettings(enabled=True, notify=True, template="transfer_notice"),
)
SUPPORT = AccountSettings(
    "support",
    "support@help.example.test",
    "Kundenservice Süd",
    TransferSettings(enabled=True, notify=True, template="transfer_notice"),
)
BILLING = AccountSettings("billing", "billing@example.test")


def settings_for(template_dir: Path = EXAMPLE_TEMPLATES, limit: int = 20) -> Settings:
    return Settings(
        config_path=template_dir / "mailrouter.toml",
        state_dir=template_dir,
        database_url="sqlite://",
        auto_upgrade=False,
        accounts=(SALES, SUPPORT, BILLING),
        template_dir=template_dir,
        references_limit=limit,
    )


def fixture(name: str) -> ParsedMessage:
    return parse((FIXTURES / name).read_bytes())


def notice(
    customer: ParsedMessage,
    *,
    settings: Settings | None = None,
    template: str = "transfer_notice",
    from_account: AccountSettings = SALES,
    to_account: AccountSettings = SUPPORT,
) -> Composed:
    return compose_notice(
        settings or settings_for(),
        template=template,
        from_account=from_account,
        to_account=to_account,
        customer=customer,
        interaction_id=42,
        agent="jdoe",
        now=NOW,
    )


def head_lines(raw: bytes) -> list[bytes]:
    """The physical header lines (continuation lines separate), without CRLF."""
    head = raw.partition(b"\r\n\r\n")[0]
    return head.split(b"\r\n")


def field(raw: bytes, name: str) -> list[bytes]:
    """One header field as its physical lines: first line plus continuation lines."""
    out: list[bytes] = []
    prefix = name.lower().encode() + b":"
    for line in head_lines(raw):
        if line.lower().startswith(prefix):
            out = [line]
        elif out and line[:1] in (b" ", b"\t"):
            out.append(line)
        elif out:
            break
    return out


def reparse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def text_of(part: MIMEPart | None) -> str:
    """A decoded text part with wire CRLFs turned back into newlines."""
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def with_references(count: int) -> ParsedMessage:
    """A customer message deep in a long thread: ``count`` References ids."""
    refs = "\r\n ".join(f"<thread.{i:03d}@customer.example>" for i in range(count))
    raw = (
        "From: Mark Jones <mark.jones@customer.example>\r\n"
        "To: sales@example.test\r\n"
        "Subject: Re: Order 7\r\n"
        "Message-ID: <latest@customer.example>\r\n"
        f"In-Reply-To: <thread.{count - 1:03d}@customer.example>\r\n"
        f"References: {refs}\r\n"
        "\r\n"
        "Still waiting.\r\n"
    ).encode()
    return parse(raw)


# --------------------------------------------------------------------------- recipients


def test_notice_to_is_reply_to_when_present() -> None:
    """To and the envelope recipient are the customer's Reply-To, not From."""
    composed = notice(fixture("customer_reply_to.eml"))
    assert field(composed.raw, "To") == [b"To: orders@customer.example"]
    assert composed.envelope_to == ["orders@customer.example"]


def test_notice_to_is_from_without_reply_to() -> None:
    """Without Reply-To the notice answers From, with the customer's name."""
    composed = notice(fixture("customer_plain.eml"))
    assert field(composed.raw, "To") == [b"To: Mark Jones <mark.jones@customer.example>"]
    assert composed.envelope_to == ["mark.jones@customer.example"]


def test_notice_from_is_new_account() -> None:
    """From and the envelope sender are the account the interaction moved *to*."""
    composed = notice(fixture("customer_plain.eml"))
    assert field(composed.raw, "From") == [
        b"From: Kundenservice =?utf-8?q?S=C3=BCd?= <support@help.example.test>"
    ]
    assert composed.envelope_from == "support@help.example.test"
    assert reparse(composed.raw)["From"].addresses[0].display_name == "Kundenservice Süd"


def test_encoded_display_name_does_not_change_notice_recipient() -> None:
    """=?utf-8?q?Doe=2C_John?= decodes to a comma; the address still comes from <...>."""
    composed = notice(fixture("encoded_comma_name.eml"))
    assert composed.envelope_to == ["john.doe@customer.example"]
    to = reparse(composed.raw)["To"].addresses[0]
    assert (to.display_name, to.addr_spec) == ("Doe, John (Einkauf)", "john.doe@customer.example")


# --------------------------------------------------------------------------- threading


def test_notice_in_reply_to_is_customer_message_id() -> None:
    """In-Reply-To names the last customer message, in angle brackets."""
    composed = notice(fixture("customer_reply_to.eml"))
    assert field(composed.raw, "In-Reply-To") == [
        b"In-Reply-To: <CAF3x9q7=order7.reply2@mail.customer.example>"
    ]


def test_notice_references_are_parent_references_plus_parent_id() -> None:
    """References = the customer's References + its Message-ID, single-space separated."""
    composed = notice(fixture("customer_reply_to.eml"))
    assert b" ".join(line.strip() for line in field(composed.raw, "References")) == (
        b"References: <CAF3x9q7=order7.first@mail.customer.example>"
        b" <mailrouter.41.5f0c2a@example.test>"
        b" <CAF3x9q7=order7.reply2@mail.customer.example>"
    )


def test_references_fall_back_to_in_reply_to() -> None:
    """A parent with only In-Reply-To contributes that id before its own."""
    parent = parse(
        b"From: a@customer.example\r\nMessage-ID: <two@c.example>\r\n"
        b"In-Reply-To: <one@c.example>\r\n\r\nx\r\n"
    )
    assert reply_threading(parent, 20) == ("two@c.example", ["one@c.example", "two@c.example"])


def test_references_of_a_first_message_are_its_own_id() -> None:
    """A thread's first message: References holds just its Message-ID."""
    assert reply_threading(fixture("customer_plain.eml"), 20) == (
        "20240312090100.1234@customer.example",
        ["20240312090100.1234@customer.example"],
    )


def test_references_are_deduplicated_and_parent_id_comes_last() -> None:
    """Repeated ids (and the parent's own id listed early) appear once, parent last."""
    parent = parse(
        b"From: a@customer.example\r\nMessage-ID: <p@c.example>\r\n"
        b"References: <r@c.example> <p@c.example> <s@c.example> <r@c.example>\r\n\r\nx\r\n"
    )
    assert reply_threading(parent, 20)[1] == ["r@c.example", "s@c.example", "p@c.example"]


def test_long_references_chain_trimmed_to_first_and_last() -> None:
    """60 ids + the parent's: keep the root and the last limit-1 (RFC 5322 §3.6.4)."""
    parent = with_references(60)
    in_reply_to, refs = reply_threading(parent, 20)
    assert in_reply_to == "latest@customer.example"
    assert len(refs) == 20
    assert refs[0] == "thread.000@customer.example"
    assert refs[1:] == [f"thread.{i:03d}@customer.example" for i in range(42, 60)] + [
        "latest@customer.example"
    ]


def test_trimmed_references_reach_the_raw_notice() -> None:
    """The notice carries exactly the trimmed list, in order."""
    composed = notice(with_references(60), settings=settings_for(limit=5))
    value = b" ".join(line.strip() for line in field(composed.raw, "References"))
    assert value == (
        b"References: <thread.000@customer.example> <thread.057@customer.example>"
        b" <thread.058@customer.example> <thread.059@customer.example>"
        b" <latest@customer.example>"
    )


def test_reply_threading_rejects_limit_below_two() -> None:
    """First + last needs room for two ids (and [-0:] would silently keep everything)."""
    with pytest.raises(ValueError, match="at least 2"):
        reply_threading(fixture("customer_plain.eml"), 1)


def test_id_headers_are_folded_never_encoded() -> None:
    """References folds with CRLF + one space at 78 columns and has no encoded-words."""
    composed = notice(with_references(60))
    refs = field(composed.raw, "References")
    assert len(refs) > 1
    assert all(len(line) <= 78 for line in refs)
    assert all(line.startswith(b" <") and not line.startswith(b"  ") for line in refs[1:])
    for name in ("Message-ID", "In-Reply-To", "References"):
        assert not any(b"=?" in line for line in field(composed.raw, name)), name


def test_long_message_id_gets_its_own_line_not_an_encoded_word() -> None:
    """A 300-character id (Exchange makes long ones) is never split or encoded."""
    long_id = "x" * 288 + "@exchange.example"
    parent = parse(
        f"From: a@customer.example\r\nMessage-ID: <{long_id}>\r\n"
        "References: <root@customer.example>\r\n\r\nx\r\n".encode()
    )
    composed = notice(parent)
    refs = field(composed.raw, "References")
    assert refs == [b"References: <root@customer.example>", f" <{long_id}>".encode()]
    assert field(composed.raw, "In-Reply-To") == [f"In-Reply-To: <{long_id}>".encode()]
    assert all(len(line) <= 998 for line in head_lines(composed.raw))


def test_unwritable_ids_are_left_out_of_references() -> None:
    """An id with non-ASCII (parse is lenient) would need encoding: it is dropped."""
    parent = parse(
        "From: a@customer.example\r\nMessage-ID: <ok@c.example>\r\n"
        "References: <root@c.example> <bäd@c.example>\r\n\r\nx\r\n".encode()
    )
    assert reply_threading(parent, 20) == ("ok@c.example", ["root@c.example", "ok@c.example"])


def test_headers_round_trip_through_policy_default() -> None:
    """Parsed back with email.policy.default, every header reads as intended."""
    customer = fixture("customer_reply_to.eml")
    composed = notice(customer)
    msg = reparse(composed.raw)
    assert msg["Message-ID"] == f"<{composed.message_id}>"
    assert msg["In-Reply-To"] == "<CAF3x9q7=order7.reply2@mail.customer.example>"
    assert msg["References"].split() == [
        "<CAF3x9q7=order7.first@mail.customer.example>",
        "<mailrouter.41.5f0c2a@example.test>",
        "<CAF3x9q7=order7.reply2@mail.customer.example>",
    ]
    assert msg["Subject"] == "Re: Order 7 [#42]"
    assert msg["To"].addresses[0].addr_spec == "orders@customer.example"
    assert msg["From"].addresses[0].addr_spec == "support@help.example.test"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["X-Mailrouter-Interaction"] == "42"
    assert msg["Date"].datetime == NOW
    assert not msg.defects


def test_notice_threads_for_mailrouter_itself() -> None:
    """parse() of the notice sees its ids and marks it automatic (a looped notice is held)."""
    customer = fixture("customer_reply_to.eml")
    composed = notice(customer)
    again = parse(composed.raw)
    assert again.message_id == composed.message_id
    assert again.in_reply_to == [customer.message_id]
    assert again.references[-1] == customer.message_id
    assert again.automatic == "auto-submitted: auto-generated"


# --------------------------------------------------------------------------- subject


def test_notice_subject_strips_stacked_prefixes(tmp_path: Path) -> None:
    """Without a subject template: "RE: Re: Aw: Order 7" → "Re: Order 7" (+ the token)."""
    (tmp_path / "plain.txt.j2").write_text("Moved to {{ toAccount }}.\n", encoding="utf-8")
    composed = notice(
        fixture("customer_reply_to.eml"), settings=settings_for(tmp_path), template="plain"
    )
    assert field(composed.raw, "Subject") == [b"Subject: Re: Order 7 [#42]"]
    assert composed.subject == "Re: Order 7 [#42]"


def test_subject_template_replaces_default_subject(tmp_path: Path) -> None:
    """A .subject.j2 decides the subject (the example keeps reply_subject in it)."""
    (tmp_path / "n.subject.j2").write_text("{{ reply_subject }} [#{{ interaction_id }}]")
    (tmp_path / "n.txt.j2").write_text("x\n")
    composed = notice(fixture("customer_plain.eml"), settings=settings_for(tmp_path), template="n")
    assert composed.subject == "Re: Order 7 [#42]"
    assert field(composed.raw, "Subject") == [b"Subject: Re: Order 7 [#42]"]


def test_non_ascii_subject_and_name_are_rfc2047_encoded() -> None:
    """Subject and To display name are encoded-words in ASCII bytes and decode back."""
    customer = fixture("raw_utf8_headers.eml")
    composed = notice(customer)
    composed.raw.decode("ascii")  # raises if any 8-bit byte slipped through
    assert b"=?utf-8?" in b"".join(field(composed.raw, "Subject"))
    assert b"=?utf-8?" in b"".join(field(composed.raw, "To"))
    msg = reparse(composed.raw)
    assert msg["Subject"] == "Re: Grüße aus Köln [#42]"
    assert msg["To"].addresses[0].display_name == "Zoë Müller"
    assert "Zoë Müller" in text_of(msg.get_body(("plain",)))


def test_crlf_in_subject_does_not_inject_header(tmp_path: Path) -> None:
    """A CR/LF in the customer's subject stays inside the Subject field."""
    customer = replace(fixture("customer_plain.eml"), subject="Order 7\r\nBcc: victim@evil.example")
    (tmp_path / "plain.txt.j2").write_text("x\n")
    for settings, template in (
        (settings_for(tmp_path), "plain"),
        (settings_for(), "transfer_notice"),
    ):
        composed = notice(customer, settings=settings, template=template)
        assert not any(line.lower().startswith(b"bcc:") for line in head_lines(composed.raw))
        assert reparse(composed.raw)["Subject"] == "Re: Order 7 Bcc: victim@evil.example [#42]"


def test_crlf_in_customer_name_does_not_inject_header() -> None:
    """A CR/LF in the display name cannot start a new header line."""
    customer = replace(fixture("customer_plain.eml"), from_name="Mark\r\nBcc: victim@evil.example")
    composed = notice(customer)
    assert not any(line.lower().startswith(b"bcc:") for line in head_lines(composed.raw))
    assert reparse(composed.raw)["To"].addresses[0].display_name == "Mark Bcc: victim@evil.example"


# --------------------------------------------------------------------------- other headers


def test_notice_is_auto_submitted_and_suppresses_exchange_auto_replies() -> None:
    """RFC 3834 Auto-Submitted plus X-Auto-Response-Suppress; no Precedence."""
    composed = notice(fixture("customer_plain.eml"))
    assert field(composed.raw, "Auto-Submitted") == [b"Auto-Submitted: auto-generated"]
    assert field(composed.raw, "X-Auto-Response-Suppress") == [b"X-Auto-Response-Suppress: All"]
    assert field(composed.raw, "Precedence") == []


def test_notice_has_message_id_date_mime_version_and_interaction_header() -> None:
    """Message-ID in the new account's domain; Date from `now`; trace header with the id."""
    composed = notice(fixture("customer_plain.eml"))
    assert re.fullmatch(r"mailrouter\.[0-9a-f]{32}@help\.example\.test", composed.message_id)
    assert "<" not in composed.message_id
    assert field(composed.raw, "Message-ID") == [f"Message-ID: <{composed.message_id}>".encode()]
    assert field(composed.raw, "Date") == [b"Date: Tue, 12 Mar 2024 10:30:05 +0000"]
    assert field(composed.raw, "MIME-Version") == [b"MIME-Version: 1.0"]
    assert field(composed.raw, "X-Mailrouter-Interaction") == [b"X-Mailrouter-Interaction: 42"]


def test_message_ids_are_unique() -> None:
    """Two notices for the same interaction never share a Message-ID."""
    customer = fixture("customer_plain.eml")
    assert notice(customer).message_id != notice(customer).message_id


def test_notice_is_text_plain_utf8_without_html_template(tmp_path: Path) -> None:
    """Only a .txt.j2: a single text/plain; charset=utf-8 part."""
    (tmp_path / "plain.txt.j2").write_text("Moved to {{ toAccount }}.\n")
    composed = notice(
        fixture("customer_plain.eml"), settings=settings_for(tmp_path), template="plain"
    )
    msg = reparse(composed.raw)
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert text_of(msg) == "Moved to support@help.example.test.\n"


def test_notice_is_multipart_alternative_with_html_template() -> None:
    """With a .html.j2: multipart/alternative, text first, one MIME-Version (top level)."""
    composed = notice(fixture("customer_plain.eml"))
    msg = reparse(composed.raw)
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert composed.raw.count(b"MIME-Version:") == 1
    assert "support@help.example.test" in text_of(parts[1])


def test_raw_uses_crlf_line_endings_only() -> None:
    """Every line ends in CRLF, no bare LF or CR; no line exceeds 998 octets."""
    composed = notice(fixture("customer_reply_to.eml"))
    assert composed.raw.endswith(b"\r\n")
    assert composed.raw.count(b"\n") == composed.raw.count(b"\r\n")
    assert composed.raw.count(b"\r") == composed.raw.count(b"\r\n")
    assert all(len(line) <= 998 for line in composed.raw.split(b"\r\n"))


def test_chained_transfers_each_notify_for_their_own_pair() -> None:
    """A→B then B→C: each notice is from its new account and names its own pair."""
    customer = fixture("customer_plain.eml")
    first = notice(customer, from_account=SALES, to_account=SUPPORT)
    second = notice(customer, from_account=SUPPORT, to_account=BILLING)
    assert first.envelope_from == "support@help.example.test"
    assert second.envelope_from == "billing@example.test"
    text = text_of(reparse(second.raw).get_body(("plain",)))
    assert "from support@help.example.test to our colleagues at\nbilling@example.test" in text


def test_template_error_reaches_the_caller(tmp_path: Path) -> None:
    """compose_notice does not send a half-rendered notice."""
    (tmp_path / "bad.txt.j2").write_text("{{ nope }}")
    with pytest.raises(TemplateError, match=r"bad\.txt\.j2:1: undefined variable"):
        notice(fixture("customer_plain.eml"), settings=settings_for(tmp_path), template="bad")


# --------------------------------------------------------------------------- suppression


def test_suppressed_without_customer_message() -> None:
    """No customer message before the transfer: nothing to answer."""
    assert suppression_reason(None) == "no customer message before the transfer"


def test_suppressed_for_auto_replied_message() -> None:
    """An out-of-office (Auto-Submitted: auto-replied) is not answered."""
    assert suppression_reason(fixture("auto_replied.eml")) == (
        "last customer message is automatic: auto-submitted: auto-replied"
    )


def test_suppressed_for_bounce_from_mailer_daemon() -> None:
    """A bounce (From: MAILER-DAEMON) is not answered."""
    assert suppression_reason(fixture("bounce_mailer_daemon.eml")) == (
        "last customer message is automatic: bounce (from mailer-daemon)"
    )


def test_suppressed_for_list_mail() -> None:
    """Mailing-list mail (List-Id) is not answered."""
    assert suppression_reason(fixture("list_mail.eml")) == (
        "last customer message is automatic: mailing list (List-Id)"
    )


def test_suppressed_without_usable_address() -> None:
    """No From/Reply-To address, or one that cannot be written to, means no notice."""
    plain = fixture("customer_plain.eml")
    reason = "last customer message has no usable address"
    assert suppression_reason(replace(plain, from_email="")) == reason
    assert suppression_reason(replace(plain, from_email="undisclosed-recipients:;")) == reason
    assert suppression_reason(replace(plain, reply_to_email="b@x y.example")) == reason


def test_ordinary_customer_message_is_not_suppressed() -> None:
    """A person's mail may be answered."""
    assert suppression_reason(fixture("customer_reply_to.eml")) is None


def test_compose_notice_refuses_suppressed_message() -> None:
    """Called anyway for an auto-reply, compose_notice raises instead of answering it."""
    with pytest.raises(NoticeSuppressed, match="automatic") as info:
        notice(fixture("auto_replied.eml"))
    assert info.value.reason.startswith("last customer message is automatic")


# --------------------------------------------------------------------------- agent replies


def reply(customer: ParsedMessage, body: str = "Your parcel left today.\n") -> Composed:
    return compose_reply(
        settings_for(),
        account=SUPPORT,
        customer=customer,
        body_text=body,
        interaction_id=42,
        agent="jdoe",
        now=NOW,
    )


def test_agent_reply_has_no_auto_submitted() -> None:
    """A human wrote it: no Auto-Submitted, no X-Auto-Response-Suppress."""
    composed = reply(fixture("customer_plain.eml"))
    assert field(composed.raw, "Auto-Submitted") == []
    assert field(composed.raw, "X-Auto-Response-Suppress") == []
    # Only our loop marker makes it automatic for mailrouter itself, should it come back.
    assert parse(composed.raw).automatic == "mail loop (X-Mailrouter-Loop: mailrouter.invalid)"


def test_agent_reply_is_threaded_and_from_the_account() -> None:
    """Same threading and addressing as a notice; From is the replying account."""
    customer = fixture("customer_reply_to.eml")
    composed = reply(customer)
    msg = reparse(composed.raw)
    assert msg["In-Reply-To"] == f"<{customer.message_id}>"
    assert msg["References"].split()[-1] == f"<{customer.message_id}>"
    assert msg["Subject"] == "Re: Order 7 [#42]"
    assert msg["From"].addresses[0].addr_spec == "support@help.example.test"
    assert composed.envelope_to == ["orders@customer.example"]
    assert composed.envelope_from == "support@help.example.test"
    assert msg["X-Mailrouter-Interaction"] == "42"
    assert text_of(msg) == "Your parcel left today.\n"
    assert b"jdoe" not in composed.raw  # internal login names stay internal


def test_agent_reply_body_is_7bit_safe_and_round_trips() -> None:
    """Non-ASCII and long lines go out quoted-printable; bytes stay ASCII and CRLF."""
    body = "Grüße,\r\n" + "ä" * 500 + "\nEnde\n"
    composed = reply(fixture("customer_plain.eml"), body)
    composed.raw.decode("ascii")
    assert all(len(line) <= 998 for line in composed.raw.split(b"\r\n"))
    assert text_of(reparse(composed.raw)) == "Grüße,\n" + "ä" * 500 + "\nEnde\n"


def test_agent_reply_rejects_empty_body() -> None:
    """An empty reply is a mistake, not something to send."""
    with pytest.raises(ValueError, match="non-empty body"):
        reply(fixture("customer_plain.eml"), " \n")


def test_agent_reply_needs_a_usable_address() -> None:
    """Without an address there is no one to reply to."""
    with pytest.raises(ValueError, match="no usable"):
        reply(replace(fixture("customer_plain.eml"), from_email=""))
