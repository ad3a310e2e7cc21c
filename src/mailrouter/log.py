"""Logging set-up and the routing log: one ``key=value`` line (or JSON object) per decision.

Postfix taught operators to ``grep`` and ``awk`` a mail log; a decision line names the
interaction, the Message-ID, the receiving account, the owner, the rule and the action.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ["JsonFormatter", "KVFormatter", "event", "kv", "setup_logging"]

_EVENT = "mr_event"
_FIELDS = "mr_fields"


def _quote(value: object) -> str:
    text = "" if value is None else str(value)
    if text == "" or any(c in text for c in ' "=\t\n\r'):
        return (
            '"'
            + text.replace("\\", "\\\\")
            .replace('"', '\\"')
            .replace("\n", "\\n")
            .replace("\r", "\\r")
            + '"'
        )
    return text


def kv(name: str, fields: dict[str, Any]) -> str:
    """``event=NAME k=v …`` with values quoted only where needed, None left out."""
    parts = [f"event={name}"]
    parts += [f"{k}={_quote(v)}" for k, v in fields.items() if v is not None]
    return " ".join(parts)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event; the formatter decides between key=value and JSON."""
    if logger.isEnabledFor(level):
        logger.log(level, kv(name, fields), extra={_EVENT: name, _FIELDS: fields})


class KVFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        line = f"{ts[:-4]}Z {record.levelname.lower()} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        name = getattr(record, _EVENT, None)
        if name is not None:
            out["event"] = name
            out.update({k: v for k, v in getattr(record, _FIELDS).items() if v is not None})
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(fmt: str = "kv", level: str = "INFO", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KVFormatter())
    root = logging.getLogger("mailrouter")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
