"""Property-based fuzzing of what we compose (reliability issue, item 8): notices and
agent replies built from hostile customer headers never raise anything but a refusal,
never carry a CR/LF or control character injected through a subject, a display name, a
Reply-To or a template variable, and are only ever addressed to an address the
customer's own headers named.  Bounded and deterministic (derandomize, no database)."""

from __future__ import annotations

import email
import email.policy
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailrouter.config import AccountSettings, NotifySettings, Settings, TransferSettings
from mailrouter.notify import (
    Composed,
    NoticeSuppressed,
    compose_notice,
    compose_reply,
    own_addresses,
)
from mailrouter.parse import parse

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2024, 3, 12, 10, 30, tzinfo=UTC)
SALES = AccountSettings(
    "sales", "sales@example.test", "Sales", TransferSettings(True, True, "fuzz")
)
SUPPORT = AccountSettings("support", "support@example.test", "Support\r\nBcc: x@y.test")
FUZZ = settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Pieces of hostile header text: line breaks raw and encoded, controls, separators,
# broken and valid encoded-words, address syntax, odd bytes.
NASTY = st.sampled_from(
    [
        "\r\n",
        "\n",
        "\r",
        "\r\n ",
        "\r\nBcc: victim@evil.test",
        "\nTo: victim@evil.test",
        "=?utf-8?q?=0D=0ABcc:_victim@evil.test?=",
        "=?utf-8?b?DQpCY2M6IHZpY3RpbUBldmlsLnRlc3Q=?=",
        "=?utf-8?q?Zo=C3=AB?=",
        "=?bogus?x?zz?=",
        "\u2028",
        "\u0085",
        "\x00",
        "\x1b[2J",
        "\x7f",
        "\t",
        "<",
        ">",
        ",",
        '"',
        "\\",
        "@",
        ";",
        ":",
        "ü",
        "Ω",
        "\ufeff",
    ]
)
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
HOSTILE = st.lists(st.one_of(TEXT, NASTY), max_size=6).map("".join)
ADDRESS = st.one_of(
    st.sampled_from(
        [
            "ann@cust.test",
            "Ann.Lee@Cust.Test",
            "orders@eu.cust.test",
            "victim@elsewhere.test",
            "sales@example.test",
            "support@example.test",
            "no-at-sign",
            "a b@cust.test",
            '"quoted local"@cust.test',
            "zoë@cust.test",
            "ann@cust.test>,victim@evil.test",
            "",
        ]
    ),
    st.from_regex(r"[a-z0-9.+_-]{1,10}@[a-z0-9-]{1,8}\.(test|example)", fullmatch=True),
)


@st.composite
def mailbox(draw: st.DrawFn) -> str:
    """A From/Reply-To value: a hostile display name and an address, in some syntax."""
    name, addr = draw(HOSTILE), draw(ADDRESS)
    shape = draw(st.sampled_from(["{n} <{a}>", '"{n}" <{a}>', "{a}", "{a} ({n})", "{n}"]))
    return shape.format(n=name, a=addr)


@st.composite
def customer_raw(draw: st.DrawFn) -> bytes:
    """A customer message whose From, Reply-To, Subject and ids are hostile."""
    fields = [("From", draw(mailbox()))]
    if draw(st.booleans()):
        fields.append(("Reply-To", draw(mailbox())))
    fields.append(("To", "sales@example.test"))
    fields.append(("Subject", draw(HOSTILE)))
    fields.append(("Message-ID", draw(st.sampled_from(["<c1@cust.test>", "<ü@x>", "", "c2@x"]))))
    if draw(st.booleans()):
        fields.append(("References", draw(HOSTILE)))
    encoding = draw(st.sampled_from(["utf-8", "latin-1"]))
    head = "".join(f"{n}: {v}\r\n" for n, v in fields)
    return (head + "\r\nbody\r\n").encode(encoding, "replace")


ALLOWED = {
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"in-reply-to",
    b"references",
    b"auto-submitted",
    b"x-auto-response-suppress",
    b"x-mailrouter-interaction",
    b"x-mailrouter-loop",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
}


def check_wire_form(composed: Composed, raw_customer: bytes) -> None:
    """The properties every message we compose has, whatever it answered."""
    raw = composed.raw
    raw.decode("ascii")  # 7-bit clean
    # Line breaks are CRLF pairs only: no bare CR or LF anywhere.
    assert b"\r" not in raw.replace(b"\r\n", b"") and b"\n" not in raw.replace(b"\r\n", b"")
    head = raw.partition(b"\r\n\r\n")[0]
    names = []
    for line in head.split(b"\r\n"):
        assert len(line) <= 998
        assert not re.search(rb"[\x00-\x08\x0b-\x1f\x7f]", line), line
        if line[:1] in (b" ", b"\t"):
            continue
        name, colon, _ = line.partition(b":")
        assert colon, line
        names.append(name.lower())
    # Only our own fields, each once: nothing injected (no Bcc, no second To).
    assert set(names) <= ALLOWED, set(names) - ALLOWED
    assert len(names) == len(set(names)), names
    # Addressed to one address, which the customer's own headers named, never to us.
    [to] = composed.envelope_to
    customer = parse(raw_customer)
    assert to in {customer.reply_to_email, customer.from_email}
    assert to.encode() in raw_customer.lower()
    assert to not in {SALES.address, SUPPORT.address}
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert [a.addr_spec for a in msg["To"].addresses] == [to]
    assert msg["Cc"] is None and msg["Bcc"] is None
    subject = str(msg["Subject"])
    assert "\r" not in subject and "\n" not in subject
    assert len(subject) <= 200 + len("Re: ") + len(" [#42]")


@pytest.fixture(scope="module")
def fuzz_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Templates that put every customer-controlled variable in the subject and body."""
    tdir = tmp_path_factory.mktemp("templates")
    shutil.copytree(ROOT / "config" / "templates", tdir, dirs_exist_ok=True)
    variables = "{{ subject }} | {{ customer_name }} | {{ customer_address }} | {{ base_subject }}"
    (tdir / "fuzz.subject.j2").write_text(variables, "utf-8")
    (tdir / "fuzz.txt.j2").write_text(f"{variables}\n{{{{ reply_subject }}}}\n", "utf-8")
    (tdir / "fuzz.html.j2").write_text(f"<p>{variables}</p>\n", "utf-8")
    return Settings(
        config_path=tdir / "mailrouter.toml",
        state_dir=tdir,
        database_url="sqlite://",
        auto_upgrade=False,
        accounts=(SALES, SUPPORT),
        template_dir=tdir,
        notify=NotifySettings(render_timeout=10.0),
    )


@FUZZ
@given(raw=customer_raw())
def test_agent_replies_to_hostile_headers_are_clean_and_aimed_at_the_customer(
    raw: bytes,
) -> None:
    """compose_reply on any customer message: a clean reply, or a ValueError refusal."""
    s = Settings(
        config_path=ROOT / "x.toml",
        state_dir=ROOT,
        database_url="sqlite://",
        auto_upgrade=False,
        accounts=(SALES, SUPPORT),
        template_dir=ROOT,
    )
    try:
        composed = compose_reply(
            s,
            account=SUPPORT,
            customer=parse(raw),
            body_text="Thanks.\n",
            interaction_id=42,
            agent=None,
            now=NOW,
        )
    except ValueError:
        event("refused")
        return  # no usable address: refused, as it must be
    event("composed")
    check_wire_form(composed, raw)


@settings(FUZZ, max_examples=100)
@given(raw=customer_raw())
def test_notices_to_hostile_headers_are_clean_and_aimed_at_the_customer(
    fuzz_settings: Settings, raw: bytes
) -> None:
    """compose_notice through real templates that print every customer variable in the
    subject and both bodies: a clean notice, or a NoticeSuppressed with its reason."""
    customer = parse(raw)
    try:
        composed = compose_notice(
            fuzz_settings,
            template="fuzz",
            from_account=SALES,
            to_account=SUPPORT,
            customer=customer,
            interaction_id=42,
            agent="bob\r\nBcc: x@y.test",
            now=NOW,
        )
    except NoticeSuppressed as exc:
        assert exc.reason
        event("suppressed")
        return
    event("composed")
    check_wire_form(composed, raw)
    assert composed.envelope_to[0] not in own_addresses(fuzz_settings)
