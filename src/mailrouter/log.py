"""Logging set-up and the routing log: one ``key=value`` line (or JSON object) per record.

Postfix taught operators to ``grep`` and ``awk`` a mail log; a decision line names the
interaction, the Message-ID, the receiving account, the owner, the rule and the action.

Every line mailrouter writes comes from :func:`event`: a name and typed fields, never a
hand-formatted message.  The two formatters decide the shape, and both keep a record to
exactly one line, whatever it carries:

* ``kv``: ``TS LEVEL LOGGER event=NAME k=v …`` with values quoted (and CR/LF escaped)
  where needed; a traceback goes into a quoted ``exc=`` field.
* ``json``: ``{"ts", "level", "logger", "event", <fields>…, "exc"}``, one object a line.

:func:`setup_logging` puts its handler on the root logger, so records from other
libraries (aiosmtpd's ``mail.log``, ``asyncio``, ``alembic``, Python warnings) come out
in the same shape: with the event name ``log`` and their text under ``message``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO

__all__ = [
    "FOREIGN_EVENT",
    "JsonFormatter",
    "KVFormatter",
    "LogHandler",
    "event",
    "kv",
    "setup_logging",
]

_EVENT = "mr_event"
_FIELDS = "mr_fields"

# The event name of a record that did not come through event(): another library's
# logger, a Python warning, or a plain logging call.  Its text is the "message" field.
FOREIGN_EVENT = "log"

# Keys the JSON formatter writes itself; an event field of the same name is kept as
# "<name>_" rather than silently overwriting (or being overwritten by) them.
_RESERVED = frozenset({"ts", "level", "logger", "event", "exc", "stack"})

ExcInfo = (
    bool
    | BaseException
    | tuple[type[BaseException], BaseException, TracebackType | None]
    | tuple[None, None, None]
    | None
)


# Control characters a value may carry in from mail (a NUL in a Subject, an ESC sequence in
# a display name): C0, DEL and C1, plus the Unicode line and paragraph separators that some
# readers split lines at.  Written as escapes, they can neither break the one-line shape
# nor drive the terminal of whoever runs ``tail -f``.
_SHORT_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES = str.maketrans(
    {
        **{chr(c): e for c, e in _CONTROL.items()},
        **_SHORT_ESCAPES,
        "\u2028": "\\u2028",
        "\u2029": "\\u2029",
    }
)
_NEEDS_QUOTES = frozenset(' "=') | {chr(c) for c in _CONTROL} | {"\u2028", "\u2029"}


def _quote(value: object) -> str:
    text = "" if value is None else str(value)
    if text == "" or not _NEEDS_QUOTES.isdisjoint(text):
        return '"' + text.translate(_ESCAPES) + '"'
    return text


def kv(name: str, fields: dict[str, Any]) -> str:
    """``event=NAME k=v …`` with values quoted only where needed, None left out."""
    parts = [f"event={name}"]
    parts += [f"{k}={_quote(v)}" for k, v in fields.items() if v is not None]
    return " ".join(parts)


def event(
    logger: logging.Logger,
    name: str,
    level: int = logging.INFO,
    /,
    *,
    exc_info: ExcInfo = None,
    **fields: Any,
) -> None:
    """Log one structured event; the formatter decides between key=value and JSON.

    ``exc_info`` is passed on as in :meth:`logging.Logger.log` (``True`` inside an
    ``except`` block, or the exception itself); the formatters put the traceback into an
    ``exc`` field of the same line.
    """
    if logger.isEnabledFor(level):
        logger.log(
            level,
            kv(name, fields),
            exc_info=exc_info,
            extra={_EVENT: name, _FIELDS: fields},
            stacklevel=2,  # the caller's file and line, not this function's
        )


def _timestamp(record: logging.LogRecord) -> datetime:
    return datetime.fromtimestamp(record.created, UTC)


def _foreign_text(record: logging.LogRecord) -> str:
    try:
        text = record.getMessage()
    except (TypeError, ValueError) as exc:  # a library's broken %-format: keep the raw parts
        text = f"{record.msg!r} % {record.args!r} ({exc})"
    return text.rstrip("\n")


class KVFormatter(logging.Formatter):
    """``2026-11-28T09:00:00.000Z info mailrouter.routing event=decision …``, one line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = _timestamp(record).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"  # milliseconds
        name = getattr(record, _EVENT, None)
        if name is not None:
            body = record.getMessage()
        else:
            body = kv(FOREIGN_EVENT, {"message": _foreign_text(record)})
        if record.exc_info:
            body += f" exc={_quote(self.formatException(record.exc_info))}"
        if record.stack_info:
            body += f" stack={_quote(self.formatStack(record.stack_info))}"
        return f"{ts} {record.levelname.lower()} {record.name} {body}"


class JsonFormatter(logging.Formatter):
    """``{"ts": …, "level": …, "logger": …, "event": NAME, <fields>}``, one object a line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        name = getattr(record, _EVENT, None)
        if name is not None:
            out["event"] = name
            for k, v in getattr(record, _FIELDS).items():
                if v is not None:
                    out[f"{k}_" if k in _RESERVED else k] = v
        else:
            out["event"] = FOREIGN_EVENT
            out["message"] = _foreign_text(record)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # json.dumps escapes every control character, so the object is always one line.
        return json.dumps(out, default=str)


class LogHandler(logging.StreamHandler[TextIO]):
    """The one handler setup_logging installs (and replaces when called again)."""


def setup_logging(fmt: str = "kv", level: str = "INFO", stream: TextIO | None = None) -> None:
    """One handler on the root logger, formatting every record as ``fmt`` on ``stream``.

    mailrouter's own loggers log at ``level``; other libraries' only at WARNING and up
    (aiosmtpd logs every connection at INFO, and with DEBUG every command line, AUTH
    included).  Python warnings are routed through logging too, so they share the shape.
    Handlers that others put on the root logger (pytest's, say) are left alone.
    """
    handler = LogHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KVFormatter())
    root = logging.getLogger()
    ours = logging.getLogger("mailrouter")
    for logger in (root, ours):
        for old in [h for h in logger.handlers if isinstance(h, LogHandler)]:
            logger.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
    ours.setLevel(level.upper())
    ours.propagate = True
    logging.captureWarnings(True)
