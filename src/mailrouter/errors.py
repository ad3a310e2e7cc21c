"""The one refusal type of the domain operations, shared by every front end.

A domain operation (pick, close, transfer, reply, release, requeue …) that will not do
what it was asked raises :class:`Refused` *before* it changes anything.  The refusal
carries a stable machine ``code`` (an HTTP front end maps it to a status, scripts match
on it) and the sentence a person reads; the CLI prints that sentence and the API puts it
in its error ``detail``, so both front ends say the same thing in the same words.
"""

from __future__ import annotations

__all__ = ["Refused"]


class Refused(Exception):
    """An operation was refused; nothing was changed.

    Codes in use: ``not-found``, ``unknown-account``, ``closed``, ``same-account``,
    ``transfer-not-enabled``, ``template-failed``, ``already-picked``, ``empty-body``,
    ``no-customer-message``, ``no-customer-address``, ``bad-reply``,
    ``idempotency-key-reused``, ``idempotency-key-in-use``, ``not-held``, ``not-failed``;
    agents (``agents.py``): ``bad-token``, ``bad-password``, ``unknown-agent``,
    ``agent-exists``, ``bad-agent-name``, ``no-accounts``, ``weak-password``; the HTTP
    front end: ``unauthenticated``, ``admin-only``, ``not-your-account``, ``bad-cursor``,
    ``bad-period``.  ``http/problems.py`` maps each to an HTTP status.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message
