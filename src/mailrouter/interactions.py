"""Domain operations on one interaction: pick, close, mark read or unread.

Each is one write transaction that locks the interaction's row, and each either changes
it or raises :class:`~mailrouter.errors.Refused` with nothing changed.  The CLI and the
HTTP API call these; neither holds a rule of its own.  (Transfers and replies, which
also queue mail, live in ``transfer.py`` and ``reply.py``.)

Every operation takes ``within``: the accounts the caller acts for (an agent's
:attr:`~mailrouter.agents.Agent.scope`; None for the CLI and admins).  It is checked
under the row lock, and an interaction owned by any other account is refused with the
very words of one that does not exist.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from sqlalchemy.orm import Session

from mailrouter.errors import Refused
from mailrouter.log import event
from mailrouter.runtime import Runtime
from mailrouter.store.models import Interaction
from mailrouter.store.queries import lock_interaction

__all__ = [
    "InteractionState",
    "close",
    "get_locked",
    "mark_read",
    "mark_unread",
    "pick",
    "visible",
]

log = logging.getLogger("mailrouter.interactions")


@dataclass(frozen=True)
class InteractionState:
    """An interaction's state after an operation."""

    id: int
    account: str
    status: str
    unread: bool
    assigned_agent: str | None


def get_locked(
    session: Session, interaction_id: int, within: Collection[str] | None = None
) -> Interaction:
    """The interaction, its row locked until the transaction ends; refused if there is
    none, or if ``within`` is given and none of those accounts owns it now."""
    return visible(lock_interaction(session, interaction_id), interaction_id, within)


def visible(
    i: Interaction | None, interaction_id: int, within: Collection[str] | None
) -> Interaction:
    """``i`` if it exists and (when ``within`` is given) one of those accounts owns it."""
    if i is None or (within is not None and i.account.name not in within):
        raise Refused("not-found", f"no interaction {interaction_id}")
    return i


def _change(
    rt: Runtime,
    interaction_id: int,
    change: Callable[[Interaction], None],
    within: Collection[str] | None,
) -> InteractionState:
    with rt.db.write() as s:
        i = get_locked(s, interaction_id, within)
        change(i)
        return InteractionState(
            i.id, rt.accounts.name(i.account_id), i.status, i.unread, i.assigned_agent
        )


def pick(
    rt: Runtime,
    interaction_id: int,
    agent: str,
    *,
    force: bool = False,
    within: Collection[str] | None = None,
) -> InteractionState:
    """Assign the interaction to ``agent`` and mark it read (seed rule 8: pick, not queue).

    Picking again as the same agent is harmless; another agent's pick is refused unless
    ``force`` takes it over.
    """

    def apply(i: Interaction) -> None:
        if i.assigned_agent and i.assigned_agent != agent and not force:
            raise Refused(
                "already-picked",
                f"interaction {interaction_id} is already picked by {i.assigned_agent}",
            )
        i.assigned_agent = agent
        i.unread = False

    state = _change(rt, interaction_id, apply, within)
    event(log, "pick", interaction=interaction_id, by=agent, forced=force or None)
    return state


def close(
    rt: Runtime, interaction_id: int, *, within: Collection[str] | None = None
) -> InteractionState:
    """Close the interaction; new customer mail in its thread reopens it."""

    def apply(i: Interaction) -> None:
        i.status = "closed"

    state = _change(rt, interaction_id, apply, within)
    event(log, "close", interaction=interaction_id)
    return state


def mark_read(
    rt: Runtime, interaction_id: int, *, within: Collection[str] | None = None
) -> InteractionState:
    def apply(i: Interaction) -> None:
        i.unread = False

    return _change(rt, interaction_id, apply, within)


def mark_unread(
    rt: Runtime, interaction_id: int, *, within: Collection[str] | None = None
) -> InteractionState:
    def apply(i: Interaction) -> None:
        i.unread = True

    return _change(rt, interaction_id, apply, within)
