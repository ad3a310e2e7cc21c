"""The JSON API under ``/api/v1``: one router module per resource, bodies in ``models``."""

from fastapi import APIRouter

from mailrouter.http.api import accounts, problem_types

__all__ = ["router"]

router = APIRouter(prefix="/api/v1")
for module in (accounts, problem_types):
    router.include_router(module.router)
