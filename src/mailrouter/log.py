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

Under systemd, when ``$JOURNAL_STREAM`` names the very stream we write to, each line starts
with the syslog priority journald reads (``<3>`` error … ``<7>`` debug, sd-daemon(3)), so
``journalctl -p warning`` shows warnings and errors; journald strips the prefix.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO

__all__ = [
    "FOREIGN_EVENT",
    "JsonFormatter",
    "KVFormatter",
    "LogHandler",
    "event",
    "journal_priority",
    "kv",
    "set_level",
    "setup_logging",
    "writes_to_journal",
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


def journal_priority(levelno: int) -> int:
    """The syslog priority of a logging level: 2 critical, 3 error, 4 warning, 6 info, 7 debug."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def writes_to_journal(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """Is ``stream`` the journal stream systemd connected us to?

    ``$JOURNAL_STREAM`` is ``DEVICE:INODE`` of that stream (systemd.exec(5)); it is
    inherited by children whose stderr goes elsewhere, so only a stream whose file has
    that device and inode counts.
    """
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, OSError, ValueError):  # no real file behind it (pytest, StringIO)
        return False


class LogHandler(logging.StreamHandler[TextIO]):
    """The one handler setup_logging installs (and replaces when called again)."""

    def __init__(self, stream: TextIO, *, journal: bool = False) -> None:
        super().__init__(stream)
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return f"<{journal_priority(record.levelno)}>{line}" if self.journal else line


def setup_logging(
    fmt: str = "kv",
    level: str = "INFO",
    stream: TextIO | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """One handler on the root logger, formatting every record as ``fmt`` on ``stream``.

    mailrouter's own loggers log at ``level``; other libraries' only at WARNING and up
    (aiosmtpd logs every connection at INFO, and with DEBUG every command line, AUTH
    included).  Python warnings are routed through logging too, so they share the shape.
    Handlers that others put on the root logger (pytest's, say) are left alone.  Lines
    get journald's priority prefix when ``stream`` is the journal (``env``: the
    environment to look in, ``os.environ`` by default).
    """
    out = stream or sys.stderr
    handler = LogHandler(out, journal=writes_to_journal(out, env))
    handler.setFormatter(JsonFormatter() if fmt == "json" else KVFormatter())
    root = logging.getLogger()
    ours = logging.getLogger("mailrouter")
    for logger in (root, ours):
        for old in [h for h in logger.handlers if isinstance(h, LogHandler)]:
            logger.removeHandler(old)
    root.addHandler(handler)
    set_level(level)
    ours.propagate = True
    logging.captureWarnings(True)


def set_level(level: str) -> None:
    """mailrouter's loggers at ``level``, other libraries' at WARNING and up (see above)."""
    root = logging.getLogger()
    root.setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
    logging.getLogger("mailrouter").setLevel(level.upper())
