"""Put a message into an account's mailbox with the backend the account is configured for,
and send mailrouter's own mail out; adds the trace headers a routed copy carries.

Each delivery returns what the other side said (:class:`Delivered`), so the outbox can
record every attempt with its reply, and names its relay the way the log does
(``maildir``, ``pickup``, ``smtp:HOST:PORT``, ``lmtp:HOST:PORT``, ``imap:HOST:PORT``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from mailrouter.config import AccountSettings, OutboundSettings
from mailrouter.deliver.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailrouter.deliver.maildir import maildir_deliver, pickup_write

__all__ = [
    "Delivered",
    "deliver_to_account",
    "relay_of_account",
    "relay_of_outbound",
    "send_outbound",
    "with_trace_headers",
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


def _header_end(raw: bytes) -> int:
    """The end of the header section: just after its last field's line break (0 if empty)."""
    if raw[:1] in (b"\n", b"\r"):
        return 0
    found = [
        i + len(sep) // 2 for sep in (b"\n\n", b"\r\n\r\n", b"\r\r") if (i := raw.find(sep)) >= 0
    ]
    return min(found) if found else len(raw)


def _strip_our_headers(raw: bytes) -> bytes:
    """``raw`` without inbound ``X-Mailrouter-*`` fields (folded lines included), else as is."""
    end = _header_end(raw)
    if _OURS not in raw[:end].lower():
        return raw  # the common case: nothing to remove, nothing copied
    out: list[bytes] = []
    dropping = False
    for line in raw[:end].splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):  # a folded continuation belongs to the field above
            if not dropping:
                out.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower()
        dropping = name.startswith(_OURS) and name not in _KEEP
        if not dropping:
            out.append(line)
    return b"".join(out) + raw[end:]


def with_trace_headers(raw: bytes, interaction_id: int | None, routed_from: str | None) -> bytes:
    """Prepend ``X-Mailrouter-*`` trace headers, dropping inbound copies of them first.

    Every other byte of the original stays as it was.
    """
    raw = _strip_our_headers(raw)
    eol = b"\r\n" if b"\r\n" in raw[:2000] else b"\n"
    lines = []
    if interaction_id is not None:
        lines.append(b"X-Mailrouter-Interaction: " + str(interaction_id).encode() + eol)
    if routed_from:
        lines.append(b"X-Mailrouter-Routed-From: " + routed_from.encode() + eol)
    return b"".join(lines) + raw


async def deliver_to_account(
    account: AccountSettings, raw: bytes, *, message_id: str, key: str, retry: bool = True
) -> Delivered:
    """Deliver into ``account``'s mailbox; raises a DeliveryError on failure.

    ``retry``: an earlier attempt of this job may have delivered it (see maildir_deliver).
    """
    d = account.delivery
    relay = relay_of_account(account)
    if d.type == "maildir":
        assert d.path is not None
        try:
            final = await asyncio.to_thread(maildir_deliver, d.path, raw, key, retry=retry)
        except OSError as exc:
            # A full disk or a permission problem is an operator's fix away: retry.
            raise TemporaryDeliveryError(f"maildir {d.path}: {exc}") from exc
        return Delivered(relay, f"stored as {final}")
    if d.type == "imap":
        from mailrouter.deliver.imap_append import deliver_imap

        return Delivered(relay, await deliver_imap(d, raw, message_id=message_id))
    if d.type == "lmtp":
        from mailrouter.deliver.lmtp import deliver_lmtp

        return Delivered(relay, await deliver_lmtp(d, raw, recipient=d.user or account.address))
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
