"""Every reply the SMTP and LMTP listeners send, each with its RFC 3463 enhanced status code.

Our own replies are the constants below.  aiosmtpd writes some replies itself, without an
enhanced code; :func:`enhance` rewrites those on their way out (the listener's ``push``),
so a sending MTA records a real DSN status (Postfix reports ``dsn=5.0.0`` for a bare
``552``) and every line agrees with the ``ENHANCEDSTATUSCODES`` we announce (RFC 2034).
RFC 2034 §3 exempts the greeting and the HELO/EHLO/LHLO replies; ``354`` and the ``334``
AUTH challenges carry data or an invitation rather than a status, as Postfix sends them.
"""

from __future__ import annotations

import re

__all__ = [
    "AUTH_NOT_ENABLED",
    "BYE",
    "IDLE_TIMEOUT",
    "MAIL_OK",
    "OK",
    "RCPT_OK",
    "SHUTTING_DOWN",
    "TEMPFAIL",
    "TOO_BIG",
    "TOO_MANY_CONNECTIONS",
    "TOO_MANY_ERRORS",
    "TOO_MANY_FROM_CLIENT",
    "TOO_MANY_RECIPIENTS",
    "counts_as_error",
    "enhance",
    "has_enhanced_code",
    "not_an_account",
]

OK = "250 2.0.0 OK"
MAIL_OK = "250 2.1.0 OK"
RCPT_OK = "250 2.1.5 OK"
BYE = "221 2.0.0 Bye"
# The store could not take the message (or anything else failed on our side): the sender
# keeps it and retries.  Never a 5xx for our own trouble: that would bounce the mail.
TEMPFAIL = "451 4.3.0 Temporary failure storing the message; try again later"
TOO_BIG = "552 5.3.4 Message too big for system"
TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"
AUTH_NOT_ENABLED = "503 5.5.1 Error: authentication not enabled"
# 421 closes the session (RFC 5321 §3.8); the client keeps its mail and tries again.
SHUTTING_DOWN = "421 4.3.2 Service shutting down"
TOO_MANY_CONNECTIONS = "421 4.3.2 Too many connections, try again later"
TOO_MANY_FROM_CLIENT = "421 4.7.0 Error: too many connections from your address"
TOO_MANY_ERRORS = "421 4.7.0 Error: too many errors"
IDLE_TIMEOUT = "421 4.4.2 Error: timeout exceeded"


def not_an_account(address: str) -> str:
    """The refusal of a recipient that is none of our accounts (never an open relay)."""
    return f"550 5.1.1 <{address}>: Recipient address rejected: not a mailrouter account"


# aiosmtpd 1.4's own replies that lack a code, by exact text.  X.5.1 is a command out of
# sequence or unsupported, X.5.2 one not understood, X.5.4 bad arguments (RFC 3463 §3.6).
_EXACT = {
    "250 OK": OK,  # RSET, NOOP (MAIL, RCPT and DATA answer through our handler)
    "221 Bye": BYE,
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
    "500 Command line too long": "500 5.5.2 Command line too long",
    "500 Error: bad syntax": "500 5.5.2 Error: bad syntax",
    "500 Error: strict ASCII mode": "500 5.6.7 Error: strict ASCII mode",
    "554 Command refused due to lack of security": (
        "554 5.7.0 Command refused due to lack of security"
    ),
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
    "454 TLS not available": "454 4.7.0 TLS not available",
    "503 Already authenticated": "503 5.5.1 Already authenticated",
    "501 Not enough value": "501 5.5.4 Syntax: AUTH mechanism [initial-response]",
    "501 Too many values": "501 5.5.4 Syntax: AUTH mechanism [initial-response]",
    "503 Error: nested MAIL command": "503 5.5.1 Error: nested MAIL command",
    "503 Error: need MAIL command": "503 5.5.1 Error: need MAIL command",
    "503 Error: need RCPT command": "503 5.5.1 Error: need RCPT command",
    "552 Error: message size exceeds fixed maximum message size": TOO_BIG,
    "552 Error: Too much mail data": TOO_BIG,
    "502 EXPN not implemented": "502 5.5.1 EXPN not implemented",
}
# ... and by prefix, for those that quote the client or vary with the session.
_PREFIX = (
    ("250 Syntax: ", "2.0.0"),  # HELP COMMAND
    ("250 Supported commands: ", "2.0.0"),  # HELP
    ("252 Cannot VRFY user", "2.0.0"),
    ("500 Error: command ", "5.5.2"),  # … "X" not recognized
    ("501 ", "5.5.4"),  # Syntax: …, Error: BODY …, Error: SMTPUTF8 …, Supported commands: …
    ("502 Could not VRFY ", "5.1.3"),
    ("503 Error: send ", "5.5.1"),  # … HELO/EHLO first
    ("555 ", "5.5.4"),  # MAIL FROM / RCPT TO parameters not recognized
)
# aiosmtpd answers "500 Error: (Exception) text" when our handle_exception itself fails:
# an internal failure, so a temporary one for the sender.
_INTERNAL = ("500 Error: (", "500 Error: Cannot describe error")

_CODE = re.compile(r"^([2-5])\d\d[ -]")
_ENHANCED = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


def has_enhanced_code(line: str) -> bool:
    return _ENHANCED.match(line) is not None


# aiosmtpd gives a malformed sender the recipient's code (X.1.3); a sender's is X.1.7.
_MALFORMED = "553 5.1.3 Error: malformed address"
_MALFORMED_SENDER = "553 5.1.7 Error: malformed sender address"


def enhance(line: str, command: str | None = None) -> str:
    """``line`` with an RFC 3463 code if it is a status that needs one and lacks it.

    Replies not listed here pass unchanged when they are not refusals (the greeting, the
    EHLO lines, ``354``, ``334``); any other 4xx/5xx gets the code's class with detail
    ``0.0`` (``X.0.0``, "other or undefined"), so no refusal ever goes out without one.
    ``command`` is the command being answered, where the text alone is ambiguous.
    """
    if line == _MALFORMED and command == "MAIL":
        return _MALFORMED_SENDER
    if has_enhanced_code(line):
        return line
    if line in _EXACT:
        return _EXACT[line]
    if line.startswith(_INTERNAL):
        return TEMPFAIL
    for prefix, code in _PREFIX:
        if line.startswith(prefix):
            return f"{line[:4]}{code} {line[4:]}"
    m = _CODE.match(line)
    if m is not None and m.group(1) in "45":
        return f"{line[:4]}{m.group(1)}.0.0 {line[4:]}"
    return line


def counts_as_error(line: str) -> bool:
    """Whether a reply counts towards ``hard_error_limit``: a refusal the client caused.

    Our own trouble (``451``) is not the client's error, and ``421`` ends the session anyway.
    """
    code = line[:3]
    return code[:1] == "5" or (code[:1] == "4" and code not in ("421", "451"))
