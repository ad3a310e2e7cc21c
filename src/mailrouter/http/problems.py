"""Errors as RFC 9457 problem details, and the one table from refusal codes to HTTP statuses.

Every error the HTTP server answers is ``application/problem+json``:
``{"type", "title", "status", "detail", "code"}``.  ``detail`` is the sentence of the
domain's :class:`~mailrouter.errors.Refused` (the words the CLI prints); ``code`` is its
stable machine code, and ``type`` is ``/api/v1/problems/CODE``, which answers with the
code's status and title.  A route handler raises ``Refused``; nothing else picks a status.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailrouter.errors import Refused
from mailrouter.log import event

__all__ = [
    "MAX_BODY",
    "PROBLEMS",
    "PROBLEM_JSON",
    "Problem",
    "ProblemType",
    "install",
    "problem_response",
    "problem_type",
    "responses",
]

log = logging.getLogger("mailrouter.http")

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "/api/v1/problems/"
MAX_BODY = 1024 * 1024  # a request body larger than this is refused (413) unread


@dataclass(frozen=True)
class ProblemType:
    status: int
    title: str


# The one table.  401: who are you; 403: admins only; 404: no such thing, or not yours to
# see (the two are indistinguishable on purpose); 409: refused by the state of the
# interaction or queue item, or the account's rules; 422: the request itself is wrong;
# 503: the store could not do it now (try again).  A code missing here answers 409.
PROBLEMS: Mapping[str, ProblemType] = {
    "unauthenticated": ProblemType(401, "Authentication required"),
    "bad-token": ProblemType(401, "Invalid token"),
    "bad-password": ProblemType(401, "Sign-in failed"),
    "admin-only": ProblemType(403, "Admins only"),
    "not-found": ProblemType(404, "Not found"),
    "not-your-account": ProblemType(404, "Not found"),
    "unknown-agent": ProblemType(404, "Unknown agent"),
    "method-not-allowed": ProblemType(405, "Method not allowed"),
    "already-picked": ProblemType(409, "Picked by another agent"),
    "closed": ProblemType(409, "Interaction closed"),
    "same-account": ProblemType(409, "Already in that account"),
    "transfer-not-enabled": ProblemType(409, "Transfer not enabled"),
    "busy": ProblemType(409, "Interaction changed meanwhile"),
    "no-customer-message": ProblemType(409, "No customer message"),
    "no-customer-address": ProblemType(409, "No customer address"),
    "agent-exists": ProblemType(409, "Agent exists"),
    "not-held": ProblemType(409, "Not held"),
    "not-failed": ProblemType(409, "Not failed"),
    # The queue (deliver/queue.py): what state the item is in keeps it from the operation.
    "not-a-job": ProblemType(409, "Not a delivery job"),
    "already-held": ProblemType(409, "Already held"),
    "held": ProblemType(409, "Held"),
    "being-delivered": ProblemType(409, "Being delivered"),
    "already-sent": ProblemType(409, "Already sent"),
    "deleted": ProblemType(409, "Deleted"),
    "failed": ProblemType(409, "Failed for good"),
    "wrong-state": ProblemType(409, "Wrong state"),
    "idempotency-key-in-use": ProblemType(409, "Idempotency key in use"),
    "too-large": ProblemType(413, "Request too large"),
    "bad-request": ProblemType(422, "Invalid request"),
    "unknown-account": ProblemType(422, "Unknown account"),
    "empty-body": ProblemType(422, "Empty reply"),
    "bad-reply": ProblemType(422, "Reply cannot be composed"),
    "bad-cursor": ProblemType(422, "Invalid cursor"),
    "bad-queue-id": ProblemType(422, "Invalid queue id"),
    "bad-period": ProblemType(422, "Invalid period"),
    "idempotency-key-reused": ProblemType(422, "Idempotency key reused"),
    "bad-agent-name": ProblemType(422, "Invalid agent name"),
    "no-accounts": ProblemType(422, "No accounts"),
    "weak-password": ProblemType(422, "Password too short"),
    "internal-error": ProblemType(500, "Internal error"),
    "store-unavailable": ProblemType(503, "Store unavailable"),
}
REFUSED = ProblemType(409, "Refused")

_BY_STATUS = {404: "not-found", 405: "method-not-allowed", 413: "too-large", 422: "bad-request"}


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str = Field(description="`/api/v1/problems/CODE`; GET it for the status and title")
    title: str = Field(description="short summary of the problem type")
    status: int = Field(description="the HTTP status")
    detail: str = Field(description="what happened, in the words the CLI uses")
    code: str = Field(description="stable machine code of the refusal")


def problem_type(code: str) -> ProblemType:
    return PROBLEMS.get(code, REFUSED)


def problem_response(
    code: str,
    detail: str,
    *,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The problem+json answer for ``code``: its status from the table unless given."""
    kind = problem_type(code)
    status = status or kind.status
    body = Problem(type=TYPE_BASE + code, title=kind.title, status=status, detail=detail, code=code)
    all_headers = dict(headers or {})
    if status == 401:
        # RFC 6750 §3: say which scheme, and whether the token given was the problem.
        error = ', error="invalid_token"' if code == "bad-token" else ""
        all_headers.setdefault("WWW-Authenticate", f'Bearer realm="mailrouter"{error}')
    return JSONResponse(
        body.model_dump(), status_code=status, media_type=PROBLEM_JSON, headers=all_headers
    )


_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
_DESCRIPTIONS = {
    401: "Missing, unknown, rotated or revoked bearer token",
    403: "Only admins may do this",
    404: "Unknown, or not visible to this agent",
    409: "Refused by the state of the interaction or queue item, or the account's rules; "
    "nothing changed",
    413: "Request body too large",
    422: "Invalid request (body, query or header); nothing changed",
    503: "The store could not do it now; nothing changed, try again",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting problem+json answers with these statuses."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {
            "description": _DESCRIPTIONS[status],
            "content": {PROBLEM_JSON: {"schema": _PROBLEM_REF}},
        }
        if status == 401:
            entry["headers"] = {
                "WWW-Authenticate": {
                    "description": "`Bearer` (RFC 6750)",
                    "schema": {"type": "string"},
                }
            }
        out[status] = entry
    return out


def _validation_sentence(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


async def _refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Refused)
    return problem_response(exc.code, exc.message)


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return problem_response("bad-request", _validation_sentence(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:
        # FastAPI's answer to a body it cannot decode at all; a body it decodes but that
        # is not valid JSON is already a 422.  One status for "bad body" is simpler.
        return problem_response("bad-request", f"the request body cannot be read: {exc.detail}")
    if exc.status_code == 404 and exc.detail == "Not Found":
        return problem_response("not-found", f"nothing at {request.url.path}")
    code = _BY_STATUS.get(exc.status_code, "http-error")
    return problem_response(
        code, str(exc.detail), status=exc.status_code, headers=exc.headers or None
    )


class _Guard:
    """Outermost of our middleware: bounds request bodies, turns a crash into a logged 500.

    Starlette would re-raise an unhandled exception after answering, and uvicorn would
    print it in its own format; here it becomes one ``event=http-error`` line with the
    traceback, and the client gets a problem document.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # (h11 has already refused a Content-Length that is not a number.)
        length = dict(scope.get("headers", ())).get(b"content-length", b"0")
        if length.isdigit() and int(length) > MAX_BODY:
            detail = f"request bodies are limited to {MAX_BODY} bytes"
            await problem_response("too-large", detail)(scope, receive, send)
            return
        started = False
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY:  # a chunked body that never said how long it was
                raise Refused("too-large", f"request bodies are limited to {MAX_BODY} bytes")
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except Exception:  # logged with its traceback, answered 500
            event(
                log,
                "http-error",
                logging.ERROR,
                exc_info=True,
                method=scope.get("method"),
                path=scope.get("path"),
            )
            if started:
                raise
            response = problem_response(
                "internal-error", "internal error; the daemon's log has the details"
            )
            await response(scope, receive, send)


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` as problem+json (domain refusals, bad requests,
    unknown routes, crashes), and document the Problem schema in its OpenAPI."""
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[JSONResponse]]] = {
        Refused: _refused,
        RequestValidationError: _invalid,
        StarletteHTTPException: _http_error,
    }
    for exc_class, handler in handlers.items():
        app.add_exception_handler(exc_class, handler)
    app.add_middleware(_Guard)
