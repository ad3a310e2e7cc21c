"""The agents' desk: server-rendered HTML pages on the daemon's HTTP server.

Sign in, the accounts with their unread counts, each account's interactions (unread in
bold, new mail polled for), one interaction with Pick, Transfer, Reply and Close, and
the Advanced settings with a notice preview.  It works without JavaScript; a few lines
of our own refresh the lists.  Nothing is loaded from anywhere else.  A front end like
the CLI and the API: every change is a domain operation, every refusal its sentence.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import Response

from mailrouter.http.desk import accounts, interactions, signin, web

__all__ = ["mount", "router"]

router = APIRouter(include_in_schema=False)
for module in (signin, accounts, interactions):
    router.include_router(module.router)


@router.get("/static/{name}")
async def static(request: Request, name: str) -> Response:
    """The desk's stylesheet, script and icon; a versioned URL is cached for good."""
    asset = web.state(request).assets.get(name)
    if asset is None:
        raise HTTPException(404, f"no static file {name!r}")
    versioned = request.query_params.get("v") == asset.version
    cache = "public, max-age=31536000, immutable" if versioned else "no-cache"
    return Response(
        asset.body,
        media_type=asset.media_type,
        headers={**web.SECURITY_HEADERS, "Cache-Control": cache, "ETag": f'"{asset.version}"'},
    )


def mount(app: FastAPI) -> None:
    """Serve the desk from ``app`` (at ``/``, beside ``/api/v1`` and ``/healthz``)."""
    web.install(app)
    app.include_router(router)
