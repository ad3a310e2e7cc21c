"""Where an inbound message goes: a chain of small named rules over its headers and the store.

The daemon, ``mailrouter explain`` and ``mailrouter replay`` all call :func:`decide`, so
what ``explain`` prints is what the daemon does.  The rules run top to bottom and the first
that returns a :class:`Decision` decides; the decision names that rule in ``step``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from types import MappingProxyType
from typing import Protocol

from mailrouter.parse import ParsedMessage
from mailrouter.threads.resolve import NEW_INTERACTION, Resolution, ThreadIndex, resolve

__all__ = [
    "ACTIONS",
    "RULES",
    "Action",
    "Decision",
    "Facts",
    "RoutingRule",
    "RoutingView",
    "decide",
]


class Action(StrEnum):
    """What the pipeline does with a message; the value is what the store and JSON show."""

    description: str

    def __new__(cls, value: str, description: str) -> Action:
        member = str.__new__(cls, value)
        member._value_ = value
        member.description = description
        return member

    DELIVER = "deliver", "store and deliver to the receiving account, which owns the interaction"
    ROUTE = (
        "route",
        "store and deliver to the interaction's current owner, not the receiving account",
    )
    ATTACH = (
        "attach",
        "another copy of a stored message (a Cc, a second mailbox): record, no delivery",
    )
    DUPLICATE = "duplicate", "the same message for the same account again: nothing to do"
    HOLD = "hold", "store for inspection with the reason; no delivery"


# Read-only and derived from Action, for callers that look a description up by string.
ACTIONS: Mapping[str, str] = MappingProxyType({a.value: a.description for a in Action})


class RoutingView(ThreadIndex, Protocol):
    def owner_of(self, interaction_id: int) -> str:
        """Name of the account that owns the interaction now."""

    def existing(self, message_id: str, content_hash: str) -> tuple[int, set[str]] | None:
        """A stored identical message: its key and the accounts it was addressed to."""


@dataclass(frozen=True)
class Decision:
    action: Action
    rule: str  # why this interaction: a thread rule, new-interaction, malformed, duplicate…
    receiving: str  # the account the message was addressed to (first of several)
    interaction_id: int | None = None  # None: a new interaction (or held)
    owner: str | None = None
    deliver_to: str | None = None
    matched_id: str | None = None
    reason: str | None = None
    existing_pk: int | None = None
    step: str | None = None  # the routing rule that decided (see RULES), or internal-error


class Facts:
    """The look-ups every rule may use, each done at most once per message.

    Nothing is looked up front: a malformed message needs no query at all, and the thread
    resolution is only needed once the message turns out not to be a duplicate.
    """

    def __init__(
        self,
        msg: ParsedMessage,
        receiving: Sequence[str],
        view: RoutingView,
        subject_token: str | None = None,
    ) -> None:
        if not receiving:
            raise ValueError("a routing decision needs at least one receiving account")
        self.msg = msg
        self.receiving = receiving
        self.primary = receiving[0]
        self._view = view
        self._subject_token = subject_token
        self._owners: dict[int, str] = {}

    @cached_property
    def seen(self) -> tuple[int, set[str]] | None:
        """The stored identical message, if any: its key and the accounts it was for."""
        return self._view.existing(self.msg.message_id, self.msg.content_hash)

    @cached_property
    def stored_interaction(self) -> int | None:
        """The interaction a stored message with this very Message-ID belongs to."""
        mid = self.msg.message_id
        return self._view.interactions_of([mid]).get(mid)

    @cached_property
    def thread(self) -> Resolution:
        """Which interaction the message belongs to, by the thread rule chain."""
        # An identical stored copy makes the message's own Message-ID a strong signal.
        return resolve(
            self.msg,
            self._view,
            identical=self.seen is not None,
            subject_token=self._subject_token,
        )

    @property
    def owner(self) -> str | None:
        """The current owner of the thread's interaction; None for a new interaction."""
        iid = self.thread.interaction_id
        return self.owner_of(iid) if iid is not None else None

    def owner_of(self, interaction_id: int) -> str:
        if interaction_id not in self._owners:
            self._owners[interaction_id] = self._view.owner_of(interaction_id)
        return self._owners[interaction_id]


class RoutingRule(Protocol):
    name: str
    description: str

    def check(self, facts: Facts) -> Decision | None: ...


class Malformed:
    name = "malformed"
    description = "the message cannot be routed (empty, or no header fields): held"

    def check(self, facts: Facts) -> Decision | None:
        if not facts.msg.problem:
            return None
        if facts.seen is not None:
            # The same unroutable bytes are held already: a sender's retry is a duplicate
            # (250), not a second hold that clashes with the first (an endless 451).
            return None
        return Decision(
            Action.HOLD, self.name, facts.primary, reason=facts.msg.problem, step=self.name
        )


class Duplicate:
    name = "duplicate"
    description = "already stored for the same accounts: nothing to do"

    def check(self, facts: Facts) -> Decision | None:
        if facts.seen is None:
            return None
        pk, accounts = facts.seen
        if not set(facts.receiving) <= accounts:
            return None
        iid = facts.stored_interaction
        return Decision(
            Action.DUPLICATE,
            self.name,
            facts.primary,
            iid,
            facts.owner_of(iid) if iid is not None else None,
            matched_id=facts.msg.message_id,
            existing_pk=pk,
            step=self.name,
        )


class CopyForAnotherAccount:
    name = "copy-for-another-account"
    description = "the same message is stored for another account: record the extra recipient"

    def check(self, facts: Facts) -> Decision | None:
        if facts.seen is None:
            return None
        if facts.msg.problem:
            # A held message for another account: record the recipient beside it.
            return Decision(
                Action.ATTACH,
                Malformed.name,
                facts.primary,
                reason=facts.msg.problem,
                existing_pk=facts.seen[0],
                step=self.name,
            )
        # The stored copy is in its interaction already and the owner's mailbox has it, so
        # only the extra recipient is recorded: a Cc must not deliver the message twice.
        return Decision(
            Action.ATTACH,
            facts.thread.rule,
            facts.primary,
            facts.thread.interaction_id,
            facts.owner,
            matched_id=facts.thread.matched_id,
            existing_pk=facts.seen[0],
            step=self.name,
        )


class OwnerReceives:
    name = "owner-receives"
    description = "a new interaction, or its owner is among the recipients: deliver to it"

    def check(self, facts: Facts) -> Decision | None:
        found = facts.thread
        if found.interaction_id is None:
            # Whoever it was addressed to first opens the conversation and owns it.
            p = facts.primary
            return Decision(
                Action.DELIVER, NEW_INTERACTION, p, None, p, p, reason=found.note, step=self.name
            )
        owner = facts.owner
        # Mail to several accounts the owner is among (a Cc to the old and the new address)
        # reaches the owner directly, once.
        if owner not in facts.receiving:
            return None
        return Decision(
            Action.DELIVER,
            found.rule,
            facts.primary,
            found.interaction_id,
            owner,
            owner,
            matched_id=found.matched_id,
            step=self.name,
        )


class FollowTheOwner:
    name = "follow-the-owner"
    description = "mail only to an old account of the conversation goes to its current owner"

    def check(self, facts: Facts) -> Decision | None:
        found, owner = facts.thread, facts.owner
        if found.interaction_id is None or owner is None or owner in facts.receiving:
            return None
        # Chains of transfers need nothing special: the interaction row always names the
        # current owner, however many accounts the conversation passed through.
        return Decision(
            Action.ROUTE,
            found.rule,
            facts.primary,
            found.interaction_id,
            owner,
            owner,
            matched_id=found.matched_id,
            step=self.name,
        )


# Order matters: a malformed message is held even when an identical copy is stored, and a
# copy is a duplicate (not attached again) once every recipient is recorded.  The last two
# rules together take every message the first three leave.
RULES: tuple[RoutingRule, ...] = (
    Malformed(),
    Duplicate(),
    CopyForAnotherAccount(),
    OwnerReceives(),
    FollowTheOwner(),
)


def decide(
    msg: ParsedMessage,
    receiving: Sequence[str],
    view: RoutingView,
    *,
    subject_token: str | None = None,
) -> Decision:
    """Decide for ``msg`` addressed to the accounts named in ``receiving`` (at least one).

    ``subject_token``: the token shape our subjects carry (``notify.subject_token``), so
    the thread rules can read it back; None when there is none.
    """
    facts = Facts(msg, receiving, view, subject_token)
    for rule in RULES:
        decision = rule.check(facts)
        if decision is not None:
            return decision
    raise AssertionError(f"no routing rule decided for <{msg.message_id}>")
