"""An agent's reply to the customer, sent from the interaction's *current* account.

Like a transfer notice it is composed as a threaded reply to the last customer message,
stored as an outbound message (so the customer's answer to it resolves to this
interaction) and queued in the same transaction.

An ``idempotency_key`` (the API's ``Idempotency-Key`` header) is stored with the reply's
outcome in that same transaction: a retried request finds it and gets the first answer
back instead of a second mail, and no crash can separate "sent" from "remembered".
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailrouter.deliver.outbox import queue_outbound
from mailrouter.errors import Refused
from mailrouter.interactions import visible
from mailrouter.log import event
from mailrouter.notify import compose_reply
from mailrouter.parse import format_id, parse
from mailrouter.runtime import Runtime
from mailrouter.store.models import IdempotencyKey, Outbox, OutboxKind, utcnow
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
    replayed: bool = False  # an earlier request with the same idempotency key sent it


def _request_hash(interaction_id: int, body: str, close: bool) -> str:
    data = json.dumps([interaction_id, body, close], ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def _replay(s: Session, rt: Runtime, seen: IdempotencyKey, request_hash: str) -> ReplyResult:
    if seen.request_hash != request_hash:
        raise ReplyRefused(
            "idempotency-key-reused",
            f"idempotency key {seen.key!r} was already used for a different request",
        )
    outbox = s.get(Outbox, seen.outbox_id)
    assert outbox is not None
    return ReplyResult(
        seen.interaction_id,
        rt.accounts.name(outbox.account_id),
        seen.message_id,
        [a for a in outbox.envelope_to.split(",") if a],
        outbox.id,
        replayed=True,
    )


def reply(
    rt: Runtime,
    interaction_id: int,
    body: str,
    *,
    agent: str | None = None,
    close: bool = False,
    within: Collection[str] | None = None,
    idempotency_key: str | None = None,
) -> ReplyResult:
    """Compose and queue an agent's reply to the interaction's customer, in one transaction.

    ``close`` closes the interaction in the same transaction.  ``within``: the accounts the
    caller acts for (see :mod:`mailrouter.interactions`).  ``idempotency_key`` belongs to
    ``agent``: the same key with the same request answers the first result again
    (``replayed``); with a different request it is refused.
    """
    if not body.strip():
        raise ReplyRefused("empty-body", "the reply body is empty")
    request_hash = _request_hash(interaction_id, body, close)
    with rt.db.write() as s:
        # The row lock first: two tries of one request wait here for each other, and the
        # second then finds the first one's key.
        locked = lock_interaction(s, interaction_id)
        if idempotency_key is not None:
            seen = s.scalar(
                select(IdempotencyKey).where(
                    IdempotencyKey.agent == (agent or ""), IdempotencyKey.key == idempotency_key
                )
            )
            if seen is not None:
                # The first answer, even if the interaction has moved on since.
                return _replay(s, rt, seen, request_hash)
        try:
            i = visible(locked, interaction_id, within)
        except Refused as exc:
            raise ReplyRefused(exc.code, exc.message) from None
        if i.last_customer_message_pk is None:
            raise ReplyRefused(
                "no-customer-message",
                f"interaction {interaction_id} has no customer message to answer",
            )
        raw = last_customer_raw(s, i)
        assert raw is not None
        customer = parse(raw)
        if not (customer.reply_to_email or customer.from_email):
            raise ReplyRefused(
                "no-customer-address", "the customer's last message has no usable From or Reply-To"
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
        if close:
            i.status = "closed"
        if idempotency_key is not None:
            s.add(
                IdempotencyKey(
                    agent=agent or "",
                    key=idempotency_key,
                    request_hash=request_hash,
                    interaction_id=i.id,
                    message_id=composed.message_id,
                    outbox_id=outbox_pk,
                )
            )
            try:
                s.flush()
            except IntegrityError:
                # Only on PostgreSQL, where a request for another interaction with the
                # same key can run alongside: the transaction rolls back, nothing is sent.
                raise ReplyRefused(
                    "idempotency-key-in-use",
                    f"idempotency key {idempotency_key!r} is in use by another request",
                ) from None
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
        closed=close or None,
    )
    return result
