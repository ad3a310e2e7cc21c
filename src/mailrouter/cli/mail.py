"""Mail-in commands: ``ingest`` and ``replay`` files, ``explain`` a decision, ``held`` and
``release`` messages kept for inspection."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from mailrouter.cli._common import (
    EXIT_FAIL,
    EXIT_OK,
    CommandError,
    Subparsers,
    account,
    add_command,
    flush,
    json_flag,
    print_json,
    queue_only_flag,
    read,
    table,
)
from mailrouter.config import AccountSettings, Settings

__all__ = ["register"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _decision_dict(origin: str, d: Any, interaction: int | None) -> dict[str, Any]:
    return {
        "file": origin,
        "action": d.action,
        "rule": d.rule,
        "interaction": interaction,
        "receiving": d.receiving,
        "owner": d.owner,
        "deliver_to": d.deliver_to,
        "matched": f"<{d.matched_id}>" if d.matched_id else None,
        "reason": d.reason,
    }


def cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.ingest.replay import accounts_for, collect
    from mailrouter.pipeline import Pipeline
    from mailrouter.runtime import opened

    forced: list[AccountSettings] = []
    if args.account:
        forced = [account(settings, args.account)]
    elif args.rcpt:
        acc = settings.account_for_address(args.rcpt)
        if acc is None:
            raise CommandError(f"{args.rcpt} is not a configured account address")
        forced = [acc]
    results = []
    with opened(settings) as rt:
        pipeline = Pipeline(rt)
        for item in collect(args.files):
            accounts = forced or accounts_for(item.raw, settings)
            if not accounts:
                raise CommandError(
                    f"{item.origin}: no configured account among its recipients; "
                    "give --account NAME or --rcpt ADDRESS"
                )
            r = pipeline.accept(item.raw, accounts, source="cli", envelope_sender=args.sender)
            results.append(_decision_dict(item.origin, r.decision, r.interaction_id))
        delivered = flush(rt, args)
    if args.json:
        print_json(results)
    else:
        for row in results:
            print(
                f"{row['file']}: {row['action']} interaction={row['interaction'] or '-'} "
                f"rule={row['rule']}"
                + (f" to={row['deliver_to']}" if row["deliver_to"] else "")
                + (f" reason={row['reason']!r}" if row["reason"] else "")
            )
        if delivered:
            print(f"delivered {delivered} queued item(s)", file=sys.stderr)
    return EXIT_OK


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mailrouter.ingest.replay import Recorded, accounts_for, collect, date_order
    from mailrouter.pipeline import Pipeline, StoreUnavailable
    from mailrouter.runtime import opened

    forced = [account(settings, args.account)] if args.account else []
    try:
        items = date_order(list(collect(args.paths)))
    except FileNotFoundError as exc:
        raise CommandError(str(exc)) from None
    counts: Counter[str] = Counter()
    unroutable: list[str] = []
    failed: list[str] = []
    bar = tqdm(
        total=len(items),
        unit="msg",
        file=sys.stderr,
        disable=args.json or len(items) < 200 or not sys.stderr.isatty(),
    )
    with opened(settings) as rt, contextlib.closing(bar):
        pipeline = Pipeline(rt)
        with contextlib.ExitStack() as stack:
            # A dry run is one transaction for the whole run, rolled back at the end:
            # later messages see the interactions earlier ones would have created.
            scratch = stack.enter_context(rt.db.scratch()) if args.dry_run else None
            batch: list[tuple[Recorded, list[AccountSettings]]] = []

            def commit() -> None:
                # One transaction per batch (see Pipeline.accept_many).  A batch the store
                # refuses was rolled back whole: its messages are tried one by one, so a
                # failure is reported for the message it concerns.
                try:
                    done = pipeline.accept_many(
                        [(item.raw, accounts) for item, accounts in batch], source="replay"
                    )
                    counts.update(r.decision.action for r in done)
                except StoreUnavailable:
                    for item, accounts in batch:
                        try:
                            r = pipeline.accept(item.raw, accounts, source="replay")
                            counts[r.decision.action] += 1
                        except StoreUnavailable as exc:
                            failed.append(f"{item.origin}: {exc}")
                bar.update(len(batch))
                batch.clear()

            for item in items:
                accounts = forced or accounts_for(item.raw, settings)
                if not accounts:
                    unroutable.append(item.origin)
                    bar.update()
                elif scratch is not None:
                    r = pipeline.accept_in(scratch, item.raw, accounts, source="replay")
                    counts[r.decision.action] += 1
                    bar.update()
                else:
                    batch.append((item, accounts))
                    if len(batch) >= args.batch:
                        commit()
            if batch:
                commit()
        delivered = 0 if args.dry_run else flush(rt, args)
    summary = {
        "messages": len(items),
        "dry_run": args.dry_run,
        "actions": dict(counts),
        "unroutable": len(unroutable),
        "store_errors": len(failed),
        "delivered": delivered,
    }
    if args.json:
        print_json({**summary, "unroutable_files": unroutable, "failed_files": failed})
    else:
        acts = " ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"
        dry = " (dry run: nothing stored)" if args.dry_run else ""
        print(
            f"replayed {len(items)} message(s){dry}: "
            f"{acts}; unroutable={len(unroutable)} store_errors={len(failed)} delivered={delivered}"
        )
        for origin in unroutable[:20]:
            print(f"  unroutable (no configured recipient; use --account): {origin}")
        if len(unroutable) > 20:
            print(f"  … and {len(unroutable) - 20} more")
    return EXIT_FAIL if failed else EXIT_OK


def cmd_explain(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.ingest.replay import accounts_for
    from mailrouter.pipeline import Pipeline
    from mailrouter.routing import describe_action, describe_rule
    from mailrouter.runtime import opened

    raw = Path(args.file).read_bytes() if args.file != "-" else sys.stdin.buffer.read()
    accounts = [account(settings, args.account)] if args.account else accounts_for(raw, settings)
    if not accounts:
        raise CommandError("no configured account among the recipients; give --account NAME")
    with opened(settings) as rt:
        msg, d = Pipeline(rt).explain(raw, accounts)
    out = {
        **_decision_dict(args.file, d, d.interaction_id),
        "message_id": f"<{msg.message_id}>",
        "synthetic_id": msg.synthetic_id,
        "parents": [f"<{i}>" for i in msg.parents],
        "automatic": msg.automatic,
        "why": describe_rule(d.rule),
        "action_means": describe_action(d.action),
        "step": d.step,
    }
    if args.json:
        print_json(out)
    else:
        for key in (
            "message_id",
            "parents",
            "automatic",
            "receiving",
            "rule",
            "why",
            "matched",
            "interaction",
            "owner",
            "action",
            "action_means",
            "step",
            "deliver_to",
            "reason",
        ):
            if out.get(key) not in (None, []):
                value = " ".join(out[key]) if isinstance(out[key], list) else out[key]
                print(f"{key:>13}: {value}")
    return EXIT_OK


def cmd_held(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.views import held_messages

    rows = read(settings, lambda s, rt: held_messages(s))
    if args.json:
        print_json(rows)
    else:
        table(rows, ["id", "received_at", "account", "message_id", "hold_reason"])
    return EXIT_OK


def cmd_release(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.pipeline import Pipeline, StoreUnavailable
    from mailrouter.runtime import opened

    with opened(settings) as rt:
        try:
            r = Pipeline(rt).release(args.id)
        except StoreUnavailable as exc:
            raise CommandError(f"release failed, message still held: {exc}") from None
        flush(rt, args)
    d = r.decision
    print(
        f"message {args.id}: {d.action} interaction={r.interaction_id or '-'} rule={d.rule}"
        + (f" reason={d.reason!r}" if d.reason else "")
    )
    return EXIT_OK if d.action != "hold" else EXIT_FAIL


def register(sub: Subparsers) -> None:
    sp = add_command(
        sub, "ingest", cmd_ingest, "store and route message files now (as if they had arrived)"
    )
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--account", help="receiving account (name or address)")
    g.add_argument("--rcpt", help="receiving account address")
    sp.add_argument("--sender", help="envelope sender ('' for a bounce)")
    sp.add_argument("files", nargs="+", help="message files, directories, Maildirs or mbox files")
    json_flag(sp)
    queue_only_flag(sp)

    sp = add_command(
        sub, "replay", cmd_replay, "feed recorded mail through the pipeline in Date order"
    )
    sp.add_argument("paths", nargs="+", help=".eml files, directories, Maildirs, mbox files")
    sp.add_argument("--account", help="force the receiving account (default: from recipients)")
    sp.add_argument("--dry-run", action="store_true", help="decide everything, store nothing")
    sp.add_argument(
        "--batch",
        type=_positive,
        default=200,
        metavar="N",
        help="messages per transaction (default 200; 1 commits each message on its own)",
    )
    json_flag(sp)
    queue_only_flag(sp)

    sp = add_command(
        sub, "explain", cmd_explain, "show which rule, interaction and mailbox a message would get"
    )
    sp.add_argument("file", help="message file ('-' for stdin)")
    sp.add_argument("--account", help="receiving account (default: from recipients)")
    json_flag(sp)

    json_flag(add_command(sub, "held", cmd_held, "messages held for inspection, with the reason"))
    sp = add_command(
        sub, "release", cmd_release, "route a held message again, once its cause is fixed"
    )
    sp.add_argument("id", type=int, help="message id from `mailrouter held`")
    queue_only_flag(sp)
