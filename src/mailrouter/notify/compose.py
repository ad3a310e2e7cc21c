"""Compose the mail mailrouter itself sends: transfer notices and agent replies, as raw bytes.

Both are threaded replies to a customer message (RFC 5322 §3.6.4).  The id headers
(Message-ID, In-Reply-To, References) are written here byte by byte: ``email.policy.default``
and ``SMTP`` RFC 2047-encode a long References field, and Outlook then drops it and the
reply falls out of its thread.  Everything else goes through :class:`EmailMessage`, which
encodes non-ASCII subjects and names correctly.
"""

from __future__ import annotations

import email.policy
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

from mailrouter.config import AccountSettings, Settings
from mailrouter.notify.templates import notice_variables, one_line, render_notice, reply_subject
from mailrouter.parse import ParsedMessage, trim_references

__all__ = [
    "Composed",
    "NoticeSuppressed",
    "compose_notice",
    "compose_reply",
    "reply_threading",
    "suppression_reason",
]

# cte_type="7bit": non-ASCII bodies go out quoted-printable or base64, so the bytes are
# plain ASCII and survive any relay, with or without 8BITMIME.  linesep is CRLF (SMTP).
_POLICY = email.policy.SMTP.clone(cte_type="7bit")
_FOLD_AT = 78  # RFC 5322 §2.1.1: SHOULD; the hard limit is 998
_HARD_LIMIT = 998
# The longest id that still fits on one line as "In-Reply-To: <id>" (the longest prefix).
_MAX_OUT_ID = _HARD_LIMIT - len("In-Reply-To: <>")
# An id we can write as-is: printable ASCII without whitespace or angle brackets.  parse()
# is lenient and may hand back ids that are not; those are left out rather than encoded.
_ID_RE = re.compile(r"^[!-;=?-~]+$")
# A deliverable address: local@domain, ASCII (no SMTPUTF8 on the way out), no whitespace,
# quotes or brackets that would need quoting in a header.
_ADDRESS_RE = re.compile(r"^[!#-'*-+\-./-9=?A-Z^-~]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Composed:
    """A message ready for the outbox: raw CRLF bytes plus the SMTP envelope."""

    message_id: str  # bare, without <>
    raw: bytes
    envelope_from: str
    envelope_to: list[str]
    subject: str


class NoticeSuppressed(ValueError):
    """compose_notice was asked to answer a message that must not get a notice."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"notice suppressed: {reason}")


def _customer_address(customer: ParsedMessage) -> str | None:
    address = customer.reply_to_email or customer.from_email
    return address if _ADDRESS_RE.match(address) else None


def suppression_reason(customer: ParsedMessage | None) -> str | None:
    """Why no notice may answer ``customer`` (DESIGN §2 rule 4), or None when one may."""
    if customer is None:
        return "no customer message before the transfer"
    if customer.automatic:
        # Answering a bounce, an auto-reply or list mail starts mail loops or mails a robot.
        return f"last customer message is automatic: {customer.automatic}"
    if _customer_address(customer) is None:
        return "last customer message has no usable address"
    return None


def _writable(mid: str) -> bool:
    return len(mid) <= _MAX_OUT_ID and _ID_RE.match(mid) is not None


def reply_threading(parent: ParsedMessage, limit: int) -> tuple[str, list[str]]:
    """``(In-Reply-To, References)`` for a reply to ``parent``, ids bare.

    References is the parent's References (or, when it has none, its In-Reply-To) plus the
    parent's own Message-ID, without duplicates.  Longer than ``limit`` ids, it keeps the
    first id (the thread root) and the last ``limit - 1`` (the nearest ancestors), as
    RFC 5322 §3.6.4 suggests.  In-Reply-To is "" only when the parent's own id cannot be
    written (not printable ASCII, or too long for a header line).  ``parse()`` already kept
    at most ``MAX_REFERENCES`` of the parent's ids: a limit above that plus one keeps no more.
    """
    own = parent.message_id
    chain = [
        mid
        for mid in dict.fromkeys(parent.references or parent.in_reply_to)
        if mid != own and _writable(mid)
    ]
    in_reply_to = own if _writable(own) else ""
    if in_reply_to:
        # The parent's own id always comes last, even if a confused client listed it in
        # its own References earlier on.
        chain.append(own)
    return in_reply_to, trim_references(chain, limit)


def _id_header_lines(message_id: str, in_reply_to: str, references: list[str]) -> bytes:
    """Message-ID, In-Reply-To and References as raw header bytes: folded, never encoded."""
    lines = [f"Message-ID: <{message_id}>"]
    if in_reply_to:
        lines.append(f"In-Reply-To: <{in_reply_to}>")
    if references:
        # Fold only between ids (CRLF + one space), at 78 columns where possible; an id is
        # never split, so a long one gets a continuation line of its own (at most 998).
        current = "References:"
        folded: list[str] = []
        for mid in references:
            token = f"<{mid}>"
            if current != "References:" and len(current) + 1 + len(token) > _FOLD_AT:
                folded.append(current)
                current = ""
            current = f"{current} {token}"
        folded.append(current)
        lines.append("\r\n".join(folded))
    return "".join(f"{line}\r\n" for line in lines).encode("ascii")


def _insert_after_date(head: bytes, lines: bytes) -> bytes:
    """``head`` (no final CRLF) with ``lines`` (CRLF-terminated) after its Date field.

    Only for readability: the id fields then sit with Date, as mail clients write them,
    instead of after the MIME fields.
    """
    out = head.split(b"\r\n")
    for i, line in enumerate(out):
        if line.lower().startswith(b"date:"):
            end = i + 1
            while end < len(out) and out[end][:1] in (b" ", b"\t"):
                end += 1  # a folded Date (never written by us, but cheap to respect)
            return b"\r\n".join(out[:end]) + b"\r\n" + lines + b"\r\n".join(out[end:]) + b"\r\n"
    return head + b"\r\n" + lines


def _message_id(settings: Settings, interaction_id: int, account: AccountSettings) -> str:
    # The sending account's domain ties the id to the mailbox it came from; should that
    # domain not be writable in an id header (non-ASCII), fall back to our own hostname.
    domain = account.address.rpartition("@")[2]
    if not _ID_RE.match(domain):
        domain = settings.hostname
    return f"mailrouter.{interaction_id}.{uuid.uuid4().hex}@{domain}"


def _build(
    settings: Settings,
    *,
    account: AccountSettings,
    customer: ParsedMessage,
    interaction_id: int,
    subject: str,
    text: str,
    html: str | None,
    automatic: bool,
    now: datetime | None,
) -> Composed:
    """The common part of notices and replies: a threaded answer to ``customer``."""
    to_address = _customer_address(customer)
    if to_address is None:
        raise ValueError("the customer message has no usable Reply-To or From address")
    when = now or datetime.now(UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    subject = one_line(subject)
    # Name the recipient only when the name belongs to the address we write to: a From
    # name next to a Reply-To address (often a shared or a different mailbox) would lie.
    to_name = customer.from_name if to_address == customer.from_email else ""

    msg = EmailMessage(policy=_POLICY)
    msg["From"] = Address(one_line(account.display_name or ""), addr_spec=account.address)
    msg["To"] = Address(one_line(to_name), addr_spec=to_address)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(when.astimezone(UTC))
    if automatic:
        # RFC 3834: mark it machine-generated so well-behaved responders do not answer;
        # Exchange and Outlook ignore that header and need their own. No "Precedence":
        # RFC 3834 §3.1.8 discourages it.
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Auto-Response-Suppress"] = "All"
    msg["X-Mailrouter-Interaction"] = str(interaction_id)
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
        for part in msg.iter_parts():
            # add_alternative builds the part as an EmailMessage, which stamps its own
            # MIME-Version; that header belongs to the top level only (RFC 2045 §4).
            del part["MIME-Version"]

    message_id = _message_id(settings, interaction_id, account)
    in_reply_to, references = reply_threading(customer, settings.references_limit)
    head, _sep, body = msg.as_bytes().partition(b"\r\n\r\n")
    raw = (
        _insert_after_date(head, _id_header_lines(message_id, in_reply_to, references))
        + b"\r\n"
        + body
    )
    return Composed(
        message_id=message_id,
        raw=raw,
        envelope_from=account.address,
        envelope_to=[to_address],
        subject=subject,
    )


def compose_notice(
    settings: Settings,
    *,
    template: str,
    from_account: AccountSettings,
    to_account: AccountSettings,
    customer: ParsedMessage,
    interaction_id: int,
    agent: str | None,
    now: datetime | None = None,
) -> Composed:
    """The transfer notice: a threaded, auto-generated reply from the *new* account.

    Raises :class:`NoticeSuppressed` when ``customer`` must not be answered (check
    :func:`suppression_reason` first) and ``TemplateError`` when the template fails.
    """
    reason = suppression_reason(customer)
    if reason is not None:
        raise NoticeSuppressed(reason)
    when = now or datetime.now(UTC)
    variables = notice_variables(
        from_account=from_account,
        to_account=to_account,
        interaction_id=interaction_id,
        customer=customer,
        agent=agent,
        transferred_at=when,
    )
    rendered = render_notice(settings.template_dir, template, variables)
    return _build(
        settings,
        account=to_account,
        customer=customer,
        interaction_id=interaction_id,
        subject=rendered.subject or reply_subject(customer.subject),
        text=rendered.text,
        html=rendered.html,
        automatic=True,
        now=when,
    )


def compose_reply(
    settings: Settings,
    *,
    account: AccountSettings,
    customer: ParsedMessage,
    body_text: str,
    interaction_id: int,
    agent: str | None,
    now: datetime | None = None,
) -> Composed:
    """An agent's reply to ``customer``, threaded like a notice but from a human.

    So it carries no Auto-Submitted or X-Auto-Response-Suppress: the customer's own
    auto-responder may answer it like any personal mail.  ``agent`` is not written into
    the message (it would show internal login names to customers); the caller records it.
    A reply to an automatic message is allowed: an agent chose to send it.
    """
    if not body_text.strip():
        raise ValueError("an agent reply needs a non-empty body")
    return _build(
        settings,
        account=account,
        customer=customer,
        interaction_id=interaction_id,
        subject=reply_subject(customer.subject),
        text=body_text,
        html=None,
        automatic=False,
        now=now,
    )
