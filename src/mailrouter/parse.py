"""Lenient parsing of raw RFC 5322 bytes into the few facts routing needs.

Only the header section is parsed (``compat32``, which never raises on odd headers:
``email.policy.default`` does on some Exchange Message-IDs), and only it is handed to the
email package: a body is hashed in slices and read only for a report (lazily).  Id
headers are read by a forgiving tokenizer: missing angle brackets, commas, quotes,
folding inside an id and free text around it are all seen in real mail.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.header import Header, decode_header, make_header
from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from email.utils import getaddresses, parseaddr, parsedate_to_datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailrouter.bounces import Bounce

__all__ = [
    "LOOP_HEADER",
    "MAX_REFERENCES",
    "ParsedMessage",
    "automatic_reason",
    "content_hash",
    "decode_text",
    "format_id",
    "header_section",
    "lf_slices",
    "parse",
    "parse_ids",
    "strip_reply_prefixes",
    "trim_references",
]

MAX_ID_LEN = 998
# The References ids kept of a message: the first (the thread root) and the last 99 (the
# nearest ancestors), as netnews trims (RFC 5537 §3.4.4) and notices already do.
# Threading needs no more: the References rule takes the nearest stored ancestor, and the
# messages of a conversation that passed through here are stored, so one is normally among
# the last few ids (an agent's reply sent around mailrouter is a gap of one); the root
# catches the rest.  The longest References in ../shared/corpora has 13 ids.  Without a
# cap, a legal 1.6 MB message naming 40,000 ids wrote 40,000 message_refs rows and looked
# up 40,000-id IN lists on the single writer thread, holding the write lock; with it a
# message writes at most 101 rows and a look-up binds at most 102 ids (below the 999
# variables older SQLite builds allow).
MAX_REFERENCES = 100
SYNTHETIC_DOMAIN = "synthetic.mailrouter.invalid"

# Added by transport on the way in: two deliveries of the same message differ only here,
# so they are left out of the content hash that makes ingest idempotent.
TRACE_HEADERS = frozenset(
    {
        b"received",
        b"return-path",
        b"delivered-to",
        b"x-original-to",
        b"envelope-to",
        b"x-envelope-to",
        b"x-mailrouter-interaction",
        b"x-mailrouter-routed-from",
    }
)

_ANGLE_RE = re.compile(r"<([^<>]*)>")
_WS_RE = re.compile(r"\s+")
_REPLY_PREFIX_RE = re.compile(
    r"^\s*((re|aw|sv|vs|antw|r|rif|réf|ref)\s*(\[\d+\]|\(\d+\))?\s*[:：]\s*)+", re.IGNORECASE
)


def _header_text(value: object) -> str:
    """A header value as a str, encoded-words still encoded, raw 8-bit bytes read as UTF-8."""
    if isinstance(value, Header):
        # compat32 wraps a value holding raw 8-bit bytes (RFC 6532 UTF-8 headers, legacy
        # clients) in a Header whose str() turns every such byte into U+FFFD.  encode() keeps
        # the bytes, inside unknown-8bit encoded-words, so they can be read back as UTF-8.
        parts: list[str] = []
        for chunk, _charset in decode_header(value.encode(maxlinelen=0)):
            parts.append(chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else chunk)
        return "".join(parts)
    return str(value)


def _unfold(text: str) -> str:
    """RFC 5322 unfolding: drop the CRLF, keep the whitespace that follows it."""
    return text.replace("\r", "").replace("\n", "")


def decode_text(value: object) -> str:
    """A header value as readable text: RFC 2047 decoded, raw 8-bit bytes as UTF-8."""
    if value is None:
        return ""
    text = _header_text(value)
    # Only an encoded-word ("=?charset?q?…?=") needs decoding; most fields have none, and
    # decode_header + make_header cost ~10 µs a field, ten fields a message.
    if "=?" in text:
        # A broken encoded-word stays as written: readable beats lost.
        with contextlib.suppress(ValueError, LookupError, UnicodeError, AssertionError):
            text = str(make_header(decode_header(text)))
    # compat32 keeps undecodable bytes as surrogates; show them instead of failing later.
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return _WS_RE.sub(" ", text).strip()


def _clean_id(token: str) -> str | None:
    tok = _WS_RE.sub("", token).strip("\"'<>,;")
    if not tok or len(tok) > MAX_ID_LEN:
        return None
    return tok


def _id_text(value: object) -> str:
    """An id header's value as text, every byte kept: valid UTF-8 as its characters, any
    other byte as a ``\\xNN`` escape.

    ``compat32`` hands raw 8-bit bytes over as surrogate escapes, and its ``Header`` for
    them prints each such byte as U+FFFD: ``<order-ü@…>`` and ``<order-é@…>`` both became
    ``order-��@…`` and joined each other's conversations.  Decoding is injective on valid
    UTF-8, and the escape keeps distinct invalid bytes distinct.
    """
    if isinstance(value, Header):
        parts: list[str] = []
        for chunk, _charset in decode_header(value.encode(maxlinelen=0)):
            parts.append(
                chunk.decode("utf-8", "backslashreplace") if isinstance(chunk, bytes) else chunk
            )
        return "".join(parts)
    text = str(value)
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _raw_values(msg: Message, name: str) -> list[str]:
    """Every ``name`` field of ``msg`` as written (before compat32 wraps 8-bit values)."""
    key = name.lower()
    return [value for field, value in msg.raw_items() if field.lower() == key]


def parse_ids(value: object) -> list[str]:
    """Message-ids in a Message-ID / In-Reply-To / References value, in order, bare.

    ``<a@b> <c@d>``, ``<a@b>,<c@d>``, ``"<a@b>"``, ``a@b c@d``, ids folded across lines
    and free text such as ``Your message of Monday <a@b>`` all yield the ids; a truncated
    ``<a@b`` yields none.  Non-ASCII ids are kept as written (see :func:`_id_text`).
    """
    if value is None:
        return []
    text = _id_text(value)
    text = text.replace("\r", "").replace("\n", "")
    bracketed = _ANGLE_RE.findall(text)
    # No complete <...>: whitespace/comma separated tokens that look like ids.  A token with
    # an opening bracket and no closing one was cut off (HyperKitty's ``<2007…@example``
    # for ``…@example.com``): it can never name the real parent, only some other message
    # whose id happens to be the prefix, and notices would copy it into References.
    # HyperKitty drops it too.
    candidates = bracketed or [t for t in re.split(r"[\s,]+", text) if "@" in t and "<" not in t]
    # One pass; a dict keeps first-seen order and dedupes in constant time per id (a list
    # membership test made a 40,000-id References quadratic).
    seen: dict[str, None] = {}
    for cand in candidates:
        cleaned = _clean_id(cand)
        if cleaned:
            seen[cleaned] = None
    return list(seen)


def trim_references(ids: Sequence[str], limit: int) -> list[str]:
    """``ids`` if there are at most ``limit``, else the first and the last ``limit - 1``.

    How a long References is trimmed (RFC 5537 §3.4.4 keeps the first and the last ids):
    the first id is the thread root, the last ones are the nearest ancestors.
    """
    if limit < 2:
        raise ValueError(f"references limit must be at least 2 (first and last id), got {limit}")
    if len(ids) <= limit:
        return list(ids)
    return [ids[0], *ids[len(ids) - (limit - 1) :]]


def format_id(bare: str) -> str:
    """The header form of a stored id."""
    return f"<{bare}>"


def strip_reply_prefixes(subject: str) -> str:
    """``Re: RE: Aw: Order 7`` → ``Order 7`` (so a reply gets exactly one ``Re:``)."""
    return _REPLY_PREFIX_RE.sub("", subject).strip()


# The lines the email package takes for header lines (its feedparser's ``headerRE``: a
# field name and a colon, a folded continuation, or a Unix ``From `` line), each with its
# line break: CRLF, CR or LF, as its line splitting has it.  The header section ends at
# the first line that is not one of these, the blank separator line or not.
_HEADER_LINES_RE = re.compile(
    rb"(?:(?:From |[\x21-\x39\x3b-\x7e]*:|[\t ])[^\r\n]*(?:\r\n|\r|\n|\Z))*"
)
# The end of the hashed header section: two line feeds once CRLF is read as LF.
_HASH_SEPARATOR_RE = re.compile(rb"\n\r?\n")
# A trace field's name as ``line.split(b":")[0].strip().lower()`` would find it, matched
# in place so that a long line is never copied to learn its name.
_TRACE_NAME_RE = re.compile(
    rb"[ \t\n\r\x0b\x0c]*(?:"
    + b"|".join(re.escape(name) for name in sorted(TRACE_HEADERS))
    + rb")[ \t\n\r\x0b\x0c]*",
    re.IGNORECASE,
)
# How much of a message is converted (CRLF → LF) at a time, for its hash and its Maildir
# copy: a 25 MB message then costs a few such slices of extra memory, not two copies.
_SLICE = 256 * 1024


def header_section(raw: bytes) -> bytes:
    """The leading header lines of ``raw``: all the email package reads as headers.

    ``BytesParser(headersonly=True)`` still decodes the whole message to text and joins the
    body into a payload (about eight times a message's size at its peak); given only these
    bytes it builds the same header fields and never sees the body.
    """
    match = _HEADER_LINES_RE.match(raw)
    assert match is not None  # the pattern matches the empty string
    return raw[: match.end()]


def content_hash(raw: bytes) -> str:
    """SHA-256 of the message without trace headers, line endings normalised to LF.

    What is hashed: the header lines up to the first blank line (CRLF read as LF), minus
    trace fields and their continuation lines, each with an LF; an LF; then the body with
    CRLF as LF.  Stored hashes are compared to find duplicates, so these bytes never change;
    they are fed to the hash in place (memoryview slices) and the body in slices, where the
    message used to be copied whole by ``replace`` and ``partition``.
    """
    h = hashlib.sha256()
    view = memoryview(raw)
    size = len(raw)
    sep = _HASH_SEPARATOR_RE.search(raw)
    head_end = sep.start() if sep is not None else size
    keep = True
    start = 0
    while True:
        nl = raw.find(b"\n", start, head_end)
        end = nl if nl >= 0 else head_end
        # The line as it reads after CRLF → LF: a CR just before an LF goes with the LF.
        stop = (
            end - 1
            if end > start and end < size and raw[end] == 0x0A and raw[end - 1] == 0x0D
            else end
        )
        # A continuation line (leading space or tab) is kept or dropped with its field.
        if raw[start : start + 1] not in (b" ", b"\t"):
            colon = raw.find(b":", start, stop)
            keep = _TRACE_NAME_RE.fullmatch(raw, start, colon if colon >= 0 else stop) is None
        if keep:
            h.update(view[start:stop])
            h.update(b"\n")
        if nl < 0:
            break
        start = nl + 1
    h.update(b"\n")
    if sep is not None:
        for piece in lf_slices(raw, sep.end()):
            h.update(piece)
    view.release()
    return h.hexdigest()


def lf_slices(raw: bytes, start: int = 0, size: int | None = None) -> Iterator[bytes]:
    """``raw[start:]`` with every CRLF as LF, in slices of about ``size`` bytes.

    The same bytes as ``raw[start:].replace(b"\\r\\n", b"\\n")`` without that copy of the
    whole message: a slice never ends between the CR and the LF of a pair.
    """
    step = max(2, size or _SLICE)
    total = len(raw)
    pos = start
    while pos < total:
        end = min(pos + step, total)
        if end < total and raw[end - 1] == 0x0D:
            end -= 1  # its LF may open the next slice: keep the pair together
        yield raw[pos:end].replace(b"\r\n", b"\n")
        pos = end


# The header our own outbound mail carries (notify/compose.py).  Seen on inbound mail, it
# means a message of ours (or of another mailrouter) came back: never answer it.
LOOP_HEADER = "X-Mailrouter-Loop"

# RFC 2369 and RFC 2919 list fields, and fml's own (a Japanese list manager).
_LIST_HEADERS = (
    "List-Id",
    "List-Unsubscribe",
    "List-Post",
    "List-Subscribe",
    "List-Help",
    "List-Owner",
    "List-Archive",
    "X-MLServer",
    "X-ML-Name",
)
_AUTOREPLY_HEADERS = ("X-Autoreply", "X-Autorespond", "X-Auto-Response", "X-Autogenerated")
# Senders no person writes as: bounces come from these, and mail to a no-reply address
# reaches nobody.  ``system administrator`` is Exchange 5.5/2000's NDR sender.
_ROBOT_SENDERS = frozenset(
    {
        "mailer-daemon",
        "mailer_daemon",
        "postmaster",
        "post_master",
        "system administrator",
        "noreply",
        "no-reply",
        "no_reply",
        "donotreply",
        "do-not-reply",
        "do_not_reply",
    }
)
# Subject beginnings of auto-replies and bounces that say so only in the subject (real
# examples in ../shared/corpora: flufl-bounce, sisimai, discourse).  Kept to wordings of
# mail systems: a customer's "Delivery of my order failed" must still get its notice.
_AUTOMATIC_SUBJECTS = (
    "auto:",
    "automatic reply",
    "auto-reply",
    "auto reply",
    "autoreply",
    "auto response",
    "autoresponse",
    "[auto generated]",
    "out of office",
    "automatische antwort",
    "réponse automatique",
    "respuesta automática",
    "risposta automatica",
    "undelivered mail returned",
    "undeliverable",
    "delivery status notification",
    "delivery failure notification",
    "delivery notification",
    "mail delivery failed",
    "mail delivery warning",
    "mail delivery failure",
    "mail could not be delivered",
    "returned mail",
    "failure notice",
    "complaint about message from",  # Hotmail's feedback reports before ARF
)


def _robot_sender(value: str) -> str | None:
    """The local part (or, without an address, the name) of a robot sender, or None."""
    name, addr = parseaddr(value)
    if not addr and not name:
        # parseaddr gives up on forms like <Postmaster\@host@host>: read the first token.
        addr = value.strip().strip('<>"')
    local = addr.rpartition("@")[0] if "@" in addr else addr
    for candidate in (local.split("\\")[0].split("@")[0], name if not addr else ""):
        key = candidate.strip().strip('"').lower()
        if key in _ROBOT_SENDERS:
            return key
    return None


def automatic_reason(msg: Message, envelope_sender: str | None = None) -> str | None:
    """Why this message is machine-generated (RFC 3834 and common practice), or None.

    Used to keep notices from answering bounces, auto-replies and list mail, which
    would start mail loops or reply to a robot.
    """
    # compat32's get() scans every field for each name asked; most names asked here are
    # absent, so one pass over the names answers them (a third of parse() before).
    present = {k.lower() for k in msg}

    def get(name: str) -> Any:
        return msg.get(name) if name.lower() in present else None

    auto = decode_text(get("Auto-Submitted")).lower()
    if auto and auto.split(";")[0].strip() != "no":
        return f"auto-submitted: {auto.split(';')[0].strip()}"
    if get(LOOP_HEADER) is not None:
        return f"mail loop ({LOOP_HEADER}: {decode_text(get(LOOP_HEADER))[:100]})"
    return_path = decode_text(get("Return-Path")).strip()
    if envelope_sender == "" or return_path == "<>":
        return "null sender"
    ctype = decode_text(get("Content-Type")).lower()
    if ctype.startswith("multipart/report"):
        return "delivery or disposition report (multipart/report)"
    if get("X-Failed-Recipients") is not None:
        return "bounce (X-Failed-Recipients)"
    precedence = decode_text(get("Precedence")).lower()
    if precedence in ("bulk", "list", "junk", "auto_reply"):
        return f"precedence: {precedence}"
    for name in _LIST_HEADERS:
        if get(name) is not None:
            return f"mailing list ({name})"
    for name in _AUTOREPLY_HEADERS:
        if get(name) is not None:
            return f"auto-reply ({name})"
    if decode_text(get("X-Apple-Action")).lower() == "vacation":
        return "auto-reply (X-Apple-Action: vacation)"
    if get("X-Loop") is not None:
        return "mail loop (X-Loop)"
    robot = _robot_sender(decode_text(get("From")))
    if robot is not None:
        return (
            f"bounce (from {robot})"
            if robot in ("mailer-daemon", "postmaster")
            else (f"robot sender (from {robot})")
        )
    for source in (envelope_sender, return_path):
        if source and _robot_sender(source) == "mailer-daemon":
            return "bounce (return path mailer-daemon)"
    subject = decode_text(get("Subject")).lower()
    for marker in _AUTOMATIC_SUBJECTS:
        if subject.startswith(marker):
            return f"automatic subject ({marker.rstrip(':')})"
    return None


@dataclass(frozen=True)
class ParsedMessage:
    """The facts routing needs of one message, as :func:`parse` read them.

    ``parse()`` keeps one ``in_reply_to`` id and at most :data:`MAX_REFERENCES`
    ``references``, so ``parents`` and everything stored or looked up from it is bounded.
    """

    raw: bytes
    headers: Message = field(repr=False)
    message_id: str
    synthetic_id: bool
    in_reply_to: list[str]
    references: list[str]
    from_name: str
    from_email: str
    reply_to_email: str
    recipients: list[str]  # To and Cc addresses, lowercased
    subject: str
    date: datetime | None
    content_hash: str
    automatic: str | None
    problem: str | None  # why it cannot be routed (held), or None
    # The SMTP envelope sender it came with ("" for the null sender), if it came with one.
    envelope_sender: str | None = None
    # Ids this message replies to, nearest first: In-Reply-To, then References last→first,
    # without repeats or its own id.  Computed once, when parsed: resolution and the insert
    # read it on the writer thread, where no message may cost more than its share.
    parents: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        nearest = dict.fromkeys([*self.in_reply_to, *reversed(self.references)])
        nearest.pop(self.message_id, None)
        object.__setattr__(self, "parents", list(nearest))

    @cached_property
    def bounce(self) -> Bounce | None:
        """The delivery status notification this is, if it is one (only automatic mail is
        read for that).  Computed once; the pipeline asks before the writer thread does."""
        if not self.automatic:
            return None
        from mailrouter.bounces import read_bounce

        return read_bounce(self.raw)

    @property
    def from_display(self) -> str:
        if self.from_name and self.from_email:
            return f"{self.from_name} <{self.from_email}>"
        return self.from_email or self.from_name

    def header(self, name: str) -> str:
        return decode_text(self.headers.get(name))


def _address(value: object) -> tuple[str, str]:
    # Split name from address *before* decoding encoded-words: a decoded display name may
    # hold commas, quotes or angle brackets (``=?utf-8?q?Doe=2C_John?=``) that parseaddr
    # would then take for address syntax and return a wrong address.
    if value is None:
        return "", ""
    name, addr = parseaddr(_unfold(_header_text(value)))
    return decode_text(name), addr.strip().lower()


def parse(raw: bytes, envelope_sender: str | None = None) -> ParsedMessage:
    """Parse ``raw``; never raises on bad input (problems end up in ``.problem``)."""
    # Only the header section is handed to the email package; the body is read only where
    # a header asks for it (a report's parts, lazily: ParsedMessage.bounce).
    msg = BytesParser(policy=compat32).parsebytes(header_section(raw), headersonly=True)
    digest = content_hash(raw)
    problem = None
    if not raw or raw.isspace():  # ``not raw.strip()`` without copying the message
        problem = "empty message"
    elif not msg.keys():
        problem = "no header fields (not an RFC 5322 message)"

    # The id fields as written (raw_items), so that 8-bit bytes in them survive.
    own = parse_ids(next(iter(_raw_values(msg, "Message-ID")), None))
    synthetic = not own
    message_id = own[0] if own else f"{digest[:40]}@{SYNTHETIC_DOMAIN}"
    in_reply_to = parse_ids(next(iter(_raw_values(msg, "In-Reply-To")), None))
    # Repeated References fields are joined (some clients split a long one), then trimmed.
    references = trim_references(
        parse_ids(" ".join(_raw_values(msg, "References"))), MAX_REFERENCES
    )

    from_name, from_email = _address(msg.get("From"))
    _rn, reply_to = _address(msg.get("Reply-To"))
    recipients: list[str] = []
    # Like _address: split before decoding, so encoded display names cannot fake addresses.
    for _n, addr in getaddresses(
        [_unfold(_header_text(v)) for n in ("To", "Cc") for v in msg.get_all(n) or []]
    ):
        addr = addr.strip().lower()
        if addr and addr not in recipients:
            recipients.append(addr)

    date = None
    try:
        date_raw = msg.get("Date")
        if date_raw is not None:
            date = parsedate_to_datetime(decode_text(date_raw))
            date = date.replace(tzinfo=UTC) if date.tzinfo is None else date.astimezone(UTC)
    except (TypeError, ValueError, IndexError, OverflowError):
        date = None

    return ParsedMessage(
        raw=raw,
        headers=msg,
        message_id=message_id,
        synthetic_id=synthetic,
        in_reply_to=in_reply_to[:1],
        references=references,
        from_name=from_name,
        from_email=from_email,
        reply_to_email=reply_to,
        recipients=recipients,
        subject=decode_text(msg.get("Subject")),
        date=date,
        content_hash=digest,
        automatic=automatic_reason(msg, envelope_sender),
        problem=problem,
        envelope_sender=envelope_sender,
    )
