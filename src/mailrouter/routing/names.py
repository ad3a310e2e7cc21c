"""Every name a routing decision can carry in ``rule`` or ``step``, with its description.

``mailrouter explain`` and any other front end read descriptions from here, so the sentence
an operator reads is the one written beside the rule, never a copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from mailrouter.routing.decide import ACTIONS
from mailrouter.routing.decide import RULES as ROUTING_RULES
from mailrouter.threads.resolve import NEW_INTERACTION
from mailrouter.threads.resolve import RULES as THREAD_RULES

__all__ = [
    "ALL_RULES",
    "INTERNAL_ERROR",
    "NEW_INTERACTION_RULE",
    "Named",
    "Outcome",
    "describe_action",
    "describe_rule",
]


class Named(Protocol):
    """A thread rule, a routing rule or an outcome: a name and a one-line description."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...


@dataclass(frozen=True)
class Outcome:
    """A name a decision carries that no rule's ``check`` produces: an outcome of the chain."""

    name: str
    description: str


# No thread rule matched.  threads.resolve only returns the name; its description lives here
# with every other name a decision can carry.
NEW_INTERACTION_RULE = Outcome(NEW_INTERACTION, "nothing known matches: a new conversation")

# The pipeline holds a message whose routing raised, so that one bad message neither stops
# the stage nor is lost; the decision names this instead of a rule.
INTERNAL_ERROR = Outcome("internal-error", "the routing code failed on it: held for inspection")

ALL_RULES: tuple[Named, ...] = (
    *THREAD_RULES,
    NEW_INTERACTION_RULE,
    *ROUTING_RULES,
    INTERNAL_ERROR,
)


def _by_name(rules: tuple[Named, ...]) -> Mapping[str, str]:
    out: dict[str, str] = {}
    for r in rules:
        # Two rules with one name would make the routing log ambiguous.
        if r.name in out:
            raise ValueError(f"rule name {r.name!r} is used twice")
        out[r.name] = r.description
    return MappingProxyType(out)


_DESCRIPTIONS = _by_name(ALL_RULES)


def describe_rule(name: str) -> str:
    """The one-line description of a rule or outcome name; an unknown name describes itself."""
    return _DESCRIPTIONS.get(name, name)


def describe_action(action: str) -> str:
    """What an action (``deliver``, ``route``…) means; an unknown one describes itself."""
    return ACTIONS.get(action, action)
