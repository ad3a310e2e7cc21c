"""Reading bounces: which message a delivery status notification reports on, for whom,
and why.

RFC 3464 reports (``multipart/report; report-type=delivery-status``) are read field by
field: ``Final-Recipient``, ``Action``, ``Status``, ``Diagnostic-Code`` per recipient,
and the reported message's Message-ID from its returned ``message/rfc822`` or
``text/rfc822-headers`` part.  For the many bounces that are not RFC 3464 (qmail,
Exim's old format, Exchange …) ``flufl.bounce`` — Mailman's well-kept detector
collection — finds the failed addresses, and the reported Message-ID is looked for in
the returned text.  Only messages already classified automatic are read this way: the
body is parsed, but only its first :data:`SCAN_LIMIT` bytes.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from email.parser import HeaderParser
from email.policy import compat32

from mailrouter.parse import parse_ids

__all__ = ["SCAN_LIMIT", "Bounce", "BouncedRecipient", "read_bounce"]

# flufl.bounce logs every detector that trips over odd input at ERROR; for us such a
# message simply is not a bounce of that kind, which is no error for an operator to see.
logging.getLogger("flufl.bounce").setLevel(logging.CRITICAL)

# The report and the returned headers come first; a returned 25 MB body need not be read.
SCAN_LIMIT = 512 * 1024
_RETURNED_ID_RE = re.compile(rb"(?im)^[ \t>]*Message-ID:[ \t]*(<[^>\r\n]{1,500}>)")
_STATUS_RE = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


@dataclass(frozen=True)
class BouncedRecipient:
    address: str
    action: str  # failed | delayed | delivered | relayed | expanded (RFC 3464 §2.3.3)
    status: str  # the enhanced status code, e.g. 5.1.1 ("" when the report gives none)
    diagnostic: str

    def summary(self) -> str:
        what = " ".join(p for p in (self.status, self.diagnostic) if p) or self.action
        return f"{self.address}: {what}"


@dataclass(frozen=True)
class Bounce:
    """A delivery status notification, as far as it could be read."""

    original_message_id: str | None  # bare, as stored
    recipients: tuple[BouncedRecipient, ...]

    @property
    def permanent(self) -> bool:
        """A failure (not only a delay warning) for at least one recipient."""
        return any(r.action == "failed" for r in self.recipients) or not self.recipients

    def summary(self) -> str:
        return "; ".join(r.summary() for r in self.recipients)[:1000] or "bounced"


def read_bounce(raw: bytes) -> Bounce | None:
    """The bounce ``raw`` is, or None when it is none (an auto-reply, list mail …)."""
    head = raw[:SCAN_LIMIT]
    msg = message_from_bytes(head, policy=compat32)
    report = _report_parts(msg)
    recipients: tuple[BouncedRecipient, ...] = ()
    original = None
    if report is not None:
        status_part, returned = report
        recipients = tuple(_recipients(status_part))
        original = _returned_id(returned) if returned is not None else None
    if not recipients:
        # Not RFC 3464, or a report whose fields we cannot read (old Netscape servers).
        failed = _flufl_failures(msg)
        if failed is None and report is None:
            return None
        permanent, temporary = failed or (frozenset(), frozenset())
        recipients = tuple(BouncedRecipient(a, "failed", "", "") for a in sorted(permanent))
        recipients += tuple(
            BouncedRecipient(a, "delayed", "", "") for a in sorted(temporary - permanent)
        )
    return Bounce(original or _id_in_text(head, msg), recipients)


def _report_parts(msg: Message) -> tuple[Message, Message | None] | None:
    """(the delivery-status part, the returned message or headers) of an RFC 3464 report."""
    status_part = returned = None
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/delivery-status" and status_part is None:
            status_part = part
        elif ctype in ("message/rfc822", "text/rfc822-headers") and returned is None:
            returned = part
    if status_part is None:
        return None
    return status_part, returned


def _recipients(status_part: Message) -> list[BouncedRecipient]:
    """Per-recipient blocks of message/delivery-status (the first block is per-message)."""
    blocks = status_part.get_payload()
    if isinstance(blocks, str):  # not split by the parser: read the fields ourselves
        blocks = [HeaderParser().parsestr(b) for b in re.split(r"\r?\n\r?\n", blocks)]
    out: list[BouncedRecipient] = []
    for block in blocks if isinstance(blocks, list) else []:
        if not isinstance(block, Message):
            continue
        # The address as we sent it (ORCPT) before the one the last MTA rewrote it to.
        rcpt = block.get("Original-Recipient") or block.get("Final-Recipient")
        if not rcpt:
            continue
        address = str(rcpt).split(";", 1)[-1].strip().strip("<>").lower()
        status = _STATUS_RE.search(str(block.get("Status", "")))
        out.append(
            BouncedRecipient(
                address=address[:320],
                action=str(block.get("Action", "")).strip().lower()[:20] or "failed",
                status=status.group(1) if status else "",
                diagnostic=" ".join(str(block.get("Diagnostic-Code", "")).split())[:500],
            )
        )
    return out


def _returned_id(returned: Message) -> str | None:
    if returned.get_content_type() == "message/rfc822":
        payload = returned.get_payload()
        inner = payload[0] if isinstance(payload, list) and payload else None
        if isinstance(inner, Message):
            ids = parse_ids(inner.get("Message-ID"))
            return ids[0] if ids else None
        return None
    text = returned.get_payload(decode=True)
    if isinstance(text, bytes):
        ids = parse_ids(HeaderParser().parsestr(text.decode("utf-8", "replace")).get("Message-ID"))
        return ids[0] if ids else None
    return None


def _id_in_text(head: bytes, msg: Message) -> str | None:
    """A returned ``Message-ID:`` line in the body (non-RFC 3464 bounces quote the message)."""
    own = msg.get("Message-ID")
    for m in _RETURNED_ID_RE.finditer(head.partition(b"\n\n")[2] or head.partition(b"\r\n\r\n")[2]):
        ids = parse_ids(m.group(1).decode("utf-8", "replace"))
        if ids and (own is None or ids[0] not in str(own)):
            return ids[0]
    return None


def _flufl_failures(msg: Message) -> tuple[frozenset[str], frozenset[str]] | None:
    """(permanent, temporary) failed addresses by flufl.bounce, None for no bounce."""
    from flufl.bounce import all_failures

    try:
        temporary, permanent = all_failures(msg)
    except Exception:  # noqa: BLE001 - a detector tripping over odd input is "not a bounce"
        return None
    if not temporary and not permanent:
        return None

    def text(addrs: frozenset[bytes] | frozenset[str]) -> frozenset[str]:
        return frozenset(
            (a.decode("utf-8", "replace") if isinstance(a, bytes) else a).strip().lower()
            for a in addrs
        )

    return text(permanent), text(temporary)
