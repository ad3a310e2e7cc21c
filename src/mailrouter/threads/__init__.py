"""Stage 2: which interaction (customer conversation) a message belongs to."""

from mailrouter.threads.resolve import RULES, Resolution, ThreadIndex, resolve

__all__ = ["RULES", "Resolution", "ThreadIndex", "resolve"]
