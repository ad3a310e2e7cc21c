"""Transfer an interaction to another account: one transaction, or nothing at all.

The owner changes, the interaction becomes unread, unassigned and ``manual`` (picked from
the list, not distributed by a queue), the transfer is recorded and — when the *source*
account has ``transfer.notify`` on — the notice is composed and written to the outbox in
the same transaction.  Any refusal raises before a single row changes.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

from mailrouter.config import AccountSettings
from mailrouter.deliver.outbox import queue_outbound
from mailrouter.errors import Refused
from mailrouter.interactions import visible
from mailrouter.log import event
from mailrouter.notify import TemplateError, compose_notice, suppression_reason
from mailrouter.parse import format_id, parse
from mailrouter.runtime import Runtime
from mailrouter.store.models import OutboxKind, Transfer, utcnow
from mailrouter.store.queries import (
    last_customer_raw,
    latest_inbound_automatic,
    lock_interaction,
)

__all__ = ["TransferRefused", "TransferResult", "transfer"]

log = logging.getLogger("mailrouter.transfer")


class TransferRefused(Refused):
    """The transfer is not allowed; nothing was changed."""


@dataclass(frozen=True)
class TransferResult:
    transfer_id: int
    interaction_id: int
    from_account: str
    to_account: str
    notification: str  # queued | suppressed | off
    reason: str | None
    notice_message_id: str | None
    outbox_id: int | None


def _account(rt: Runtime, name: str) -> AccountSettings:
    try:
        return rt.settings.account(name)
    except KeyError as exc:
        raise TransferRefused("unknown-account", str(exc.args[0])) from None


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
    target = _account(rt, to)
    with rt.db.write() as s:
        try:
            interaction = visible(lock_interaction(s, interaction_id), interaction_id, within)
        except Refused as exc:
            raise TransferRefused(exc.code, exc.message) from None
        source = rt.account_of(interaction.account_id)
        if interaction.status == "closed":
            raise TransferRefused("closed", f"interaction {interaction_id} is closed")
        if source.name == target.name:
            raise TransferRefused(
                "same-account", f"interaction {interaction_id} already belongs to {target.name}"
            )
        if not source.transfer.enabled:
            raise TransferRefused(
                "transfer-not-enabled",
                f"transfer out of account {source.name} is not enabled "
                f"(set accounts.{source.name}.transfer.enabled = true)",
            )
        now = utcnow()
        interaction.account_id = rt.accounts.id(target.name)
        interaction.unread = True
        interaction.distribution = "manual"
        interaction.assigned_agent = None
        interaction.last_activity_at = now
        record = Transfer(
            interaction_id=interaction.id,
            from_account_id=rt.accounts.id(source.name),
            to_account_id=rt.accounts.id(target.name),
            actor=actor,
            at=now,
            notification="off",
        )
        s.add(record)
        s.flush()

        outbox_id: int | None = None
        notice_id: str | None = None
        # The notice follows the settings of the account the interaction leaves (the most
        # recent previous owner, not the origin), and names that account as fromAccount.
        if source.transfer.notify and source.transfer.template:
            raw = last_customer_raw(s, interaction)
            customer = parse(raw) if raw is not None else None
            # Any automatic mail since (a bounce from MAILER-DAEMON, an auto-reply) means
            # no notice: answering it mails a robot or starts a loop.
            auto = latest_inbound_automatic(s, interaction.id)
            why = (
                f"last customer message is automatic: {auto}"
                if auto
                else suppression_reason(customer)
            )
            if why is not None:
                record.notification, record.notification_reason = "suppressed", why
            else:
                assert customer is not None
                try:
                    notice = compose_notice(
                        rt.settings,
                        template=source.transfer.template,
                        from_account=source,
                        to_account=target,
                        customer=customer,
                        interaction_id=interaction.id,
                        agent=actor,
                        now=now,
                    )
                except TemplateError as exc:
                    # The account promises customers a notice on every transfer: a broken
                    # template refuses the transfer (the transaction rolls back) rather than
                    # move the conversation silently.
                    raise TransferRefused(
                        "template-failed", f"notice template of account {source.name} failed: {exc}"
                    ) from exc
                _, outbox_pk = queue_outbound(
                    s,
                    rt.settings,
                    notice,
                    kind=OutboxKind.NOTIFY,
                    account_id=rt.accounts.id(target.name),
                    interaction_id=interaction.id,
                    source="transfer-notice",
                )
                record.notification = "queued"
                record.notification_message_id = notice.message_id
                record.notification_outbox_id = outbox_pk
                outbox_id, notice_id = outbox_pk, notice.message_id
        result = TransferResult(
            transfer_id=record.id,
            interaction_id=interaction.id,
            from_account=source.name,
            to_account=target.name,
            notification=record.notification,
            reason=record.notification_reason,
            notice_message_id=notice_id,
            outbox_id=outbox_id,
        )
    event(
        log,
        "transfer",
        interaction=result.interaction_id,
        src=source.address,
        dst=target.address,
        by=actor,
        notice=result.notification,
        reason=result.reason,
        notice_msgid=format_id(notice_id) if notice_id else None,
    )
    return result
