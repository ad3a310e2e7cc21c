"""``/``: sign in (fields **Agent** and **Password**, button **Sign in**); ``/sign-out``.

A successful sign-in opens a new session (:mod:`~mailrouter.http.desk.sessions`): its
cookie is HttpOnly, SameSite=Strict, and Secure whenever the browser came over TLS.
Failures are counted per name and per address (:mod:`~mailrouter.http.desk.limits`)
and all say the same words, whether the agent exists or not.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import Response

from mailrouter.agents import authenticate_password
from mailrouter.errors import Refused
from mailrouter.http.auth import RuntimeDep
from mailrouter.http.desk.limits import retry_after
from mailrouter.http.desk.sessions import (
    csrf_matches,
    end_session,
    find_session,
    new_token,
    open_session,
)
from mailrouter.http.desk.web import (
    SESSION_COOKIE,
    SIGNIN_COOKIE,
    CheckedForm,
    Form,
    SignedIn,
    local_path,
    page,
    read_form,
    refusal_status,
    see_other,
    set_cookie,
    state,
)
from mailrouter.log import event

__all__ = ["router"]

log = logging.getLogger("mailrouter.http.desk")

router = APIRouter()

SIGNED_OUT = "You have signed out."


def _sign_in_page(
    request: Request,
    *,
    status: int = 200,
    error: str | None = None,
    name: str = "",
    next_path: str | None = None,
    **extra: str,
) -> Response:
    # One token per browser, kept while it signs in: a second sign-in tab does not make
    # the first one's form stale.
    token = request.cookies.get(SIGNIN_COOKIE) or new_token()
    notice = SIGNED_OUT if "signed-out" in request.query_params else None
    response = page(
        request,
        "sign_in.html.j2",
        status=status,
        headers=extra,
        title="Sign in",
        signin_token=token,
        name=name,
        next=local_path(next_path) or "",
        error=error,
        notice=None if error else notice,
    )
    set_cookie(response, request, SIGNIN_COOKIE, token)
    return response


def _limited(request: Request, form: Form, client: str | None) -> Response | None:
    """The answer to a sign-in that must wait (429 with Retry-After), or None."""
    name = form.get("agent").strip()
    wait = state(request).limits.wait(name, client)
    if wait <= 0:
        return None
    seconds = retry_after(wait)
    unit = "second" if seconds == 1 else "seconds"
    event(log, "desk-sign-in-limited", logging.WARNING, agent=name, client=client)
    return _sign_in_page(
        request,
        status=429,
        name=name,
        next_path=form.get("next"),
        error=f"Too many failed sign-ins: try again in {seconds} {unit}.",
        **{"Retry-After": str(seconds)},
    )


@router.get("/")
async def sign_in_form(request: Request, rt: RuntimeDep) -> Response:
    """The sign-in form; an agent already signed in goes on to its accounts."""
    secret = request.cookies.get(SESSION_COOKIE)
    if secret and await asyncio.to_thread(find_session, rt, secret) is not None:
        return see_other("/accounts")
    return _sign_in_page(request, next_path=request.query_params.get("next"))


@router.post("/")
async def sign_in(request: Request, rt: RuntimeDep) -> Response:
    form = await read_form(request)
    name = form.get("agent").strip()
    if not csrf_matches(form.fields.get("csrf"), request.cookies.get(SIGNIN_COOKIE) or "\0"):
        return _sign_in_page(
            request,
            status=403,
            name=name,
            next_path=form.get("next"),
            error="The sign-in form had expired; nothing was checked. Please sign in again.",
        )
    desk = state(request)
    client = request.client.host if request.client else None
    limited = _limited(request, form, client)
    if limited is not None:
        return limited
    try:
        async with desk.password_checks:
            # Again: sign-ins that waited here may have been counted as failures meanwhile.
            limited = _limited(request, form, client)
            if limited is not None:
                return limited
            try:
                agent = await asyncio.to_thread(
                    authenticate_password, rt, name, form.get("password")
                )
            except Refused:
                desk.limits.failed(name, client)
                raise
        secret = await asyncio.to_thread(open_session, rt, agent.name)
    except Refused as exc:
        event(log, "desk-sign-in-failed", logging.WARNING, agent=name, client=client)
        # authenticate_password's sentence is the same for unknown names and wrong
        # passwords alike.
        return _sign_in_page(
            request,
            status=refusal_status(exc),
            name=name,
            next_path=form.get("next"),
            error=f"Sign-in failed: {exc}.",
        )
    desk.limits.succeeded(name)
    previous = request.cookies.get(SESSION_COOKIE)
    if previous:  # signing in again (maybe as someone else) ends the session before
        old = await asyncio.to_thread(find_session, rt, previous)
        if old is not None:
            await asyncio.to_thread(end_session, rt, old.session_id)
    event(log, "desk-sign-in", agent=agent.name, client=client)
    response = see_other(local_path(form.get("next")) or "/accounts")
    set_cookie(response, request, SESSION_COOKIE, secret)
    set_cookie(response, request, SIGNIN_COOKIE, None)
    return response


@router.get("/sign-out")
async def sign_out_form(request: Request, signed: SignedIn) -> Response:
    """Without JavaScript the Sign out link lands here: one button that signs out."""
    return page(request, "sign_out.html.j2", signed=signed, title="Sign out")


@router.post("/sign-out")
async def sign_out(
    request: Request, rt: RuntimeDep, signed: SignedIn, form: CheckedForm
) -> Response:
    await asyncio.to_thread(end_session, rt, signed.session_id)
    event(log, "desk-sign-out", agent=signed.agent.name)
    response = see_other("/?signed-out")
    set_cookie(response, request, SESSION_COOKIE, None)
    return response
