"""Put a message into an account's mailbox with the backend the account is configured for
(Maildir in batches), and send mailrouter's own mail out; writes the headers a delivered
copy carries: our trace headers, and Return-Path and Delivered-To where we are the MDA.

Each delivery returns what the other side said (:class:`Delivered`), so the outbox can
record every attempt with its reply, and names its relay the way the log does
(``maildir``, ``pickup``, ``smtp:HOST:PORT``, ``lmtp:HOST:PORT``, ``imap:HOST:PORT``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from mailrouter.config import AccountSettings, OutboundSettings
from mailrouter.deliver.errors import (
    DeliveryError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from mailrouter.deliver.maildir import Drop, maildir_deliver_batch, maildir_settle, pickup_write

__all__ = [
    "Delivered",
    "Drop",
    "adds_envelope_headers",
    "deliver_to_account",
    "deliver_to_maildirs",
    "relay_of_account",
    "relay_of_outbound",
    "send_outbound",
    "settle_maildirs",
    "trace_head",
]


@dataclass(frozen=True)
class Delivered:
    """A successful delivery: where to (``relay``) and what the server answered."""

    relay: str
    reply: str

    @property
    def backend(self) -> str:
        return self.relay.split(":", 1)[0]


def relay_of_account(account: AccountSettings) -> str:
    """Where deliveries into ``account``'s mailbox go, as the log and ``trace`` name it."""
    d = account.delivery
    if d.type == "maildir":
        return "maildir"
    return f"{d.type}:{d.host}:{d.port}"


def relay_of_outbound(outbound: OutboundSettings) -> str:
    """Where notices and replies go: ``pickup`` or ``smtp:HOST:PORT``."""
    if outbound.type == "pickup":
        return "pickup"
    return f"smtp:{outbound.host}:{outbound.port}"


# Our trace headers claim facts about routing ("this came to sales@ and was routed here"),
# which agents and filters trust.  An inbound copy of one is a forgery (or a copy of our
# own old trace) and is dropped from the delivered copy.  X-Mailrouter-Loop is the one
# exception: it only ever marks mail as automatic, so a forged one can do no more than
# suppress a notice, and a real one must survive to stop a loop on the next hop.
_OURS = b"x-mailrouter-"
_KEEP = frozenset({b"x-mailrouter-loop"})
# RFC 5321 §4.4: the final delivery adds Return-Path; one already there came from the
# sender (or an earlier hop) and says nothing true about this delivery's envelope.
_RETURN_PATH = b"return-path"
# Characters that could end the field or the address early: never copied into a header.
_UNSAFE = str.maketrans("", "", "\r\n<>")


def _header_end(raw: bytes) -> int:
    """The end of the header section: just after its last field's line break (0 if empty)."""
    if raw[:1] in (b"\n", b"\r"):
        return 0
    found = [
        i + len(sep) // 2 for sep in (b"\n\n", b"\r\n\r\n", b"\r\r") if (i := raw.find(sep)) >= 0
    ]
    return min(found) if found else len(raw)


def _strip_fields(raw: bytes, *, return_path: bool) -> bytes:
    """``raw`` without inbound ``X-Mailrouter-*`` fields (and ``Return-Path`` ones when
    asked), folded lines included; else ``raw`` itself."""
    end = _header_end(raw)
    head = raw[:end].lower()
    if _OURS not in head and not (return_path and _RETURN_PATH in head):
        return raw  # the common case: nothing to remove, nothing copied
    out: list[bytes] = []
    dropping = False
    for line in raw[:end].splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):  # a folded continuation belongs to the field above
            if not dropping:
                out.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower()
        dropping = (name.startswith(_OURS) and name not in _KEEP) or (
            return_path and name == _RETURN_PATH
        )
        if not dropping:
            out.append(line)
    return b"".join(out) + raw[end:]


def trace_head(
    raw: bytes,
    interaction_id: int | None,
    routed_from: str | None,
    *,
    return_path: str | None = None,
    delivered_to: str | None = None,
    strip_return_path: bool = False,
) -> tuple[bytes, bytes]:
    """The ``X-Mailrouter-*`` trace fields to prepend, and ``raw`` without inbound copies
    of them (``raw`` itself, not a copy, when it has none): kept apart so that a writer
    can put one before the other without joining them into a second copy of the message.

    As a final delivery (an MDA) does, ``return_path`` (the envelope sender; ``""`` is the
    null sender, written ``<>``) replaces any inbound ``Return-Path`` at the top, and
    ``delivered_to`` (the mailbox's address) is added above the ``Delivered-To`` fields
    already there.  ``return_path=None`` means the envelope is unknown (replayed or
    IMAP-watched mail, whose Return-Path its own MDA wrote): inbound ones then stay.
    ``strip_return_path`` drops inbound ones without adding ours, for a server that
    writes its own from our MAIL FROM (LMTP: Dovecot keeps what it is given, above its
    own).  Every other byte of the original stays as it was.
    """
    raw = _strip_fields(raw, return_path=return_path is not None or strip_return_path)
    eol = b"\r\n" if b"\r\n" in raw[:2000] else b"\n"
    lines = []
    if return_path is not None:
        lines.append(b"Return-Path: <" + return_path.translate(_UNSAFE).encode() + b">" + eol)
    if delivered_to:
        lines.append(b"Delivered-To: " + delivered_to.translate(_UNSAFE).encode() + eol)
    if interaction_id is not None:
        lines.append(b"X-Mailrouter-Interaction: " + str(interaction_id).encode() + eol)
    if routed_from:
        lines.append(b"X-Mailrouter-Routed-From: " + routed_from.encode() + eol)
    return b"".join(lines), raw


def adds_envelope_headers(account: AccountSettings) -> bool:
    """Whether our copy for ``account`` must carry Return-Path and Delivered-To itself.

    Into a Maildir or over IMAP APPEND we are the final delivery; an LMTP server (Dovecot)
    writes them itself from our MAIL FROM and RCPT TO, so adding ours would double them.
    """
    return account.delivery.type in ("maildir", "imap")


async def deliver_to_maildirs(drops: Sequence[Drop]) -> list[Delivered | DeliveryError]:
    """Deliver a batch of Maildir drops (see :mod:`mailrouter.deliver.maildir`): one
    outcome per drop, in order.  Call :func:`settle_maildirs` once they are recorded."""
    outcomes = await asyncio.to_thread(maildir_deliver_batch, drops)
    out: list[Delivered | DeliveryError] = []
    for drop, outcome in zip(drops, outcomes, strict=True):
        if isinstance(outcome, OSError):
            # A full disk or a permission problem is an operator's fix away: retry.
            out.append(TemporaryDeliveryError(f"maildir {drop.path}: {outcome}"))
        elif outcome.earlier:
            out.append(
                Delivered("maildir", f"stored before (an earlier attempt linked {outcome.file})")
            )
        else:
            out.append(Delivered("maildir", f"stored as {outcome.file}"))
    return out


async def settle_maildirs(drops: Sequence[Drop]) -> None:
    """The drops' outcomes are committed: drop the evidence a retry would have needed."""
    if drops:
        await asyncio.to_thread(maildir_settle, drops)


async def deliver_to_account(
    account: AccountSettings, raw: bytes, *, message_id: str, key: str, mail_from: str = ""
) -> Delivered:
    """Deliver into ``account``'s mailbox; raises a DeliveryError on failure.

    ``mail_from`` is the envelope sender an LMTP server is told (its Return-Path).  A
    Maildir delivery here is a batch of one: its caller settles it (:func:`settle_maildirs`)
    once the outcome is recorded.
    """
    d = account.delivery
    relay = relay_of_account(account)
    if d.type == "maildir":
        assert d.path is not None
        [outcome] = await deliver_to_maildirs([Drop(d.path, raw, key)])
        if isinstance(outcome, DeliveryError):
            raise outcome
        return outcome
    if d.type == "imap":
        from mailrouter.deliver.imap_append import deliver_imap

        return Delivered(relay, await deliver_imap(d, raw, message_id=message_id))
    if d.type == "lmtp":
        from mailrouter.deliver.lmtp import deliver_lmtp

        return Delivered(
            relay,
            await deliver_lmtp(d, raw, recipient=d.user or account.address, mail_from=mail_from),
        )
    raise PermanentDeliveryError(f"unknown delivery type {d.type!r}")


async def send_outbound(
    outbound: OutboundSettings, raw: bytes, *, envelope_from: str, envelope_to: list[str], key: str
) -> Delivered:
    """Send mailrouter's own mail (notices, replies) the configured way."""
    if not raw.strip():
        # A notice whose template failed is recorded as a failed outbox row with nothing
        # in it; retrying that row must never put an empty message on the wire.
        raise PermanentDeliveryError(
            "nothing to send: this message was never composed (see the transfer's "
            "notification reason; a fixed template is not re-rendered)"
        )
    relay = relay_of_outbound(outbound)
    if outbound.type == "pickup":
        assert outbound.path is not None
        try:
            final = await asyncio.to_thread(pickup_write, outbound.path, raw, key)
        except OSError as exc:
            raise TemporaryDeliveryError(f"pickup {outbound.path}: {exc}") from exc
        return Delivered(relay, f"written to {final}")
    from mailrouter.deliver.smtp import submit_smtp

    sent = await submit_smtp(outbound, raw, envelope_from=envelope_from, envelope_to=envelope_to)
    return Delivered(relay, sent.reply)
