"""``/interactions/{id}``: one interaction — its messages with their original From/To, the
routing trace and the transfers — with the buttons **Pick**, **Transfer**, **Reply** and
**Close**.  Opening it marks it read.

Each button posts a form that calls one domain operation with ``within=agent.scope``
and the agent as the actor, exactly as the API does; a refusal re-renders the page
with the operation's sentence in a ``role="alert"`` element, and nothing has changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response
from markupsafe import Markup
from sqlalchemy.orm import Session

from mailrouter import interactions as ops
from mailrouter.agent_views import account_rows
from mailrouter.errors import Refused
from mailrouter.http.auth import RuntimeDep, WakeDep
from mailrouter.http.blocking import call, read
from mailrouter.http.desk.accounts import not_found
from mailrouter.http.desk.reads import detail_with_text
from mailrouter.http.desk.sessions import Signed
from mailrouter.http.desk.web import CheckedForm, SignedIn, page, refusal_status, see_other
from mailrouter.reply import reply
from mailrouter.runtime import Runtime
from mailrouter.transfer import transfer

__all__ = ["router"]

router = APIRouter(prefix="/interactions")

InteractionId = Annotated[int, Path(ge=1, le=2**63 - 1)]

DONE = {
    "picked": "Picked: it is assigned to you.",
    "replied": "Reply queued to the customer.",
    "replied-closed": "Reply queued to the customer, and the interaction closed.",
    "closed": "Interaction closed.",
}


SOURCES = {"transfer-notice": "transfer notice", "reply": "agent reply"}


def trace(m: dict[str, Any], addresses: dict[str, str]) -> Markup:
    """How a message came and went, in one line: the account it was addressed to or sent
    from (its original address), where it was routed and by which rule."""
    bold = Markup("<strong>{}</strong>")
    if m["direction"] == "outbound":
        parts = [Markup("Sent from {}").format(bold.format(m["account_address"]))]
        if m["source"]:
            parts.append(Markup.escape(SOURCES.get(m["source"], m["source"])))
    else:
        parts = [Markup("Received for {}").format(bold.format(m["account_address"]))]
        if m["source"]:
            parts.append(Markup("by {}").format(m["source"]))
        if m["routed_to"]:
            parts.append(
                Markup("routed to {} ({}) with <code>X-Mailrouter-Routed-From: {}</code>").format(
                    bold.format(m["routed_to"]),
                    addresses.get(m["routed_to"], ""),
                    m["account_address"],
                )
            )
        if m["rule"]:
            parts.append(Markup("rule {}").format(m["rule"]))
        if m["automatic"]:
            parts.append(Markup("automatic: {}").format(m["automatic"]))
    if m["status"] == "held":
        parts.append(Markup('<span class="held">held: {}</span>').format(m["hold_reason"]))
    return Markup(" · ").join(parts)


async def _view(
    request: Request,
    rt: Runtime,
    signed: Signed,
    interaction_id: int,
    *,
    status: int = 200,
    error: str | None = None,
    reply_text: str = "",
) -> Response:
    agent = signed.agent

    def query(s: Session) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return detail_with_text(s, agent, interaction_id), account_rows(s, rt, agent)

    try:
        detail, accounts = await read(rt, query)
    except Refused as exc:
        return not_found(request, signed, exc)
    owner = next((a for a in accounts if a["name"] == detail["account"]), None)
    addresses = {a.name: a.address for a in rt.settings.accounts}
    for m in detail["messages"]:
        m["trace"] = trace(m, addresses)
    done = request.query_params.get("done", "")
    return page(
        request,
        "interaction.html.j2",
        signed=signed,
        status=status,
        title=detail["subject"] or f"Interaction {interaction_id}",
        i=detail,
        owner=owner,
        notice=None if error else DONE.get(done),
        error=error,
        reply_text=reply_text,
    )


@router.get("/{interaction_id}")
async def show(
    request: Request, rt: RuntimeDep, signed: SignedIn, interaction_id: InteractionId
) -> Response:
    """The interaction, marked read now that an agent has opened it."""
    try:
        await call(ops.mark_read, rt, interaction_id, within=signed.agent.scope)
    except Refused as exc:
        return not_found(request, signed, exc)
    return await _view(request, rt, signed, interaction_id)


async def _act(
    request: Request,
    rt: Runtime,
    signed: Signed,
    interaction_id: int,
    operation: Callable[[], Any],
    *,
    reply_text: str = "",
) -> Response | None:
    """Run ``operation``; on a refusal, the page again with its sentence (None: done)."""
    try:
        await call(operation)
    except Refused as exc:
        if exc.code == "not-found":
            return not_found(request, signed, exc)
        return await _view(
            request,
            rt,
            signed,
            interaction_id,
            status=refusal_status(exc),
            error=exc.message,
            reply_text=reply_text,
        )
    return None


@router.post("/{interaction_id}/pick")
async def pick(
    request: Request,
    rt: RuntimeDep,
    signed: SignedIn,
    form: CheckedForm,
    interaction_id: InteractionId,
) -> Response:
    agent = signed.agent
    refused = await _act(
        request,
        rt,
        signed,
        interaction_id,
        lambda: ops.pick(rt, interaction_id, agent.name, within=agent.scope),
    )
    return refused or see_other(f"/interactions/{interaction_id}?done=picked")


@router.post("/{interaction_id}/transfer")
async def transfer_to(
    request: Request,
    rt: RuntimeDep,
    wake: WakeDep,
    signed: SignedIn,
    form: CheckedForm,
    interaction_id: InteractionId,
) -> Response:
    agent = signed.agent
    results: list[Any] = []

    def run() -> None:
        results.append(
            transfer(rt, interaction_id, form.get("to"), actor=agent.name, within=agent.scope)
        )

    refused = await _act(request, rt, signed, interaction_id, run)
    if refused is not None:
        return refused
    [result] = results
    if result.outbox_id is not None:
        wake()
    # Back to the list it left: opening it here would mark it read in its new account,
    # where it must show unread until someone there opens or picks it.
    query = urlencode(
        {"done": "transferred", "id": interaction_id, "to": result.to_account}
        | {"notice": result.notification}
    )
    return see_other(f"/accounts/{result.from_account}?{query}")


@router.post("/{interaction_id}/reply")
async def reply_to_customer(
    request: Request,
    rt: RuntimeDep,
    wake: WakeDep,
    signed: SignedIn,
    form: CheckedForm,
    interaction_id: InteractionId,
) -> Response:
    agent = signed.agent
    body, close = form.get("body"), form.get("close") == "yes"
    refused = await _act(
        request,
        rt,
        signed,
        interaction_id,
        lambda: reply(rt, interaction_id, body, agent=agent.name, close=close, within=agent.scope),
        reply_text=body,
    )
    if refused is not None:
        return refused
    wake()
    done = "replied-closed" if close else "replied"
    return see_other(f"/interactions/{interaction_id}?done={done}")


@router.post("/{interaction_id}/close")
async def close(
    request: Request,
    rt: RuntimeDep,
    signed: SignedIn,
    form: CheckedForm,
    interaction_id: InteractionId,
) -> Response:
    agent = signed.agent
    refused = await _act(
        request,
        rt,
        signed,
        interaction_id,
        lambda: ops.close(rt, interaction_id, within=agent.scope),
    )
    return refused or see_other(f"/interactions/{interaction_id}?done=closed")
