"""How a delivery attempt failed: temporary (retry from the outbox) or permanent (5xx)."""

from __future__ import annotations

__all__ = ["DeliveryError", "PermanentDeliveryError", "TemporaryDeliveryError"]


class DeliveryError(Exception):
    """A delivery attempt failed.  ``permanent`` decides retry versus give up."""

    permanent = False


class TemporaryDeliveryError(DeliveryError):
    """4xx, timeout, connection refused or lost: the outbox retries with backoff."""


class PermanentDeliveryError(DeliveryError):
    """5xx or a refusal that retrying cannot fix: recorded as failed, visible in `queue`."""

    permanent = True
