"""The one refusal type of the domain operations, shared by every front end.

A domain operation (pick, close, transfer, reply, release, requeue …) that will not do
what it was asked raises :class:`Refused` *before* it changes anything.  The refusal
carries a stable machine ``code`` (an HTTP front end maps it to a status, scripts match
on it) and the sentence a person reads; the CLI prints that sentence and the API puts it
in its error ``detail``, so both front ends say the same thing in the same words.
"""

from __future__ import annotations

import logging
from typing import Any

from mailrouter.log import event

__all__ = ["Refused", "log_refusal"]

log = logging.getLogger("mailrouter.refused")


class Refused(Exception):
    """An operation was refused; nothing was changed.

    Codes in use: ``not-found``, ``unknown-account``, ``closed``, ``same-account``,
    ``transfer-not-enabled``, ``busy``, ``already-picked``, ``empty-body``,
    ``no-customer-message``, ``no-customer-address``, ``bad-reply``,
    ``idempotency-key-reused``, ``idempotency-key-in-use``, ``not-held``, ``not-failed``;
    the queue's ``bad-queue-id``, ``not-a-job``, ``already-held``, ``held``,
    ``being-delivered``, ``already-sent``, ``deleted``, ``failed``, ``wrong-state``;
    ``db backup``'s ``not-sqlite``, ``backup-exists``, ``no-directory``, ``backup-corrupt``;
    agents (``agents.py``): ``bad-token``, ``bad-password``, ``unknown-agent``,
    ``agent-exists``, ``bad-agent-name``, ``no-accounts``, ``weak-password``; the HTTP
    front end: ``unauthenticated``, ``admin-only``, ``not-your-account``, ``bad-cursor``,
    ``bad-period``, ``store-unavailable``.  ``http/problems.py`` maps each to an HTTP status.
    (``template-failed`` is gone: a failing notice template no longer refuses a transfer.)
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


def log_refusal(exc: Refused, op: str, **fields: Any) -> None:
    """The one log line a front end writes for a refusal it reports (``event=refused``)."""
    event(log, "refused", logging.INFO, op=op, code=exc.code, reason=exc.message, **fields)
