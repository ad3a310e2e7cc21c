"""``/api/v1/queue``: the queue tools of ``mailrouter queue``, for admins.

Held messages (``m12``) and outbox jobs (``o34``) in one view, and what an operator does
to them: retry, retry all, hold, release, delete.  Each route calls the same domain
function as the command (:mod:`mailrouter.deliver.queue`) and answers with the same
fields as its ``--json``; a refusal is the command's sentence in a problem document.
Only admins may use them (403 for any other agent, before anything is looked up).

The daemon's own outbox worker delivers what an operation makes due: the route wakes it
and answers at once, like ``queue … --queue-only`` beside a running daemon.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from mailrouter.deliver import queue as ops
from mailrouter.errors import Refused
from mailrouter.http.api.models import QueueChange, QueueFlush, QueueItem, QueueItemDetail
from mailrouter.http.auth import AdminAgent, RuntimeDep, WakeDep
from mailrouter.http.blocking import call, read
from mailrouter.http.problems import responses
from mailrouter.pipeline import StoreUnavailable
from mailrouter.runtime import Runtime

__all__ = ["router"]

router = APIRouter(prefix="/queue", tags=["queue"], responses=responses(401, 403, 422))

QueueIdPath = Annotated[
    str,
    Path(
        max_length=40,
        description="`m12`: held message 12; `o34` or `34`: outbox job 34",
        # Documented, and checked by the domain's parse_id (whose sentence the CLI prints).
        json_schema_extra={"pattern": "^[mMoO]?[0-9]{1,18}$"},
    ),
]


def _change(change: ops.QueueChange) -> dict[str, Any]:
    return change.as_dict()


@router.get("", response_model=list[QueueItem])
async def list_queue(
    rt: RuntimeDep,
    agent: AdminAgent,
    all_: Annotated[bool, Query(alias="all", description="include sent and deleted jobs")] = False,
    limit: Annotated[int, Query(ge=1, le=1000, description="at most this many rows")] = 200,
) -> list[dict[str, Any]]:
    """Held messages and outbox jobs, most recently queued first (`postqueue -p`), with
    the reason, attempts, next try and last error: `mailrouter queue --json`."""
    return await read(rt, lambda s: ops.list_queue(s, all_rows=all_, limit=limit))


@router.post("/retry-all", response_model=QueueFlush)
async def retry_all(rt: RuntimeDep, agent: AdminAgent, wake: WakeDep) -> dict[str, Any]:
    """Every pending job due now, like `postqueue -f` (`queue retry --all`); the daemon
    delivers them.  Failed and held jobs stay as they are."""
    made_due = await call(ops.retry_all, rt)
    wake()
    return {"made_due": made_due}


@router.get(
    "/{queue_id}",
    response_model=QueueItemDetail,
    response_model_exclude_unset=True,
    responses=responses(404, 409),
)
async def show_item(rt: RuntimeDep, agent: AdminAgent, queue_id: QueueIdPath) -> dict[str, Any]:
    """One item: envelope, headers, and every delivery attempt with its relay, DSN and the
    server's reply (`queue show ID --json`).  409 `not-held`: `m12` names a message that
    is stored, not held (the detail says where it is)."""
    qid = ops.parse_id(queue_id)
    return await read(rt, lambda s: ops.show(s, qid))


@router.post("/{queue_id}/retry", response_model=QueueChange, responses=responses(404, 409))
async def retry(
    rt: RuntimeDep, agent: AdminAgent, wake: WakeDep, queue_id: QueueIdPath
) -> dict[str, Any]:
    """Try a pending job now, or a failed one again with a fresh lifetime."""
    change = await call(ops.retry, rt, ops.parse_id(queue_id))
    wake()
    return _change(change)


@router.post("/{queue_id}/hold", response_model=QueueChange, responses=responses(404, 409))
async def hold(rt: RuntimeDep, agent: AdminAgent, queue_id: QueueIdPath) -> dict[str, Any]:
    """Park a pending job: never attempted until it is released."""
    return _change(await call(ops.hold, rt, ops.parse_id(queue_id)))


def _release(rt: Runtime, qid: ops.QueueId) -> ops.QueueChange:
    try:
        return ops.release(rt, qid)
    except StoreUnavailable as exc:
        # The words of `mailrouter queue release` when the store fails it.
        raise Refused("store-unavailable", f"release failed, {qid} still held: {exc}") from None


@router.post("/{queue_id}/release", response_model=QueueChange, responses=responses(404, 409, 503))
async def release(
    rt: RuntimeDep, agent: AdminAgent, wake: WakeDep, queue_id: QueueIdPath
) -> dict[str, Any]:
    """Let a held job go (due now, fresh lifetime), or route a held message (`m12`) again:
    `action`, `rule` and `job` say what the routing did; `status` is `held` if it held
    the message again."""
    change = await call(_release, rt, ops.parse_id(queue_id))
    wake()
    return _change(change)


@router.delete("/{queue_id}", response_model=QueueChange, responses=responses(404, 409))
async def delete(rt: RuntimeDep, agent: AdminAgent, queue_id: QueueIdPath) -> dict[str, Any]:
    """Drop a pending, failed or held delivery job: it is never attempted again.  The
    stored message is never touched, and the job stays (status `deleted`) for `trace`."""
    return _change(await call(ops.delete, rt, ops.parse_id(queue_id)))
