"""Who is asking: the runtime and the authenticated agent, as FastAPI dependencies.

The API authenticates every request with ``Authorization: Bearer TOKEN``; the token is
checked against the store on each request (:func:`mailrouter.agents.authenticate_token`),
so a rotated token or a removed agent is refused from the next request on.  A route takes
``agent: CurrentAgent`` and passes ``agent.scope`` to the domain operations; what an
agent may see and do is decided in :mod:`mailrouter.agents`, not here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from mailrouter.agents import Agent, authenticate_token
from mailrouter.errors import Refused
from mailrouter.runtime import Runtime

__all__ = [
    "AdminAgent",
    "CurrentAgent",
    "RuntimeDep",
    "WakeDep",
    "current_agent",
    "get_runtime",
    "get_wake",
    "require_admin",
]

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    bearerFormat="mrt_ID_SECRET",
    description="An agent's API token, from `mailrouter agent add` or `agent token`.",
)


def get_runtime(request: Request) -> Runtime:
    """The daemon's runtime, which :func:`~mailrouter.http.app.create_app` put on the app."""
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_wake(request: Request) -> Callable[[], None]:
    """Call after queueing mail (a notice, a reply): wakes the outbox worker."""
    wake: Callable[[], None] = request.app.state.wake
    return wake


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
WakeDep = Annotated[Callable[[], None], Depends(get_wake)]


async def current_agent(
    rt: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Agent:
    """The agent whose bearer token came with the request; 401 without a valid one."""
    if credentials is None:
        raise Refused("unauthenticated", "this needs an Authorization: Bearer TOKEN header")
    return await asyncio.to_thread(authenticate_token, rt, credentials.credentials)


CurrentAgent = Annotated[Agent, Depends(current_agent)]


async def require_admin(agent: CurrentAgent) -> Agent:
    """The current agent, if it is an admin (403 otherwise)."""
    if not agent.admin:
        raise Refused("admin-only", f"agent {agent.name} is not an admin")
    return agent


AdminAgent = Annotated[Agent, Depends(require_admin)]
