"""The ``mailrouter`` command: run the daemon, and inspect or drive the store from a shell.

Every listing takes ``--json``; accounts are named by name or address everywhere.
Exit status: 0 done, 1 refused or failed (nothing changed), 2 usage or configuration error.

One module per command group, each with its options beside its handlers (after Mailman
3's ``commands/``): ``mail`` (mail in), ``interactions`` (the agents' operations),
``admin`` (the daemon, config and schema), ``queue`` (held messages and outbox jobs),
``observe`` (``trace`` one message, ``status``) and ``agents`` (who may use the HTTP API
and desk).  This module only dispatches.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mailrouter import __version__
from mailrouter.cli import admin, agents, interactions, mail, observe, queue
from mailrouter.cli._common import EXIT_FAIL, EXIT_USAGE, CommandError
from mailrouter.config import ConfigError, load
from mailrouter.log import setup_logging

__all__ = ["build_parser", "main"]

DEFAULT_CONFIG = "/etc/mailrouter/mailrouter.toml"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mailrouter",
        description="Run the mailrouter daemon, and inspect or drive its store from a shell.",
    )
    ap.add_argument(
        "-c", "--config", help=f"config file (default: $MAILROUTER_CONFIG or {DEFAULT_CONFIG})"
    )
    ap.add_argument(
        "--log-format", choices=("kv", "json"), help="routing log format (default: config)"
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("--version", action="version", version=f"mailrouter {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    admin.register(sub)
    queue.register(sub)
    observe.register(sub)
    mail.register(sub)
    interactions.register(sub)
    agents.register(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = args.config or os.environ.get("MAILROUTER_CONFIG") or DEFAULT_CONFIG
    try:
        settings = load(config)
    except ConfigError as exc:
        print(f"mailrouter: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(
        args.log_format or settings.log_format, "DEBUG" if args.verbose else settings.log_level
    )
    from mailrouter.errors import Refused, log_refusal
    from mailrouter.store.db import SchemaError

    try:
        return int(args.func(settings, args))
    except (CommandError, Refused) as exc:
        # A refusal the command re-worded (`transfer refused: …`) is still logged as one.
        refusal = exc if isinstance(exc, Refused) else exc.__context__
        if isinstance(refusal, Refused):
            log_refusal(refusal, args.command)
        print(f"mailrouter: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except SchemaError as exc:
        print(f"mailrouter: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"mailrouter: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `mailrouter interactions | head`: the reader left.  Exit quietly like Unix tools
        # do, and keep Python from complaining again while flushing stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141
