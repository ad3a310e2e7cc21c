"""Transfer an interaction to another account: one transaction, or nothing at all.

The owner changes, the interaction becomes unread, unassigned and ``manual`` (picked from
the list, not distributed by a queue), the transfer is recorded and — when the *source*
account has ``transfer.notify`` on — the notice is written to the outbox in the same
transaction.  Any refusal raises before a single row changes.

The notice is composed *before* that transaction, from a read of the interaction: a
template render may take seconds (it is bounded, see notify/templates.py) and must never
hold the write lock, which every SMTP session waits on.  The write transaction then checks
that the interaction is as it was read (owner, status, latest messages) and applies; if
something changed meanwhile, it starts over.  A notice that cannot be composed never
blocks the transfer: the transfer happens and its notice is recorded as failed, with the
template's error, on the transfer (``show``) and on a failed outbox row (``queue``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from mailrouter.config import AccountSettings
from mailrouter.deliver.outbox import queue_outbound
from mailrouter.errors import Refused
from mailrouter.interactions import visible
from mailrouter.log import event
from mailrouter.notify import (
    Composed,
    NoticeSuppressed,
    TemplateError,
    answer_address,
    compose_notice,
    own_addresses,
    suppression_reason,
)
from mailrouter.parse import format_id, parse
from mailrouter.runtime import Runtime
from mailrouter.store.inserts import insert_outbox
from mailrouter.store.models import (
    Interaction,
    OutboxKind,
    OutboxStatus,
    Transfer,
    utcnow,
)
from mailrouter.store.queries import (
    last_customer_raw,
    latest_inbound_message,
    lock_interaction,
    notices_to_since,
)

__all__ = ["TransferRefused", "TransferResult", "transfer"]

log = logging.getLogger("mailrouter.transfer")

# How often a transfer starts over when the interaction changed while its notice was
# being composed (a new customer message, a concurrent transfer) before it gives up.
_ATTEMPTS = 3


class TransferRefused(Refused):
    """The transfer is not allowed; nothing was changed."""

    source: str | None = None  # the account it would have left, once known


@dataclass(frozen=True)
class TransferResult:
    transfer_id: int
    interaction_id: int
    from_account: str
    to_account: str
    notification: str  # queued | suppressed | failed | off
    reason: str | None
    notice_message_id: str | None
    outbox_id: int | None


# What the notice was composed from: the write transaction applies the plan only if the
# interaction still looks like this (owner, status, last customer message, latest inbound).
_Snapshot = tuple[int, str, int | None, int | None]


@dataclass(frozen=True)
class _Plan:
    snapshot: _Snapshot
    now: datetime
    notification: str  # queued | suppressed | failed | off
    reason: str | None = None
    notice: Composed | None = None
    to_address: str | None = None  # where the notice goes (for the daily cap)


def _account(rt: Runtime, name: str) -> AccountSettings:
    try:
        return rt.settings.account(name)
    except KeyError as exc:
        raise TransferRefused("unknown-account", str(exc.args[0])) from None


def _from(source: AccountSettings, code: str, message: str) -> TransferRefused:
    refused = TransferRefused(code, message)
    refused.source = source.name
    return refused


def _check(
    rt: Runtime,
    found: Interaction | None,
    interaction_id: int,
    target: AccountSettings,
    within: Collection[str] | None,
) -> tuple[Interaction, AccountSettings]:
    """The refusals, in order; returns the interaction and the account it leaves."""
    try:
        interaction = visible(found, interaction_id, within)
    except Refused as exc:
        raise TransferRefused(exc.code, exc.message) from None
    source = rt.account_of(interaction.account_id)
    if interaction.status == "closed":
        raise _from(source, "closed", f"interaction {interaction_id} is closed")
    if source.name == target.name:
        raise _from(
            source,
            "same-account",
            f"interaction {interaction_id} already belongs to {target.name}",
        )
    if not source.transfer.enabled:
        raise _from(
            source,
            "transfer-not-enabled",
            f"transfer out of account {source.name} is not enabled "
            f"(set accounts.{source.name}.transfer.enabled = true)",
        )
    return interaction, source


def _snapshot(interaction: Interaction, latest: tuple[int, str | None] | None) -> _Snapshot:
    return (
        interaction.account_id,
        interaction.status,
        interaction.last_customer_message_pk,
        latest[0] if latest else None,
    )


def _over_cap(rt: Runtime, s: Session, address: str, now: datetime) -> str | None:
    """Why ``address`` gets no more automatic mail today, or None."""
    cap = rt.settings.notify.max_auto_per_customer_per_day
    sent = notices_to_since(s, address, now - timedelta(days=1))
    if sent >= cap:
        return (
            f"automatic mail limit reached: {sent} notices to {address} in 24 hours "
            f"(notify.max_auto_per_customer_per_day = {cap})"
        )
    return None


def _prepare(
    rt: Runtime,
    interaction_id: int,
    target: AccountSettings,
    actor: str | None,
    within: Collection[str] | None,
) -> _Plan:
    """Read the interaction, decide about the notice and compose it, outside any write."""
    with rt.db.read() as s:
        interaction, source = _check(
            rt, s.get(Interaction, interaction_id), interaction_id, target, within
        )
        latest = latest_inbound_message(s, interaction.id)
        snapshot, now = _snapshot(interaction, latest), utcnow()
        # The notice follows the settings of the account the interaction leaves (the most
        # recent previous owner, not the origin), and names that account as fromAccount.
        if not (source.transfer.notify and source.transfer.template):
            return _Plan(snapshot, now, "off")
        raw = last_customer_raw(s, interaction)
        customer = parse(raw) if raw is not None else None
        # Any automatic mail since (a bounce from MAILER-DAEMON, an auto-reply) means no
        # notice: answering it mails a robot or starts a loop.  The classification stored
        # at ingest decides: it saw the envelope sender, which the raw bytes do not carry.
        auto = latest[1] if latest else None
        own = own_addresses(rt.settings)
        why = (
            f"last customer message is automatic: {auto}"
            if auto
            else suppression_reason(customer, own)
        )
        address = None
        if why is None:
            assert customer is not None
            address = answer_address(customer, automatic=True, own=own)[0]
            assert address is not None
            why = _over_cap(rt, s, address, now)
    if why is not None:
        return _Plan(snapshot, now, "suppressed", why)
    assert customer is not None and address is not None
    try:
        notice = compose_notice(
            rt.settings,
            template=source.transfer.template,
            from_account=source,
            to_account=target,
            customer=customer,
            interaction_id=interaction_id,
            agent=actor,
            now=now,
        )
    except NoticeSuppressed as exc:
        return _Plan(snapshot, now, "suppressed", exc.reason)
    except TemplateError as exc:
        # The account promises customers a notice on every transfer, but a broken
        # template must not keep a conversation with the wrong team: the transfer goes
        # ahead and the failure is recorded where operators look.
        reason = f"notice template of account {source.name} failed: {exc}"
        return _Plan(snapshot, now, "failed", reason, to_address=address)
    except ValueError as exc:
        # The composed message failed its own header check: never send it.
        return _Plan(snapshot, now, "failed", f"notice not composed: {exc}", to_address=address)
    return _Plan(snapshot, now, "queued", notice=notice, to_address=address)


def _apply(
    rt: Runtime,
    interaction_id: int,
    target: AccountSettings,
    actor: str | None,
    within: Collection[str] | None,
    plan: _Plan,
) -> TransferResult | None:
    """The transfer itself, in one write transaction; None if the interaction changed."""
    with rt.db.write() as s:
        interaction, source = _check(
            rt, lock_interaction(s, interaction_id), interaction_id, target, within
        )
        if _snapshot(interaction, latest_inbound_message(s, interaction.id)) != plan.snapshot:
            return None  # nothing written yet: the caller prepares again
        notification, reason, notice = plan.notification, plan.reason, plan.notice
        if notice is not None and plan.to_address is not None:
            # Another transfer may have mailed the same customer meanwhile.
            over = _over_cap(rt, s, plan.to_address, plan.now)
            if over is not None:
                notification, reason, notice = "suppressed", over, None
        target_id = rt.accounts.id(target.name)
        interaction.account_id = target_id
        interaction.unread = True
        interaction.distribution = "manual"
        interaction.assigned_agent = None
        interaction.last_activity_at = plan.now
        record = Transfer(
            interaction_id=interaction.id,
            from_account_id=rt.accounts.id(source.name),
            to_account_id=target_id,
            actor=actor,
            at=plan.now,
            notification=notification,
            notification_reason=reason,
        )
        s.add(record)
        s.flush()

        outbox_id: int | None = None
        if notice is not None:
            _, outbox_id = queue_outbound(
                s,
                rt.settings,
                notice,
                kind=OutboxKind.NOTIFY,
                account_id=target_id,
                interaction_id=interaction.id,
                source="transfer-notice",
            )
            record.notification_message_id = notice.message_id
        elif notification == "failed":
            # A failed row with nothing in it, so `mailrouter queue` lists the failure
            # beside the other undeliverable mail (send_outbound refuses to send it).
            outbox_id = insert_outbox(
                s,
                kind=OutboxKind.NOTIFY.value,
                account_id=target_id,
                interaction_id=interaction.id,
                message_pk=None,
                payload=b"",
                envelope_from=target.address,
                envelope_to=plan.to_address or "",
                status=OutboxStatus.FAILED.value,
                attempts=0,
                created_at=plan.now,
                next_attempt_at=plan.now,
                deadline=plan.now,
                last_error=reason,
            )
        record.notification_outbox_id = outbox_id
        return TransferResult(
            transfer_id=record.id,
            interaction_id=interaction.id,
            from_account=source.name,
            to_account=target.name,
            notification=notification,
            reason=reason,
            notice_message_id=notice.message_id if notice is not None else None,
            outbox_id=outbox_id,
        )


def transfer(
    rt: Runtime,
    interaction_id: int,
    to: str,
    *,
    actor: str | None = None,
    within: Collection[str] | None = None,
) -> TransferResult:
    """Move interaction ``interaction_id`` to account ``to`` (name or address).

    ``within``: the accounts the caller acts for (see :mod:`mailrouter.interactions`); the
    target may be any configured account.
    """
    try:
        result = _transfer(rt, interaction_id, to, actor, within)
    except TransferRefused as exc:
        # Labels stay bounded: an unknown target is counted as "", never as what was typed.
        target = "" if exc.code == "unknown-account" else rt.settings.account(to).name
        rt.metrics.transferred(exc.source or "", target, exc.code)
        raise
    rt.metrics.transferred(result.from_account, result.to_account, "ok")
    if result.notification in ("queued", "suppressed", "failed"):
        rt.metrics.notice(result.notification)
    return result


def _transfer(
    rt: Runtime,
    interaction_id: int,
    to: str,
    actor: str | None,
    within: Collection[str] | None,
) -> TransferResult:
    target = _account(rt, to)
    for _ in range(_ATTEMPTS):
        plan = _prepare(rt, interaction_id, target, actor, within)
        result = _apply(rt, interaction_id, target, actor, within, plan)
        if result is not None:
            break
    else:
        raise TransferRefused(
            "busy",
            f"interaction {interaction_id} kept changing while its notice was being "
            "prepared; try again",
        )
    # account: the account the interaction leaves; owner: the one it now belongs to.
    event(
        log,
        "transfer",
        logging.WARNING if result.notification == "failed" else logging.INFO,
        interaction=result.interaction_id,
        account=rt.settings.account(result.from_account).address,
        owner=target.address,
        by=actor,
        notice=result.notification,
        reason=result.reason,
        notice_msgid=format_id(result.notice_message_id) if result.notice_message_id else None,
        queue=f"o{result.outbox_id}" if result.outbox_id is not None else None,
    )
    return result
