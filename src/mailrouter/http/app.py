"""The FastAPI application: ``/healthz``, ``/metrics``, the JSON API under ``/api/v1`` and
its OpenAPI, and the agents' web desk (:mod:`mailrouter.http.desk`) at ``/``.

:func:`create_app` builds it around an open :class:`~mailrouter.runtime.Runtime`, so
the daemon serves it and tests (or another front end such as the desk) can mount
routers on it.  Errors anywhere are problem+json (:mod:`mailrouter.http.problems`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from mailrouter import __version__
from mailrouter.http import desk, health, problems
from mailrouter.http.api import router as api_router
from mailrouter.runtime import Runtime

__all__ = ["OPENAPI_URL", "create_app"]

OPENAPI_URL = "/api/v1/openapi.json"

DESCRIPTION = """\
The agents' API of mailrouter: list the interactions of your accounts, read, pick,
transfer, reply and close them, and read the per-account report.

Authenticate with `Authorization: Bearer TOKEN` (`mailrouter agent add` prints a token).
Errors are `application/problem+json` (RFC 9457). See docs/api.md.
"""


def _nothing() -> None:
    return None


def create_app(
    runtime: Runtime,
    *,
    wake: Callable[[], None] | None = None,
    live: health.LiveState | None = None,
) -> FastAPI:
    """The HTTP application over ``runtime``; ``wake`` is called after mail was queued,
    ``live`` (the daemon's) tells ``/healthz?verbose=1`` what the running daemon knows."""
    app = FastAPI(
        title="mailrouter",
        version=__version__,
        description=DESCRIPTION,
        openapi_url=OPENAPI_URL,
        # The interactive docs pages load their scripts from a CDN; the daemon may be
        # offline and must not make a browser fetch third-party code.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    app.state.runtime = runtime
    app.state.wake = wake or _nothing
    app.state.live = live
    problems.install(app)
    app.include_router(health.router)
    app.include_router(api_router)
    desk.mount(app)  # the agents' web desk at /, outside the OpenAPI document

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            # Routes reference the Problem schema from their error responses.
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["Problem"] = problems.Problem.model_json_schema()
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
