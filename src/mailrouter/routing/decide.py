"""Where an inbound message goes: a pure function of its headers and the store's state.

The daemon, ``mailrouter explain`` and ``mailrouter replay`` all call :func:`decide`, so
what ``explain`` prints is what the daemon does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mailrouter.parse import ParsedMessage
from mailrouter.threads.resolve import NEW_INTERACTION, ThreadIndex, resolve

__all__ = ["ACTIONS", "Decision", "RoutingView", "decide"]

ACTIONS = {
    "deliver": "store and deliver to the receiving account, which owns the interaction",
    "route": "store and deliver to the interaction's current owner, not the receiving account",
    "attach": "another copy of a stored message (a Cc, a second mailbox): record, no delivery",
    "duplicate": "the same message for the same account again: nothing to do",
    "hold": "store for inspection with the reason; no delivery",
}


class RoutingView(ThreadIndex, Protocol):
    def owner_of(self, interaction_id: int) -> str:
        """Name of the account that owns the interaction now."""

    def existing(self, message_id: str, content_hash: str) -> tuple[int, set[str]] | None:
        """A stored identical message: its key and the accounts it was addressed to."""


@dataclass(frozen=True)
class Decision:
    action: str
    rule: str
    receiving: str  # the account the message was addressed to (first of several)
    interaction_id: int | None = None  # None: a new interaction (or held)
    owner: str | None = None
    deliver_to: str | None = None
    matched_id: str | None = None
    reason: str | None = None
    existing_pk: int | None = None


def decide(msg: ParsedMessage, receiving: Sequence[str], view: RoutingView) -> Decision:
    """Decide for ``msg`` addressed to the accounts named in ``receiving`` (at least one)."""
    primary = receiving[0]
    if msg.problem:
        return Decision("hold", "malformed", primary, reason=msg.problem)

    seen = view.existing(msg.message_id, msg.content_hash)
    if seen is not None:
        pk, accounts = seen
        if set(receiving) <= accounts:
            iid = view.interactions_of([msg.message_id]).get(msg.message_id)
            return Decision(
                "duplicate",
                "duplicate",
                primary,
                iid,
                view.owner_of(iid) if iid is not None else None,
                existing_pk=pk,
                matched_id=msg.message_id,
            )
        # Same message seen for another account before: it is in its interaction already
        # and the owner's mailbox has it, so only the extra recipient is recorded.
        found = resolve(msg, view)
        owner = view.owner_of(found.interaction_id) if found.interaction_id else None
        return Decision(
            "attach",
            found.rule,
            primary,
            found.interaction_id,
            owner,
            matched_id=found.matched_id,
            existing_pk=pk,
        )

    found = resolve(msg, view)
    if found.interaction_id is None:
        return Decision("deliver", NEW_INTERACTION, primary, None, primary, primary)
    owner = view.owner_of(found.interaction_id)
    # Mail to any account the owner is among goes to the owner once; mail only to an old
    # account of this conversation follows it to its current owner (chains included, since
    # the interaction row always names the current owner).
    action = "deliver" if owner in receiving else "route"
    return Decision(
        action, found.rule, primary, found.interaction_id, owner, owner, matched_id=found.matched_id
    )
