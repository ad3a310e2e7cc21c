"""The ``queue`` command group, after ``postqueue -p`` / ``postqueue -f`` / ``postsuper``:
``list``, ``show``, ``retry``, ``hold``, ``release``, ``delete`` and ``flush``.

Ids say their kind: ``m12`` is a message held for inspection, ``o34`` (or ``34``) an
outbox job.  Each action is a domain operation in :mod:`mailrouter.deliver.queue`; this
module parses, asks for confirmation where it must, and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from typing import Any

from mailrouter.cli._common import (
    EXIT_FAIL,
    EXIT_OK,
    CommandError,
    Subparsers,
    add_command,
    flush,
    json_flag,
    print_json,
    read,
    table,
)
from mailrouter.config import Settings
from mailrouter.errors import Refused, log_refusal

__all__ = ["register"]

COLUMNS = [
    "queue_id",
    "kind",
    "status",
    "account",
    "interaction",
    "attempts",
    "to",
    "next_attempt_at",
    "reason",
    "last_error",
]


def _json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.deliver.queue import list_queue

    rows = read(settings, lambda s, rt: list_queue(s, all_rows=getattr(args, "all", False)))
    if _json(args):
        print_json(rows)
        return EXIT_OK
    table(rows, COLUMNS)
    if rows:
        kinds = Counter(
            "held-message" if r["kind"] == "message" else str(r["status"]) for r in rows
        )
        print("-- " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    return EXIT_OK


def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.deliver.queue import parse_id, show

    qid = parse_id(args.id)
    item = read(settings, lambda s, rt: show(s, qid))
    if _json(args):
        print_json(item)
        return EXIT_OK
    for key in (
        "queue_id",
        "kind",
        "status",
        "reason",
        "account",
        "interaction",
        "message",
        "message_id",
        "source",
        "envelope_from",
        "to",
        "created_at",
        "attempts",
        "next_attempt_at",
        "deadline",
        "sent_at",
        "rule",
        "step",
        "last_error",
    ):
        if item.get(key) not in (None, ""):
            print(f"{key:>15}: {item[key]}")
    for name, value in item.get("headers", {}).items():
        print(f"{name:>15}: {value}")
    if "attempt_log" in item:
        print("\nattempts:")
        for a in item["attempt_log"] or [None]:
            if a is None:
                print("  (none yet)")
                break
            print(
                f"  #{a['attempt']} {a['finished_at'][:19]} {a['status']:<8} "
                f"relay={a['relay']} dsn={a['dsn']}\n      {a['reply']}"
            )
    return EXIT_OK


def _each(args: argparse.Namespace, op: Any) -> tuple[list[dict[str, Any]], int]:
    """Run ``op(rt, qid)`` for every id given; a refusal of one does not stop the others."""
    from mailrouter.deliver.queue import QueueChange, parse_id

    done: list[dict[str, Any]] = []
    failed = 0
    for text in args.ids:
        try:
            change: QueueChange = op(parse_id(text))
        except Refused as exc:
            failed += 1
            log_refusal(exc, f"queue {args.queue_command}", queue=text)
            print(f"mailrouter: {exc}", file=sys.stderr)
            done.append({"queue_id": text, "refused": exc.code, "detail": exc.message})
            continue
        done.append(change.as_dict())
        if not _json(args):
            print(_line(change.as_dict()))
    return done, failed


def _line(c: dict[str, Any]) -> str:
    if c.get("action"):  # a released message: what the routing did now
        return (
            f"{c['queue_id']}: {c['action']} interaction={c['interaction'] or '-'} rule={c['rule']}"
            + (f" job={c['job']}" if c["job"] else "")
            + (f" reason={c['reason']!r}" if c["reason"] else "")
        )
    return f"{c['queue_id']}: {c['status']}"


def _finish(
    settings: Settings,
    args: argparse.Namespace,
    op: Any,
    *,
    deliver: bool,
) -> int:
    from mailrouter.runtime import opened

    with opened(settings) as rt:
        done, failed = _each(args, lambda qid: op(rt, qid))
        # Deliver when something became deliverable (not for a message held again).
        due = deliver and any(c.get("status") in ("pending", "released") for c in done)
        attempted = flush(rt, args) if due else 0
    if _json(args):
        print_json({"items": done, "attempted": attempted})
    elif due and not getattr(args, "queue_only", False):
        print(f"attempted {attempted} item(s)")
    still_held = any(c.get("action") == "hold" for c in done)
    return EXIT_FAIL if failed or still_held else EXIT_OK


def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.deliver.queue import retry

    if args.retry_all == bool(args.ids):
        raise CommandError("give queue ids to retry, or --all (not both)")
    if args.retry_all:
        return cmd_flush(settings, args)
    return _finish(settings, args, retry, deliver=True)


def cmd_flush(settings: Settings, args: argparse.Namespace) -> int:
    """Everything pending, due now, then one delivery pass (``postqueue -f``)."""
    from mailrouter.deliver.queue import retry_all
    from mailrouter.runtime import opened

    with opened(settings) as rt:
        due = retry_all(rt)
        attempted = flush(rt, args)
    if _json(args):
        print_json({"made_due": due, "attempted": attempted})
    elif getattr(args, "queue_only", False):
        print(f"{due} item(s) due now (a running daemon delivers them)")
    else:
        print(f"attempted {attempted} item(s)")
    return EXIT_OK


def cmd_hold(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.deliver.queue import hold

    return _finish(settings, args, hold, deliver=False)


def cmd_release(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.deliver.queue import release
    from mailrouter.pipeline import StoreUnavailable

    def op(rt: Any, qid: Any) -> Any:
        try:
            return release(rt, qid)
        except StoreUnavailable as exc:
            raise CommandError(f"release failed, {qid} still held: {exc}") from None

    return _finish(settings, args, op, deliver=True)


def cmd_delete(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.deliver.queue import delete, parse_id, show

    if not args.yes:
        if not sys.stdin.isatty():
            raise CommandError("delete needs --yes when not run from a terminal (nothing deleted)")

        def preview(s: Any, rt: Any) -> list[dict[str, Any]]:
            items = []
            for text in args.ids:
                with contextlib.suppress(Refused):  # refused again, with its sentence, below
                    items.append(show(s, parse_id(text)))
            return items

        for item in read(settings, preview):
            print(
                f"{item['queue_id']}: {item['kind']} for {item['account']} to {item['to']} "
                f"({item['status']}{'; ' + item['reason'] if item.get('reason') else ''})"
            )
        answer = input(f"delete {len(args.ids)} delivery job(s)? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return EXIT_FAIL
    return _finish(settings, args, delete, deliver=False)


def register(sub: Subparsers) -> None:
    sp = add_command(
        sub,
        "queue",
        cmd_list,
        "the queue: held messages and outbox jobs; list, show, retry, hold, release, delete",
    )
    sp.add_argument("--all", action="store_true", help="include sent and deleted jobs")
    json_flag(sp)
    qs = sp.add_subparsers(dest="queue_command", metavar="ACTION")

    def action(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        p = qs.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        # SUPPRESS: `queue --json list` and `queue list --json` both work (a subparser's
        # default would overwrite the group's value).
        p.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable"
        )
        return p

    ids_help = "queue ids: m12 (held message), o34 or 34 (outbox job)"
    p = action("list", cmd_list, "held messages and outbox jobs (like postqueue -p)")
    p.add_argument(
        "--all", action="store_true", default=argparse.SUPPRESS, help="include sent, deleted"
    )
    p = action("show", cmd_show, "one item: envelope, headers, every delivery attempt")
    p.add_argument("id", help="queue id (m12, o34)")

    def deliver_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--queue-only",
            action="store_true",
            help="only change the queue (a running daemon delivers)",
        )

    p = action("retry", cmd_retry, "try jobs now: pending or failed ones, or --all pending")
    p.add_argument("ids", nargs="*", metavar="ID", help=ids_help)
    p.add_argument(
        "--all",
        dest="retry_all",
        action="store_true",
        help="every pending job, due now, then deliver (like postqueue -f)",
    )
    deliver_flags(p)
    p = action("flush", cmd_flush, "every pending job due now, then deliver (retry --all)")
    deliver_flags(p)
    p = action("hold", cmd_hold, "park pending jobs: never attempted until released")
    p.add_argument("ids", nargs="+", metavar="ID", help=ids_help)
    p = action("release", cmd_release, "let held jobs go, or route held messages again (m12)")
    p.add_argument("ids", nargs="+", metavar="ID", help=ids_help)
    deliver_flags(p)
    p = action(
        "delete",
        cmd_delete,
        "drop delivery jobs (never a stored message); asks, or needs --yes off a terminal",
    )
    p.add_argument("ids", nargs="+", metavar="ID", help="outbox job ids (o34 or 34)")
    p.add_argument("--yes", action="store_true", help="do not ask")
