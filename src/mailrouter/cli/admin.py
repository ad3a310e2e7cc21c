"""Admin commands: ``run`` the daemon, ``check-config``, the ``db`` schema and its backup."""

from __future__ import annotations

import argparse
import json
import sys

from mailrouter.cli._common import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    Subparsers,
    add_command,
    json_flag,
    print_json,
)
from mailrouter.config import Settings, describe

__all__ = ["register"]


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.daemon import StartupError, run

    try:
        return run(settings)
    except StartupError as exc:
        print(f"mailrouter: cannot start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # e.g. the SMTP port is taken
        print(f"mailrouter: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAIL


def cmd_check_config(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.notify import check_templates
    from mailrouter.store.check import check_database

    problems = check_database(settings) + check_templates(settings)
    if args.json:
        print_json({"ok": not problems, "problems": problems, "settings": describe(settings)})
    else:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if not problems:
            print(json.dumps(describe(settings), indent=2, default=str))
            print(f"{settings.config_path}: OK", file=sys.stderr)
    return EXIT_OK if not problems else EXIT_USAGE


def cmd_db(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.store.db import open_database
    from mailrouter.store.migrate import current_revision, head_revision, upgrade

    if args.db_command == "backup":
        return _db_backup(settings, args)
    if args.path is not None:
        raise CommandError(f"db {args.db_command} takes no PATH")
    db = open_database(settings.database_url)
    try:
        if args.db_command == "upgrade":
            before, after = upgrade(db)
            print(
                f"schema: {before or 'empty'} -> {after}"
                if before != after
                else f"schema: {after} (up to date)"
            )
        else:
            current = current_revision(db)
            print(f"schema: {current or 'empty'} (this version needs {head_revision()})")
    finally:
        db.dispose()
    return EXIT_OK


def _db_backup(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from mailrouter.store.backup import backup
    from mailrouter.store.db import open_database

    if args.path is None:
        raise CommandError("db backup needs the PATH of the copy to write")
    db = open_database(settings.database_url)
    try:
        done = backup(db, Path(args.path))
    finally:
        db.dispose()
    print(
        f"backup: {done.path} ({done.size} bytes, schema {done.schema or 'empty'}, "
        f"{done.seconds:.1f}s)"
    )
    return EXIT_OK


def register(sub: Subparsers) -> None:
    add_command(sub, "run", cmd_run, "run the daemon in the foreground")
    json_flag(
        add_command(
            sub,
            "check-config",
            cmd_check_config,
            "validate the config and print the effective settings",
        )
    )
    db = add_command(sub, "db", cmd_db, "database schema and backup")
    db.add_argument(
        "db_command",
        choices=("upgrade", "current", "backup"),
        help="upgrade: apply migrations; current: show the revision; backup PATH: a "
        "consistent copy of a SQLite database, safe while the daemon runs",
    )
    db.add_argument("path", nargs="?", metavar="PATH", help="backup: the file to write")
