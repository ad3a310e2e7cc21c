"""What every desk page shares: the templates, the signed-in agent, forms and their CSRF
check, the answer to a refusal, and the headers every desk answer carries.

A route takes ``signed: SignedIn`` (no session: a redirect to the sign-in page) and, for
a POST, ``form: CheckedForm`` (the session's CSRF token checked before the route runs:
a form without it is answered 403 and nothing happens).  Refusals of the domain are
shown in words, in an element with ``role="alert"``, with the status the API would give.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from mailrouter.errors import Refused
from mailrouter.http.auth import RuntimeDep
from mailrouter.http.desk.limits import SignInLimits
from mailrouter.http.desk.sessions import Signed, csrf_matches, find_session
from mailrouter.http.problems import problem_type

__all__ = [
    "SESSION_COOKIE",
    "SIGNIN_COOKIE",
    "CheckedForm",
    "DeskState",
    "Form",
    "SignedIn",
    "install",
    "local_path",
    "page",
    "read_form",
    "refusal_status",
    "secure_cookies",
    "see_other",
    "set_cookie",
    "state",
]

SESSION_COOKIE = "mailrouter_session"
# The sign-in form's CSRF token, before there is a session: the form carries the same
# value as this cookie, which a page on another site can neither read nor set.
SIGNIN_COOKIE = "mailrouter_signin"

HERE = Path(__file__).parent
MAX_FIELDS = 20

# Everything the desk loads is its own: no inline script or style, no other origin.
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
# Pages show customer mail: no cache keeps a copy after the agent has signed out.
PAGE_HEADERS: Mapping[str, str] = {**SECURITY_HEADERS, "Cache-Control": "no-store"}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    version: str


def _assets() -> dict[str, Asset]:
    kinds = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
    kinds[".svg"] = "image/svg+xml"
    out = {}
    for path in sorted((HERE / "static").iterdir()):
        if path.suffix in kinds:
            body = path.read_bytes()
            out[path.name] = Asset(body, kinds[path.suffix], hashlib.sha256(body).hexdigest()[:12])
    return out


def _when(value: str | datetime | None) -> str:
    """A timestamp as agents read it: ``2026-12-02 09:30 UTC``."""
    if value is None:
        return "—"
    at = datetime.fromisoformat(value) if isinstance(value, str) else value
    return at.strftime("%Y-%m-%d %H:%M UTC")


@dataclass
class DeskState:
    """The desk's own state in the daemon: templates, assets, the sign-in limiter."""

    env: Environment
    assets: dict[str, Asset]
    limits: SignInLimits = field(default_factory=SignInLimits)
    # A password check is a deliberately expensive scrypt (32 MiB, ~0.1 s); a burst of
    # sign-ins waits here instead of taking every worker thread and that much memory each.
    password_checks: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))

    @classmethod
    def create(cls) -> DeskState:
        env = Environment(
            loader=FileSystemLoader(str(HERE / "templates")),
            autoescape=select_autoescape(["j2"], default_for_string=True, default=True),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,
        )
        assets = _assets()
        env.filters["when"] = _when
        env.globals["static"] = lambda name: f"/static/{name}?v={assets[name].version}"
        return cls(env, assets)


def state(request: Request) -> DeskState:
    desk: DeskState = request.app.state.desk
    return desk


def secure_cookies(request: Request) -> bool:
    """Whether the browser reached us over TLS: served with it, or (``behind_proxy``) a
    trusted proxy said so in X-Forwarded-Proto, which uvicorn then put in the scheme."""
    return request.url.scheme == "https"


def set_cookie(response: Response, request: Request, name: str, value: str | None) -> None:
    """A desk cookie: HttpOnly (no script reads it), SameSite=Strict (no other site's page
    sends it along), Secure when the browser came over TLS; gone when the browser closes.
    ``None`` deletes it."""
    attributes: dict[str, Any] = {
        "httponly": True,
        "samesite": "strict",
        "secure": secure_cookies(request),
        "path": "/",
    }
    if value is None:
        response.delete_cookie(name, **attributes)
    else:
        response.set_cookie(name, value, **attributes)


def page(
    request: Request,
    template: str,
    *,
    signed: Signed | None = None,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    """The page ``template`` (in ``templates/``), with the agent and its CSRF token."""
    context.setdefault("notice", None)
    context.setdefault("error", None)
    html = (
        state(request)
        .env.get_template(template)
        .render(
            agent=signed.agent if signed else None,
            csrf=signed.csrf if signed else "",
            path=request.url.path,
            **context,
        )
    )
    return HTMLResponse(html, status_code=status, headers={**PAGE_HEADERS, **(headers or {})})


def see_other(url: str) -> RedirectResponse:
    """After a POST that did something: the browser GETs ``url`` (a reload repeats nothing)."""
    return RedirectResponse(url, status_code=303, headers=dict(PAGE_HEADERS))


def refusal_status(exc: Refused) -> int:
    """The status the API answers a refusal with (the one table in ``problems``)."""
    return problem_type(exc.code).status


# --------------------------------------------------------------------------- who is asking


class SignInRequired(Exception):
    """No live session came with a request to a page that needs one."""


class CsrfFailed(Exception):
    """A POST without its form's CSRF token: refused before anything happens."""


async def signed_in(request: Request, rt: RuntimeDep) -> Signed:
    """The request's live session and its agent, read from the store now."""
    secret = request.cookies.get(SESSION_COOKIE)
    signed = await asyncio.to_thread(find_session, rt, secret) if secret else None
    if signed is None:
        raise SignInRequired()
    return signed


SignedIn = Annotated[Signed, Depends(signed_in)]


@dataclass(frozen=True)
class Form:
    """The fields of a posted form (``application/x-www-form-urlencoded``)."""

    fields: dict[str, str]

    def get(self, name: str, default: str = "") -> str:
        return self.fields.get(name, default)


async def read_form(request: Request) -> Form:
    """The posted form; empty for any other body (so it carries no CSRF token either).

    The desk's forms hold only text fields, so the urlencoded body is all it takes (no
    multipart parser); the body is already bounded by the server's request size limit.
    """
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return Form({})
    body = await request.body()
    try:
        pairs = parse_qsl(
            body.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=MAX_FIELDS
        )
    except ValueError:
        return Form({})
    return Form(dict(pairs))


async def checked_form(request: Request, signed: SignedIn) -> Form:
    """The posted form, if it carries the session's CSRF token (403 otherwise)."""
    form = await read_form(request)
    if not csrf_matches(form.fields.get("csrf"), signed.csrf):
        raise CsrfFailed()
    return form


CheckedForm = Annotated[Form, Depends(checked_form)]


def local_path(value: str | None) -> str | None:
    """``value`` if it is a path on this server (never ``//host`` or ``/\\host``)."""
    if not value or not value.startswith("/") or value[1:2] in ("/", "\\"):
        return None
    return value


async def _sign_in_required(request: Request, exc: Exception) -> Response:
    if request.method == "GET" and request.headers.get("x-desk-poll") is None:
        # After signing in, the agent lands where it was going (a link from a colleague).
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return see_other("/?" + urlencode({"next": target}))
    # A poll from the list page (its script reloads and lands on the sign-in page), or
    # a form posted after the session ended: nothing was done.
    return page(
        request,
        "error.html.j2",
        status=401 if request.method == "GET" else 403,
        title="Signed out",
        error="Your session has ended; sign in again. Nothing was changed.",
    )


async def _csrf_failed(request: Request, exc: Exception) -> Response:
    return page(
        request,
        "error.html.j2",
        status=403,
        title="Form refused",
        error=(
            "This form did not come from your desk session (it may be from an older "
            "sign-in); nothing was changed. Go back, reload the page and try again."
        ),
    )


def install(app: FastAPI) -> None:
    """Put the desk's state on ``app`` and answer its two exceptions as pages."""
    app.state.desk = DeskState.create()
    app.add_exception_handler(SignInRequired, _sign_in_required)
    app.add_exception_handler(CsrfFailed, _csrf_failed)
