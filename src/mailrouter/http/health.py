"""``/healthz`` and ``/metrics``: what a load balancer, a monitor and Prometheus ask.

``GET /healthz`` answers the small public ``{"status", "version"}`` to anyone.  With
``?verbose=1`` and an admin's token it answers what ``mailrouter status --json`` prints
(:func:`mailrouter.status.status`), plus, under ``"live"``, what only the running daemon
knows: its phase, the addresses its listeners are bound to, each IMAP watcher's state.
Without a token, or with a non-admin's, ``verbose`` changes nothing; a token that is not
valid is a 401, as everywhere.

``GET /metrics`` is the daemon's Prometheus registry in the text format.  It needs no
token, as Prometheus expects: the HTTP server binds loopback unless TLS or a proxy is
configured, and docs/operations.md says how to keep it to the scraper.  It is not in the
OpenAPI document (it is not JSON, and not part of the agents' API).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field

from mailrouter import __version__
from mailrouter.http.auth import RuntimeDep, bearer, current_agent
from mailrouter.http.blocking import call
from mailrouter.http.problems import responses
from mailrouter.status import status

__all__ = ["Health", "LiveState", "StatusReport", "router"]

# What the daemon knows about itself right now (see Daemon.live_state); called on the loop.
LiveState = Callable[[], Mapping[str, Any]]

router = APIRouter()


class Health(BaseModel):
    """The public answer: the daemon is up and serving."""

    status: str = Field(description='"ok"')
    version: str


class StatusReport(BaseModel):
    """``mailrouter status --json``, and the running daemon's own view under ``live``."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    ok: bool = Field(description="false only when a stage is in error (a schema behind, say)")
    version: str
    checked_at: str = Field(json_schema_extra={"format": "date-time"})
    schema_: dict[str, Any] = Field(
        alias="schema", description="`current` and `head` revision, `up_to_date`"
    )
    database: str = Field(description="the database URL, without its password")
    stages: dict[str, dict[str, Any]] = Field(
        description="per stage (`deliver`, `ingest`, `store`, `imap:NAME`): `state` "
        "(ok, warning, error, unknown) and a `note`"
    )
    queue: dict[str, dict[str, Any]] = Field(
        description="per queue: `count` and `oldest_age_seconds`"
    )
    held_messages: int
    listeners: list[dict[str, Any]] = Field(description="the configured SMTP and LMTP listeners")
    outbound: str
    accounts: list[dict[str, Any]]
    live: dict[str, Any] | None = Field(
        default=None,
        description="the running daemon: `phase`, `pid`, `started_at`, `listening` (the "
        "bound addresses), `imap` (each watcher's state), `reload_refused`",
    )


def _live(request: Request) -> Mapping[str, Any] | None:
    live: LiveState | None = request.app.state.live
    return live() if live is not None else None


@router.get(
    "/healthz",
    tags=["health"],
    response_model=StatusReport | Health,
    responses=responses(401, 422),
    # The token is optional: without one (or a non-admin's) the answer is the small one.
    openapi_extra={"security": [{}]},
)
async def healthz(
    request: Request,
    rt: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    verbose: Annotated[
        bool,
        Query(description="with an admin's token: the whole status report (`status --json`)"),
    ] = False,
) -> Health | JSONResponse:
    """The daemon is up and serving; with `verbose=1` and an admin's token, how each stage
    is doing (`mailrouter status --json`, and the daemon's live state)."""
    if verbose and credentials is not None:
        agent = await current_agent(rt, credentials)
        if agent.admin:
            # As it is, key for key: the same document as `mailrouter status --json`.
            return JSONResponse(await call(status, rt, _live(request)))
    return Health(status="ok", version=__version__)


@router.get("/metrics", include_in_schema=False)
async def metrics(rt: RuntimeDep) -> Response:
    """Prometheus text format; the store's gauges are read at scrape time (off the loop)."""
    body, content_type = await call(rt.metrics.render)
    return Response(body, media_type=content_type)
