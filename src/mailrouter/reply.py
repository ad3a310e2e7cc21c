"""An agent's reply to the customer, sent from the interaction's *current* account.

Like a transfer notice it is composed as a threaded reply to the last customer message,
stored as an outbound message (so the customer's answer to it resolves to this
interaction) and queued in the same transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mailrouter.deliver.outbox import queue_outbound
from mailrouter.errors import Refused
from mailrouter.log import event
from mailrouter.notify import answer_address, compose_reply, own_addresses
from mailrouter.parse import format_id, parse
from mailrouter.runtime import Runtime
from mailrouter.store.models import OutboxKind, utcnow
from mailrouter.store.queries import last_customer_raw, lock_interaction

__all__ = ["ReplyRefused", "ReplyResult", "reply"]

log = logging.getLogger("mailrouter.reply")


class ReplyRefused(Refused):
    """The reply cannot be sent; nothing was changed."""


@dataclass(frozen=True)
class ReplyResult:
    interaction_id: int
    account: str
    message_id: str
    to: list[str]
    outbox_id: int


def reply(rt: Runtime, interaction_id: int, body: str, *, agent: str | None = None) -> ReplyResult:
    """Compose and queue an agent's reply to the interaction's customer, in one transaction."""
    if not body.strip():
        raise ReplyRefused("empty-body", "the reply body is empty")
    with rt.db.write() as s:
        i = lock_interaction(s, interaction_id)
        if i is None:
            raise ReplyRefused("not-found", f"no interaction {interaction_id}")
        if i.last_customer_message_pk is None:
            raise ReplyRefused(
                "no-customer-message",
                f"interaction {interaction_id} has no customer message to answer",
            )
        raw = last_customer_raw(s, i)
        assert raw is not None
        customer = parse(raw)
        # Rule 4's Reply-To-else-From, but never one of our own accounts.
        address, why_not = answer_address(customer, automatic=False, own=own_addresses(rt.settings))
        if address is None:
            raise ReplyRefused(
                "no-customer-address",
                f"the customer's last message has no usable From or Reply-To ({why_not})",
            )
        account = rt.account_of(i.account_id)
        try:
            composed = compose_reply(
                rt.settings,
                account=account,
                customer=customer,
                body_text=body,
                interaction_id=i.id,
                agent=agent,
            )
        except ValueError as exc:
            raise ReplyRefused("bad-reply", str(exc)) from None
        _, outbox_pk = queue_outbound(
            s,
            rt.settings,
            composed,
            kind=OutboxKind.REPLY,
            account_id=i.account_id,
            interaction_id=i.id,
            source="reply",
        )
        i.last_activity_at = utcnow()
        if agent and not i.assigned_agent:
            i.assigned_agent = agent
        result = ReplyResult(
            i.id, account.name, composed.message_id, composed.envelope_to, outbox_pk
        )
    event(
        log,
        "reply",
        interaction=interaction_id,
        account=account.address,
        msgid=format_id(result.message_id),
        to=",".join(result.to),
        by=agent,
    )
    return result
