"""``/accounts``: the agent's accounts with unread counts; ``/accounts/{name}``: one
account's interactions, unread first and in bold; ``…/rows``: the part of that page the
list's script polls for new mail; ``…/advanced``: the account's transfer settings and a
preview of its notice.

Which accounts and interactions an agent sees is decided by
:mod:`mailrouter.agent_views` — the same calls the API makes.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from markupsafe import Markup
from sqlalchemy.orm import Session

from mailrouter.agent_views import account_rows, interaction_page, scoped_account
from mailrouter.errors import Refused
from mailrouter.http.auth import RuntimeDep
from mailrouter.http.blocking import read
from mailrouter.http.desk.reads import arrivals
from mailrouter.http.desk.sessions import Signed
from mailrouter.http.desk.web import PAGE_HEADERS, SignedIn, page, state
from mailrouter.notify import TemplateError, preview_notice
from mailrouter.runtime import Runtime

__all__ = ["PAGE_SIZE", "POLL_SECONDS", "not_found", "router"]

router = APIRouter()

PAGE_SIZE = 50
POLL_SECONDS = 4  # how often an open list asks for new mail (with JavaScript)
REFRESH_SECONDS = 30  # the same without JavaScript: the whole page reloads

Cursor = Annotated[str | None, Query(max_length=200)]
NOTICES = {"queued": "the customer is sent a notice", "off": "no notice (off for the account)"}


def not_found(request: Request, signed: Signed, exc: Refused) -> Response:
    """An account or interaction the agent may not see answers like one that does not
    exist: 404, in words."""
    return page(
        request, "error.html.j2", signed=signed, status=404, title="Not found", error=exc.message
    )


async def _account(rt: Runtime, signed: Signed, name: str) -> dict[str, Any]:
    """The agent's row of ``account_rows`` for account ``name`` (refused if not its own)."""
    acc = scoped_account(rt, signed.agent, name)
    rows = await read(rt, lambda s: account_rows(s, rt, signed.agent))
    return next(r for r in rows if r["name"] == acc.name)


async def _rows(rt: Runtime, signed: Signed, name: str, cursor: str | None) -> dict[str, Any]:
    def query(s: Session) -> dict[str, Any]:
        got = interaction_page(s, rt, signed.agent, account=name, limit=PAGE_SIZE, cursor=cursor)
        return {
            "items": got.items,
            "next_cursor": got.next_cursor,
            "arrivals": arrivals(s, [i["id"] for i in got.items]),
        }

    return await read(rt, query)


def _rows_html(request: Request, account: dict[str, Any], rows: dict[str, Any]) -> tuple[str, str]:
    """The list's counts and table as HTML, and their ETag: the poll gets 304 until the
    rows change."""
    template = state(request).env.get_template("rows.html.j2")
    html = template.render(account=account, **rows)
    return html, '"' + hashlib.sha256(html.encode()).hexdigest()[:20] + '"'


@router.get("/accounts")
async def accounts(request: Request, rt: RuntimeDep, signed: SignedIn) -> Response:
    rows = await read(rt, lambda s: account_rows(s, rt, signed.agent))
    return page(request, "accounts.html.j2", signed=signed, title="Accounts", accounts=rows)


def _done_notice(request: Request, rt: Runtime) -> str | None:
    """The sentence for ``?done=transferred&id=…&to=…&notice=…`` after a transfer."""
    q = request.query_params
    if q.get("done") != "transferred" or not (q.get("id") or "").isdigit():
        return None
    try:
        target = rt.settings.account(q.get("to") or "").name
    except KeyError:
        return None
    notice = q.get("notice") or ""
    said = NOTICES.get(notice, "no notice (suppressed)" if notice == "suppressed" else "")
    return f"Interaction {int(q['id'])} transferred to {target}" + (f"; {said}." if said else ".")


@router.get("/accounts/{name}")
async def account(
    request: Request, rt: RuntimeDep, signed: SignedIn, name: str, cursor: Cursor = None
) -> Response:
    try:
        acc = await _account(rt, signed, name)
        rows = await _rows(rt, signed, name, cursor)
    except Refused as exc:
        if exc.code == "bad-cursor":
            return page(
                request, "error.html.j2", signed=signed, status=422, title="List", error=exc.message
            )
        return not_found(request, signed, exc)
    html, version = _rows_html(request, acc, {**rows, "cursor": cursor})
    return page(
        request,
        "account.html.j2",
        signed=signed,
        title=acc["display_name"] or acc["name"],
        account=acc,
        cursor=cursor,
        next_cursor=rows["next_cursor"],
        rows_html=Markup(html),
        version=version,
        poll_seconds=POLL_SECONDS,
        refresh_seconds=REFRESH_SECONDS,
        notice=_done_notice(request, rt),
    )


@router.get("/accounts/{name}/rows")
async def account_rows_fragment(
    request: Request, rt: RuntimeDep, signed: SignedIn, name: str
) -> Response:
    """The first page's counts and rows, for the list's poll (HTML, no layout)."""
    try:
        acc = await _account(rt, signed, name)
        rows = await _rows(rt, signed, name, None)
    except Refused as exc:
        return not_found(request, signed, exc)
    html, version = _rows_html(request, acc, {**rows, "cursor": None})
    headers = {**PAGE_HEADERS, "ETag": version}
    if request.headers.get("if-none-match") == version:
        return Response(status_code=304, headers=headers)
    return Response(html, media_type="text/html; charset=utf-8", headers=headers)


@router.get("/accounts/{name}/advanced")
async def advanced(
    request: Request,
    rt: RuntimeDep,
    signed: SignedIn,
    name: str,
    to: Annotated[str | None, Query(max_length=320)] = None,
) -> Response:
    """The account's transfer settings, read-only (the TOML file is their one source),
    and its notice rendered for a chosen target and a sample customer."""
    try:
        acc = await _account(rt, signed, name)
    except Refused as exc:
        return not_found(request, signed, exc)
    settings = rt.settings
    source = settings.account(acc["name"])
    targets = acc["transfer"]["targets"] or [a.name for a in settings.accounts if a is not source]
    target = to if to in targets else (targets[0] if targets else None)
    preview, problem = None, None
    if source.transfer.template and target is not None:
        try:
            preview = preview_notice(
                settings,
                from_account=source,
                to_account=settings.account(target),
                agent=signed.agent.name,
            )
        except TemplateError as exc:
            problem = f"The notice template does not render: {exc}"
    return page(
        request,
        "advanced.html.j2",
        signed=signed,
        title=f"Advanced · {acc['name']}",
        account=acc,
        config_path=str(settings.config_path),
        targets=targets,
        target=target,
        preview=preview,
        error=problem,
    )
