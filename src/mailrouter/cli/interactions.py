"""The agents' commands: list and ``show`` interactions, ``transfer``, ``pick``, ``close``,
``reply``, and the per-account ``report``.  Every state change is a domain operation."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mailrouter.cli._common import (
    EXIT_OK,
    CommandError,
    Subparsers,
    account,
    add_command,
    flush,
    json_flag,
    parse_date,
    print_json,
    queue_only_flag,
    read,
    table,
)
from mailrouter.config import Settings
from mailrouter.errors import Refused

__all__ = ["register"]


def cmd_interactions(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.views import list_interactions

    if args.account:
        account(settings, args.account)
    rows = read(
        settings,
        lambda s, rt: list_interactions(
            s, rt, account=args.account, unread=args.unread, status=args.status, limit=args.limit
        ),
    )
    if args.json:
        print_json(rows)
    else:
        for r in rows:
            r["new"] = "*" if r["unread"] else ""
        table(
            rows,
            [
                "id",
                "new",
                "account",
                "status",
                "distribution",
                "assigned_agent",
                "customer",
                "subject",
            ],
        )
    return EXIT_OK


def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.views import interaction_detail

    detail = read(settings, lambda s, rt: interaction_detail(s, args.id))
    if detail is None:
        raise CommandError(f"no interaction {args.id}")
    if args.json:
        print_json(detail)
        return EXIT_OK
    for key in (
        "id",
        "account",
        "origin_account",
        "status",
        "unread",
        "distribution",
        "assigned_agent",
        "customer",
        "subject",
        "created_at",
    ):
        print(f"{key:>15}: {'' if detail[key] is None else detail[key]}")
    print("\nmessages:")
    for m in detail["messages"]:
        routed = f" -> {m['routed_to']}" if m["routed_to"] else ""
        print(
            f"  {m['received_at'][:19]} {m['direction']:<8} {m['account']}{routed}  "
            f"{m['message_id']}\n      from: {m['from']}\n      to: {m['to']}\n"
            f"      subject: {m['subject']}  [{m['rule']}/{m['action']}]"
            + (f" HELD: {m['hold_reason']}" if m["status"] == "held" else "")
        )
    print("\ntransfers:")
    for t in detail["transfers"] or [{"id": None}]:
        if t["id"] is None:
            print("  (none)")
            break
        print(
            f"  {t['at'][:19]} {t['from']} -> {t['to']} by {t['by'] or '-'}; notice "
            f"{t['notification']}"
            + (f" ({t['notification_reason']})" if t["notification_reason"] else "")
        )
    return EXIT_OK


def cmd_transfer(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.runtime import opened
    from mailrouter.transfer import transfer

    with opened(settings) as rt:
        try:
            r = transfer(rt, args.id, args.to, actor=args.by)
        except Refused as exc:
            raise CommandError(f"transfer refused: {exc}") from None
        flush(rt, args)
    if args.json:
        print_json(r.__dict__)
    else:
        note = f"notice {r.notification}" + (f" ({r.reason})" if r.reason else "")
        print(f"interaction {r.interaction_id}: {r.from_account} -> {r.to_account}; {note}")
    return EXIT_OK


def cmd_pick(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.interactions import pick
    from mailrouter.runtime import opened

    with opened(settings) as rt:
        try:
            pick(rt, args.id, args.agent, force=args.force)
        except Refused as exc:
            hint = " (use --force to take it over)" if exc.code == "already-picked" else ""
            raise CommandError(f"{exc}{hint}") from None
    print(f"interaction {args.id} picked by {args.agent}")
    return EXIT_OK


def cmd_close(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.interactions import close
    from mailrouter.runtime import opened

    with opened(settings) as rt:
        close(rt, args.id)
    print(f"interaction {args.id} closed")
    return EXIT_OK


def cmd_reply(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.reply import reply
    from mailrouter.runtime import opened

    body = (
        Path(args.body_file).read_text(encoding="utf-8")
        if args.body_file != "-"
        else sys.stdin.read()
    )
    with opened(settings) as rt:
        try:
            r = reply(rt, args.id, body, agent=args.agent)
        except Refused as exc:
            raise CommandError(f"reply refused: {exc}") from None
        flush(rt, args)
    print(
        f"interaction {args.id}: reply <{r.message_id}> from {r.account} "
        f"to {', '.join(r.to)} queued"
    )
    return EXIT_OK


def cmd_report(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.report import report_document

    if args.to <= args.from_:
        raise CommandError("--to must be after --from")
    doc = read(settings, lambda s, rt: report_document(s, rt, args.from_, args.to))
    rows = doc["accounts"]
    if args.json:
        print_json(doc)
    else:
        print(
            f"{args.from_.isoformat()} .. {args.to.isoformat()} (interactions and messages "
            "counted under their current account)"
        )
        table(
            rows,
            ["account", "interactions", "inbound", "outbound", "transfers_in", "transfers_out"],
        )
    return EXIT_OK


def register(sub: Subparsers) -> None:
    sp = add_command(sub, "transfer", cmd_transfer, "transfer an interaction to another account")
    sp.add_argument("id", type=int)
    sp.add_argument("--to", required=True, help="target account (name or address)")
    sp.add_argument("--by", help="who transfers (recorded)")
    json_flag(sp)
    queue_only_flag(sp)

    sp = add_command(sub, "interactions", cmd_interactions, "list interactions, most recent first")
    sp.add_argument("--account", help="only this account's (name or address)")
    sp.add_argument("--unread", action="store_true", help="only unread ones")
    sp.add_argument("--status", choices=("open", "closed"))
    sp.add_argument("--limit", type=int, default=None)
    json_flag(sp)

    sp = add_command(sub, "show", cmd_show, "one interaction with its messages and transfers")
    sp.add_argument("id", type=int)
    json_flag(sp)

    sp = add_command(
        sub, "pick", cmd_pick, "an agent picks an interaction from the list (marks it read)"
    )
    sp.add_argument("id", type=int)
    sp.add_argument("--agent", required=True)
    sp.add_argument("--force", action="store_true", help="take it over from another agent")

    sp = add_command(sub, "close", cmd_close, "close an interaction (new customer mail reopens it)")
    sp.add_argument("id", type=int)

    sp = add_command(
        sub, "reply", cmd_reply, "send an agent reply from the interaction's current account"
    )
    sp.add_argument("id", type=int)
    sp.add_argument("--body-file", required=True, help="plain-text body ('-' for stdin)")
    sp.add_argument("--agent", help="who replies (recorded)")
    queue_only_flag(sp)

    sp = add_command(
        sub, "report", cmd_report, "per-account counts for a period (by current account)"
    )
    sp.add_argument("--from", dest="from_", type=parse_date, required=True, metavar="DATE")
    sp.add_argument("--to", type=parse_date, required=True, metavar="DATE")
    json_flag(sp)
