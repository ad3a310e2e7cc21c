"""Put a message into an account's mailbox with the backend the account is configured for,
and send mailrouter's own mail out; adds the trace headers a routed copy carries."""

from __future__ import annotations

import asyncio

from mailrouter.config import AccountSettings, OutboundSettings
from mailrouter.deliver.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailrouter.deliver.maildir import maildir_deliver, pickup_write

__all__ = ["deliver_to_account", "send_outbound", "with_trace_headers"]


def with_trace_headers(raw: bytes, interaction_id: int | None, routed_from: str | None) -> bytes:
    """Prepend ``X-Mailrouter-*`` trace headers; every original header stays as it was."""
    eol = b"\r\n" if b"\r\n" in raw[:2000] else b"\n"
    lines = []
    if interaction_id is not None:
        lines.append(b"X-Mailrouter-Interaction: " + str(interaction_id).encode() + eol)
    if routed_from:
        lines.append(b"X-Mailrouter-Routed-From: " + routed_from.encode() + eol)
    return b"".join(lines) + raw


async def deliver_to_account(
    account: AccountSettings, raw: bytes, *, message_id: str, key: str, retry: bool = True
) -> None:
    """Deliver into ``account``'s mailbox; raises a DeliveryError on failure.

    ``retry``: an earlier attempt of this job may have delivered it (see maildir_deliver).
    """
    d = account.delivery
    if d.type == "maildir":
        assert d.path is not None
        try:
            await asyncio.to_thread(maildir_deliver, d.path, raw, key, retry=retry)
        except OSError as exc:
            # A full disk or a permission problem is an operator's fix away: retry.
            raise TemporaryDeliveryError(f"maildir {d.path}: {exc}") from exc
        return
    if d.type == "imap":
        from mailrouter.deliver.imap_append import deliver_imap

        await deliver_imap(d, raw, message_id=message_id)
        return
    if d.type == "lmtp":
        from mailrouter.deliver.lmtp import deliver_lmtp

        await deliver_lmtp(d, raw, recipient=d.user or account.address)
        return
    raise PermanentDeliveryError(f"unknown delivery type {d.type!r}")


async def send_outbound(
    outbound: OutboundSettings, raw: bytes, *, envelope_from: str, envelope_to: list[str], key: str
) -> None:
    """Send mailrouter's own mail (notices, replies) the configured way."""
    if outbound.type == "pickup":
        assert outbound.path is not None
        try:
            await asyncio.to_thread(pickup_write, outbound.path, raw, key)
        except OSError as exc:
            raise TemporaryDeliveryError(f"pickup {outbound.path}: {exc}") from exc
        return
    from mailrouter.deliver.smtp import send_smtp

    await send_smtp(outbound, raw, envelope_from=envelope_from, envelope_to=envelope_to)
