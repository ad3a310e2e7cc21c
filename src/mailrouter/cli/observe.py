"""Observing commands: ``trace`` one message through its whole life, and ``status``.

Both are reads (:mod:`mailrouter.trace`, :mod:`mailrouter.status`) that change nothing.
"""

from __future__ import annotations

import argparse
from typing import Any

from mailrouter.cli._common import (
    EXIT_FAIL,
    EXIT_OK,
    Subparsers,
    add_command,
    json_flag,
    print_json,
    read,
)
from mailrouter.config import Settings

__all__ = ["register"]


def cmd_trace(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.trace import trace

    out = read(settings, lambda s, rt: trace(s, args.message_id))
    if args.json:
        print_json(out)
        return EXIT_OK
    for n, m in enumerate(out["messages"]):
        if n:
            print()
        _print_copy(out["message_id"], m, len(out["messages"]) > 1)
    return EXIT_OK


def _print_copy(message_id: str, m: dict[str, Any], several: bool) -> None:
    msg, d, i = m["message"], m["decision"], m["interaction"]
    title = f"{message_id}" + (f" (stored copy {msg['id']})" if several else "")
    print(title)
    print(f"  subject: {msg['subject'] or ''}")
    if i is not None:
        print(
            f"  interaction {i['id']}: owned by {i['account']} (from {i['origin_account']}), "
            f"{i['status']}{', unread' if i['unread'] else ''}"
        )
    if d["why"]:
        print(f"  rule {d['rule']}: {d['why']}")
    for e in m["timeline"]:
        when = (e["at"] or "now")[:19].replace("T", " ")
        print(f"  {when:<19}  {e['event']:<9} {e['text']}")


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.status import status

    out = read(settings, lambda s, rt: status(rt))
    if args.json:
        print_json(out)
        return EXIT_OK if out["ok"] else EXIT_FAIL
    print(
        f"mailrouter {out['version']}: {'ok' if out['ok'] else 'NOT OK'}; schema "
        f"{out['schema']['current'] or 'empty'}"
        + ("" if out["schema"]["up_to_date"] else f" (needs {out['schema']['head']})")
        + f"; database {out['database']}"
    )
    print("\nstages:")
    for name, st in out["stages"].items():
        print(f"  {name:<16} {st['state']:<8} {st.get('note', '')}".rstrip())
    print("\nqueue:")
    for name, q in out["queue"].items():
        age = f" oldest {q['oldest_age_seconds']:.0f}s" if q["count"] else ""
        print(f"  {name:<16} {q['count']:>6}{age}")
    print("\nlisteners:")
    for lst in out["listeners"]:
        state = "on " if lst["enabled"] else "off"
        extras = " ".join(k for k in ("tls", "auth") if lst[k])
        print(f"  {lst['name']:<6} {state} {lst['address']} {extras}".rstrip())
    print(f"  outbound {out['outbound']}")
    print("\naccounts:")
    for acc in out["accounts"]:
        imap = acc["imap"]
        watch = (
            f"imap {imap['host']} {imap['mailbox']}, last sync {imap['last_sync_at'] or 'never'}"
            if imap
            else "no imap watch"
        )
        print(f"  {acc['name']:<12} {acc['address']:<28} delivery {acc['delivery']}; {watch}")
    return EXIT_OK if out["ok"] else EXIT_FAIL


def register(sub: Subparsers) -> None:
    sp = add_command(
        sub,
        "trace",
        cmd_trace,
        "the whole life of one message: arrival, decision, deliveries, notices, transfers",
    )
    sp.add_argument("message_id", metavar="MESSAGE-ID", help="with or without <>")
    json_flag(sp)
    json_flag(
        add_command(
            sub, "status", cmd_status, "stage health, queue, IMAP syncs, schema and version"
        )
    )
