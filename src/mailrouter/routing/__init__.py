"""Stage 3: where a message goes — deliver to its account, route to the current owner, or hold."""

from mailrouter.routing.decide import (
    ACTIONS,
    RULES,
    Action,
    Decision,
    Facts,
    RoutingRule,
    RoutingView,
    decide,
)
from mailrouter.routing.names import (
    ALL_RULES,
    INTERNAL_ERROR,
    NEW_INTERACTION_RULE,
    Named,
    Outcome,
    describe_action,
    describe_rule,
)

__all__ = [
    "ACTIONS",
    "ALL_RULES",
    "INTERNAL_ERROR",
    "NEW_INTERACTION_RULE",
    "RULES",
    "Action",
    "Decision",
    "Facts",
    "Named",
    "Outcome",
    "RoutingRule",
    "RoutingView",
    "decide",
    "describe_action",
    "describe_rule",
]
