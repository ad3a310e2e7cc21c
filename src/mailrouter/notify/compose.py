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
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime

from mailrouter.config import AccountSettings, NotifySettings, Settings
from mailrouter.notify.templates import (
    RenderLimits,
    cap,
    notice_variables,
    one_line,
    render_notice,
    reply_subject,
)
from mailrouter.parse import LOOP_HEADER, ParsedMessage, trim_references

__all__ = [
    "Composed",
    "NoticeSuppressed",
    "answer_address",
    "compose_notice",
    "compose_reply",
    "own_addresses",
    "reply_threading",
    "subject_token",
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
_ID_FIELDS = {"message-id", "in-reply-to", "references"}
# A deliverable address: a dot-atom local part @ a host name, ASCII (no SMTPUTF8 on the
# way out): nothing that would need quoting in a header, so ``Address`` never refuses it.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_ADDRESS_RE = re.compile(rf"^{_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})*$")


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


def own_addresses(settings: Settings) -> frozenset[str]:
    """Every configured account's address: mail to one of them would be mail to ourselves."""
    return frozenset(a.address for a in settings.accounts)


def _related(a: str, b: str) -> bool:
    """Whether two addresses share a domain (or one's is a subdomain of the other's)."""
    da, db = a.rpartition("@")[2].lower(), b.rpartition("@")[2].lower()
    return da == db or da.endswith("." + db) or db.endswith("." + da)


def answer_address(
    customer: ParsedMessage, *, automatic: bool, own: Collection[str] = ()
) -> tuple[str | None, str | None]:
    """Where an answer to ``customer`` goes: ``(address, None)``, or ``(None, why not)``.

    DESIGN §2 rule 4: the Reply-To, else the From.  A Reply-To naming one of our own
    accounts is ignored (``Reply-To: sales@…`` must never make us mail ourselves), and an
    answer to our own account is refused.  For an automatic answer (a notice) RFC 3834 §4
    applies: an outsider's Reply-To must not turn us into a reflector that mails a third
    party the outsider's subject, so a Reply-To in another domain than the From is not
    answered at all.  The envelope sender that §4 prefers is not stored with the message.
    """
    reply_to, sender = customer.reply_to_email, customer.from_email
    if reply_to in own:
        reply_to = ""
    if reply_to:
        if not _ADDRESS_RE.match(reply_to):
            return None, "last customer message has no usable address"
        if automatic and sender and not _related(reply_to, sender):
            return None, (
                f"Reply-To {reply_to} is in another domain than From {sender}: "
                "not answered automatically (RFC 3834 §4)"
            )
        return reply_to, None
    if sender in own:
        return None, f"customer address {sender} is one of our own accounts"
    if _ADDRESS_RE.match(sender):
        return sender, None
    return None, "last customer message has no usable address"


def suppression_reason(customer: ParsedMessage | None, own: Collection[str] = ()) -> str | None:
    """Why no notice may answer ``customer`` (DESIGN §2 rule 4), or None when one may.

    ``own``: our accounts' addresses (:func:`own_addresses`), never answered.
    """
    if customer is None:
        return "no customer message before the transfer"
    if customer.automatic:
        # Answering a bounce, an auto-reply or list mail starts mail loops or mails a robot.
        return f"last customer message is automatic: {customer.automatic}"
    return answer_address(customer, automatic=True, own=own)[1]


def subject_token(notify: NotifySettings, interaction_id: int) -> str | None:
    """The interaction's subject token (``[#42]``), or None when the token is off."""
    if not notify.subject_token:
        return None
    return notify.subject_token.replace(NotifySettings.TOKEN_FIELD, str(interaction_id))


def _with_token(subject: str, token: str | None) -> str:
    # Once is enough: a subject template may already carry it, and an answer to a reply
    # quotes the customer's "Re: … [#42]".
    if token is None or token in subject:
        return subject
    return f"{subject} {token}" if subject else token


def _header_text(text: str, limit: int | None = None) -> str:
    """A value for an unstructured header or a display name: one line, no controls, cut
    to ``limit``, and no ``=?`` left that could read as an encoded-word.

    Our values are decoded text.  A literal ``=?utf-8?q?=0D=0ABcc:…?=`` left in one (a
    customer's broken encoded-word) is decoded *again* by the email package when it writes
    the header, into a CR/LF; CPython before 3.11.10 / 3.12.5 even wrote that CR/LF raw,
    starting a new header field (CVE-2024-6923).  ``= ?`` reads the same to a person.
    """
    text = one_line(text)
    if limit is not None:
        text = cap(text, limit)
    return text.replace("=?", "= ?")


def _check_head(raw: bytes, allowed: set[str]) -> None:
    """Refuse a composed message whose header section holds anything we did not write.

    Defence in depth behind :func:`_header_text`: each physical line is a field we set
    (each once) or a folded continuation, and no CR or LF stands alone.
    """
    head = raw.partition(b"\r\n\r\n")[0]
    seen: set[bytes] = set()
    for line in head.split(b"\r\n"):
        if b"\r" in line or b"\n" in line or len(line) > _HARD_LIMIT:
            raise ValueError("composed header has a bare line break or an overlong line")
        if line[:1] in (b" ", b"\t"):
            continue
        name = line.partition(b":")[0].lower()
        if name.decode("ascii", "replace") not in allowed or name in seen:
            raise ValueError(f"composed header has an unexpected field: {name!r}")
        seen.add(name)


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


def _message_id(settings: Settings, account: AccountSettings) -> str:
    # 128 random bits and nothing else: no interaction id or counter that would let an
    # outsider guess the id of a notice sent to someone else and claim its thread.  The
    # sending account's domain ties the id to the mailbox it came from; should that domain
    # not be writable in an id header (non-ASCII), fall back to our own hostname.
    domain = account.address.rpartition("@")[2]
    if not _ID_RE.match(domain):
        domain = settings.hostname
    return f"mailrouter.{secrets.token_hex(16)}@{domain}"


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
    to_address, why_not = answer_address(customer, automatic=automatic, own=own_addresses(settings))
    if to_address is None:
        raise ValueError(why_not or "the customer message has no usable address")
    when = now or datetime.now(UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    limit = settings.notify.max_subject_length
    subject = _header_text(
        _with_token(cap(one_line(subject), limit), subject_token(settings.notify, interaction_id))
    )
    # Name the recipient only when the name belongs to the address we write to: a From
    # name next to a Reply-To address (often a shared or a different mailbox) would lie.
    to_name = customer.from_name if to_address == customer.from_email else ""

    msg = EmailMessage(policy=_POLICY)
    msg["From"] = Address(_header_text(account.display_name or ""), addr_spec=account.address)
    msg["To"] = Address(_header_text(to_name, limit), addr_spec=to_address)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(when.astimezone(UTC))
    if automatic:
        # RFC 3834: mark it machine-generated so well-behaved responders do not answer;
        # Exchange and Outlook ignore that header and need their own. No "Precedence":
        # RFC 3834 §3.1.8 discourages it.
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Auto-Response-Suppress"] = "All"
    msg["X-Mailrouter-Interaction"] = str(interaction_id)
    # On everything we send: should it ever come back in (a forwarding loop, our own
    # account as the customer), parse.automatic_reason sees it and nothing answers it.
    msg[LOOP_HEADER] = settings.hostname
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
        for part in msg.iter_parts():
            # add_alternative builds the part as an EmailMessage, which stamps its own
            # MIME-Version; that header belongs to the top level only (RFC 2045 §4).
            del part["MIME-Version"]

    message_id = _message_id(settings, account)
    in_reply_to, references = reply_threading(customer, settings.references_limit)
    head, _sep, body = msg.as_bytes().partition(b"\r\n\r\n")
    raw = (
        _insert_after_date(head, _id_header_lines(message_id, in_reply_to, references))
        + b"\r\n"
        + body
    )
    _check_head(raw, {k.lower() for k in msg} | _ID_FIELDS)
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
    reason = suppression_reason(customer, own_addresses(settings))
    if reason is not None:
        raise NoticeSuppressed(reason)
    when = now or datetime.now(UTC)
    limit = settings.notify.max_subject_length
    variables = notice_variables(
        from_account=from_account,
        to_account=to_account,
        interaction_id=interaction_id,
        customer=customer,
        agent=agent,
        transferred_at=when,
        to_address=answer_address(customer, automatic=True, own=own_addresses(settings))[0],
        max_subject=limit,
    )
    rendered = render_notice(
        settings.template_dir, template, variables, RenderLimits.of(settings.notify)
    )
    return _build(
        settings,
        account=to_account,
        customer=customer,
        interaction_id=interaction_id,
        subject=rendered.subject or reply_subject(customer.subject, limit),
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
        subject=reply_subject(customer.subject, settings.notify.max_subject_length),
        text=body_text,
        html=None,
        automatic=False,
        now=now,
    )
