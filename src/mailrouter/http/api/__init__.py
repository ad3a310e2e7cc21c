"""The JSON API under ``/api/v1``: one router module per resource, bodies in ``models``.

A query parameter an operation does not declare is refused (422) rather than ignored:
``?unraed=true`` would otherwise list everything and look like an answer.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from mailrouter.errors import Refused
from mailrouter.http.api import accounts, interactions, problem_types, queue, reports

__all__ = ["router"]


def _query_names(dependant: Dependant) -> frozenset[str]:
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return frozenset(names)


async def known_query_only(request: Request) -> None:
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    unknown = sorted(set(request.query_params) - _query_names(route.dependant))
    if unknown:
        raise Refused("bad-request", f"unknown query parameter(s): {', '.join(map(repr, unknown))}")


router = APIRouter(prefix="/api/v1", dependencies=[Depends(known_query_only)])
for module in (accounts, interactions, reports, queue, problem_types):
    router.include_router(module.router)
