"""``GET /api/v1/reports``: the per-account report, as ``mailrouter report --json``."""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from typing import Annotated, Any

from fastapi import APIRouter, Query

from mailrouter.agent_views import scoped_report
from mailrouter.http.api.models import Report
from mailrouter.http.auth import CurrentAgent, RuntimeDep
from mailrouter.http.blocking import read
from mailrouter.http.problems import responses

__all__ = ["router"]

router = APIRouter(tags=["reports"], responses=responses(401, 422))


def _midnight(d: date) -> datetime:
    return datetime.combine(d, time(0), tzinfo=UTC)


@router.get("/reports", response_model=Report)
async def get_report(
    rt: RuntimeDep,
    agent: CurrentAgent,
    from_: Annotated[date, Query(alias="from", description="first day (UTC), YYYY-MM-DD")],
    to: Annotated[date, Query(description="the day after the last (UTC), YYYY-MM-DD")],
) -> dict[str, Any]:
    """Counts per account for ``from <= t < to``, each interaction counted under the
    account that owns it *now* (the same period gives other figures after a transfer).
    An agent gets the rows of its own accounts."""
    start, end = _midnight(from_), _midnight(to)
    return await read(rt, lambda s: scoped_report(s, rt, agent, start, end))
