"""``GET /api/v1/accounts``: the caller's accounts, their counts and Advanced settings."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from mailrouter.agent_views import account_rows
from mailrouter.http.api.models import Account
from mailrouter.http.auth import CurrentAgent, RuntimeDep
from mailrouter.http.blocking import read
from mailrouter.http.problems import responses

__all__ = ["router"]

router = APIRouter(tags=["accounts"], responses=responses(401, 422))


@router.get("/accounts", response_model=list[Account])
async def list_accounts(rt: RuntimeDep, agent: CurrentAgent) -> list[dict[str, Any]]:
    """The accounts the agent belongs to (every account, for an admin), with the number of
    unread and of open interactions each owns now, and its transfer settings."""
    return await read(rt, lambda s: account_rows(s, rt, agent))
