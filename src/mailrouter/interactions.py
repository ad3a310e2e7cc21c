"""Domain operations on one interaction: pick, close, mark read or unread.

Each is one write transaction that locks the interaction's row, and each either changes
it or raises :class:`~mailrouter.errors.Refused` with nothing changed.  The CLI and the
HTTP API call these; neither holds a rule of its own.  (Transfers and replies, which
also queue mail, live in ``transfer.py`` and ``reply.py``.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from mailrouter.errors import Refused
from mailrouter.log import event
from mailrouter.runtime import Runtime
from mailrouter.store.models import Interaction
from mailrouter.store.queries import lock_interaction

__all__ = ["InteractionState", "close", "get_locked", "mark_read", "mark_unread", "pick"]

log = logging.getLogger("mailrouter.interactions")


@dataclass(frozen=True)
class InteractionState:
    """An interaction's state after an operation."""

    id: int
    account: str
    status: str
    unread: bool
    assigned_agent: str | None


def get_locked(session: Session, interaction_id: int) -> Interaction:
    """The interaction, its row locked until the transaction ends; refused if there is none."""
    i = lock_interaction(session, interaction_id)
    if i is None:
        raise Refused("not-found", f"no interaction {interaction_id}")
    return i


def _change(
    rt: Runtime, interaction_id: int, change: Callable[[Interaction], None]
) -> InteractionState:
    with rt.db.write() as s:
        i = get_locked(s, interaction_id)
        change(i)
        return InteractionState(
            i.id, rt.accounts.name(i.account_id), i.status, i.unread, i.assigned_agent
        )


def pick(rt: Runtime, interaction_id: int, agent: str, *, force: bool = False) -> InteractionState:
    """Assign the interaction to ``agent`` and mark it read (seed rule 8: pick, not queue).

    Picking again as the same agent is harmless; another agent's pick is refused unless
    ``force`` takes it over.
    """

    def apply(i: Interaction) -> None:
        if i.assigned_agent and i.assigned_agent != agent and not force:
            raise Refused(
                "already-picked",
                f"interaction {interaction_id} is already picked by {i.assigned_agent} "
                "(use --force to take it over)",
            )
        i.assigned_agent = agent
        i.unread = False

    state = _change(rt, interaction_id, apply)
    event(log, "pick", interaction=interaction_id, by=agent, forced=force or None)
    return state


def close(rt: Runtime, interaction_id: int) -> InteractionState:
    """Close the interaction; new customer mail in its thread reopens it."""

    def apply(i: Interaction) -> None:
        i.status = "closed"

    state = _change(rt, interaction_id, apply)
    event(log, "close", interaction=interaction_id)
    return state


def mark_read(rt: Runtime, interaction_id: int) -> InteractionState:
    def apply(i: Interaction) -> None:
        i.unread = False

    return _change(rt, interaction_id, apply)


def mark_unread(rt: Runtime, interaction_id: int) -> InteractionState:
    def apply(i: Interaction) -> None:
        i.unread = True

    return _change(rt, interaction_id, apply)
