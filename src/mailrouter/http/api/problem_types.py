"""``GET /api/v1/problems/{code}``: what a problem document's ``type`` points at."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel

from mailrouter.errors import Refused
from mailrouter.http.problems import PROBLEMS, responses

__all__ = ["router"]

router = APIRouter(tags=["problems"], responses=responses(404, 422))


class ProblemTypeInfo(BaseModel):
    code: str
    status: int
    title: str


@router.get("/problems/{code}", response_model=ProblemTypeInfo, responses=responses(404))
async def problem_type(code: Annotated[str, Path(max_length=100)]) -> ProblemTypeInfo:
    """The HTTP status and title of a problem type (no authentication needed)."""
    kind = PROBLEMS.get(code)
    if kind is None:
        raise Refused("not-found", f"no problem type {code!r}")
    return ProblemTypeInfo(code=code, status=kind.status, title=kind.title)
