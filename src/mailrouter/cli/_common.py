"""What every command module shares: exit codes, output helpers, the runtime, flushing.

Commands hold no rules: they parse arguments, call a domain operation or a read view,
and print.  A refusal from the domain layer (:class:`~mailrouter.errors.Refused`) or a
:class:`CommandError` ends the command with its sentence on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from mailrouter.config import AccountSettings, Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from mailrouter.runtime import Runtime

__all__ = [
    "EXIT_FAIL",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "Subparsers",
    "account",
    "add_command",
    "flush",
    "json_flag",
    "parse_date",
    "print_json",
    "queue_only_flag",
    "read",
    "table",
]

T = TypeVar("T")
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
Handler = Callable[[Settings, argparse.Namespace], int]


class Subparsers(Protocol):
    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


class CommandError(Exception):
    """A refusal or failure to report on stderr with exit status 1."""


def add_command(sub: Subparsers, name: str, func: Handler, help: str) -> argparse.ArgumentParser:
    """A subcommand whose handler is ``func(settings, args)``."""
    sp = sub.add_parser(name, help=help, description=help)
    sp.set_defaults(func=func)
    return sp


def json_flag(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--json", action="store_true", help="machine-readable output")


def queue_only_flag(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--queue-only",
        action="store_true",
        help="only queue deliveries (a running daemon sends them)",
    )


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str, ensure_ascii=False)
    sys.stdout.write("\n")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    widths = [min(w, 60) for w in widths]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v[:w].ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def parse_date(value: str) -> datetime:
    """``YYYY-MM-DD`` (midnight UTC) or an ISO 8601 timestamp."""
    try:
        d = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a date (YYYY-MM-DD or ISO 8601): {value!r}"
        ) from None
    return d.replace(tzinfo=UTC) if d.tzinfo is None else d


def account(settings: Settings, name: str) -> AccountSettings:
    """The configured account ``name`` (name or address), or a one-line refusal."""
    try:
        return settings.account(name)
    except KeyError as exc:
        raise CommandError(str(exc.args[0])) from None


def read(settings: Settings, query: Callable[[Session, Runtime], T]) -> T:
    """Open the store, run ``query`` in one read transaction, close the store."""
    from mailrouter.runtime import opened

    with opened(settings) as rt, rt.db.read() as s:
        return query(s, rt)


def flush(rt: Runtime, args: argparse.Namespace) -> int:
    """Deliver queued work now (the CLI's stand-in for the daemon's outbox worker)."""
    if getattr(args, "queue_only", False):
        return 0
    from mailrouter.deliver.outbox import OutboxWorker

    async def once() -> int:
        worker = OutboxWorker(rt)
        try:
            return await worker.run_once()
        finally:
            await worker.retire()

    return asyncio.run(once())
