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
