"""Stage 3: where a message goes — deliver to its account, route to the current owner, or hold."""

from mailrouter.routing.decide import ACTIONS, Decision, RoutingView, decide

__all__ = ["ACTIONS", "Decision", "RoutingView", "decide"]
