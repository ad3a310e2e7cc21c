"""``/api/v1/interactions``: list, show, read/unread, pick, transfer, reply, close.

Each route authenticates the agent, calls one domain operation with ``within=agent.scope``
(the access rule is checked inside the operation's transaction) and the agent's name as
the actor, then answers with the interaction as it is now.  GETs change nothing.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query

from mailrouter import interactions as ops
from mailrouter.agent_views import interaction_page, visible_detail
from mailrouter.errors import Refused
from mailrouter.http.api.models import (
    Interaction,
    InteractionDetail,
    InteractionPage,
    Reply,
    ReplyQueued,
    Transferred,
    TransferRequest,
)
from mailrouter.http.auth import CurrentAgent, RuntimeDep, WakeDep
from mailrouter.http.blocking import call, read
from mailrouter.http.problems import responses
from mailrouter.parse import format_id
from mailrouter.reply import reply
from mailrouter.runtime import Runtime
from mailrouter.store.models import Interaction as InteractionRow
from mailrouter.transfer import transfer
from mailrouter.views import interaction_dict

__all__ = ["router"]

router = APIRouter(prefix="/interactions", tags=["interactions"], responses=responses(401, 422))

InteractionId = Annotated[int, Path(ge=1, le=2**63 - 1, description="interaction id")]


async def _now(rt: Runtime, interaction_id: int) -> dict[str, Any]:
    """The interaction as it is after an operation (the caller may no longer see it)."""

    def get(s: Any) -> dict[str, Any]:
        i = s.get(InteractionRow, interaction_id)
        assert i is not None  # interactions are never deleted
        return interaction_dict(i)

    return await read(rt, get)


@router.get("", response_model=InteractionPage, responses=responses(404))
async def list_interactions(
    rt: RuntimeDep,
    agent: CurrentAgent,
    account: Annotated[
        str | None, Query(max_length=320, description="only this account's (name or address)")
    ] = None,
    unread: Annotated[bool | None, Query(description="only unread (true) or read (false)")] = None,
    status: Annotated[Literal["open", "closed"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the page before")
    ] = None,
) -> dict[str, Any]:
    """The interactions of the agent's accounts (all, for an admin): unread first, then by
    most recent activity, one page at a time."""
    page = await read(
        rt,
        lambda s: interaction_page(
            s,
            rt,
            agent,
            account=account,
            unread=unread,
            status=status,
            limit=limit,
            cursor=cursor,
        ),
    )
    return {"items": page.items, "next_cursor": page.next_cursor}


@router.get("/{interaction_id}", response_model=InteractionDetail, responses=responses(404))
async def show_interaction(
    rt: RuntimeDep, agent: CurrentAgent, interaction_id: InteractionId
) -> dict[str, Any]:
    """The interaction with its messages (original From/To kept) and its transfers."""
    return await read(rt, lambda s: visible_detail(s, agent, interaction_id))


@router.post("/{interaction_id}/read", response_model=Interaction, responses=responses(404))
async def mark_read(
    rt: RuntimeDep, agent: CurrentAgent, interaction_id: InteractionId
) -> dict[str, Any]:
    """Mark it read."""
    await call(ops.mark_read, rt, interaction_id, within=agent.scope)
    return await _now(rt, interaction_id)


@router.post("/{interaction_id}/unread", response_model=Interaction, responses=responses(404))
async def mark_unread(
    rt: RuntimeDep, agent: CurrentAgent, interaction_id: InteractionId
) -> dict[str, Any]:
    """Mark it unread (bold in the lists again)."""
    await call(ops.mark_unread, rt, interaction_id, within=agent.scope)
    return await _now(rt, interaction_id)


@router.post("/{interaction_id}/pick", response_model=Interaction, responses=responses(404, 409))
async def pick(
    rt: RuntimeDep, agent: CurrentAgent, interaction_id: InteractionId
) -> dict[str, Any]:
    """Assign it to the caller and mark it read.  Picking it again is harmless; 409 while
    another agent holds it."""
    await call(ops.pick, rt, interaction_id, agent.name, within=agent.scope)
    return await _now(rt, interaction_id)


@router.post("/{interaction_id}/close", response_model=Interaction, responses=responses(404))
async def close(
    rt: RuntimeDep, agent: CurrentAgent, interaction_id: InteractionId
) -> dict[str, Any]:
    """Close it (new customer mail in its thread reopens it)."""
    await call(ops.close, rt, interaction_id, within=agent.scope)
    return await _now(rt, interaction_id)


@router.post(
    "/{interaction_id}/transfer",
    response_model=Transferred,
    responses=responses(404, 409, 413),
)
async def transfer_interaction(
    rt: RuntimeDep,
    agent: CurrentAgent,
    wake: WakeDep,
    interaction_id: InteractionId,
    body: TransferRequest,
) -> dict[str, Any]:
    """Transfer it to another account: it becomes unread, unassigned and picked from the
    list there, and the customer gets a notice if the source account sends them.  409 if
    the source account does not allow transfers, the interaction is closed or already
    there."""
    r = await call(transfer, rt, interaction_id, body.to, actor=agent.name, within=agent.scope)
    if r.outbox_id is not None:
        wake()
    notice = f"suppressed: {r.reason}" if r.notification == "suppressed" else r.notification
    return {
        "interaction": await _now(rt, interaction_id),
        "transfer": {**r.__dict__, "notice": notice},
    }


def _key(value: str | None) -> str | None:
    # The header is a Structured Field string ("…") in the IETF draft; plain tokens, as
    # most clients send them, are taken as they are.
    if value is not None and len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if value is not None and not value:
        raise Refused("bad-request", "the Idempotency-Key header is empty")
    return value


@router.post(
    "/{interaction_id}/reply",
    status_code=202,
    response_model=ReplyQueued,
    responses=responses(404, 409, 413),
)
async def reply_to_customer(
    rt: RuntimeDep,
    agent: CurrentAgent,
    wake: WakeDep,
    interaction_id: InteractionId,
    body: Reply,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            max_length=200,
            pattern=r"^[\x21-\x7e]+$",
            description="a retried request with the same key sends nothing new",
        ),
    ] = None,
) -> dict[str, Any]:
    """Queue a reply to the customer from the interaction's current account, threaded on
    the customer's last message; with ``close`` the interaction is closed with it."""
    r = await call(
        reply,
        rt,
        interaction_id,
        body.body,
        agent=agent.name,
        close=body.close,
        within=agent.scope,
        idempotency_key=_key(idempotency_key),
    )
    if not r.replayed:
        wake()
    return {"message_id": format_id(r.message_id)}
