"""The ``mailrouter`` command: run the daemon, and inspect or drive the store from a shell.

Every listing takes ``--json``; accounts are named by name or address everywhere.
Exit status: 0 done, 1 refused or failed (nothing changed), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mailrouter import __version__
from mailrouter.config import AccountSettings, ConfigError, Settings, describe, load
from mailrouter.log import setup_logging

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from mailrouter.runtime import Runtime

__all__ = ["main"]
T = TypeVar("T")

DEFAULT_CONFIG = "/etc/mailrouter/mailrouter.toml"
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CommandError(Exception):
    """A refusal or failure to report on stderr with exit status 1."""


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str, ensure_ascii=False)
    sys.stdout.write("\n")


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    widths = [min(w, 60) for w in widths]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v[:w].ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _date(value: str) -> datetime:
    """``YYYY-MM-DD`` (midnight UTC) or an ISO 8601 timestamp."""
    try:
        d = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a date (YYYY-MM-DD or ISO 8601): {value!r}"
        ) from None
    return d.replace(tzinfo=UTC) if d.tzinfo is None else d


def _pipeline(settings: Settings) -> Runtime:
    from mailrouter.runtime import Runtime

    return Runtime.open(settings)


def _read(settings: Settings, query: Callable[[Session, Runtime], T]) -> T:
    """Open the store, run ``query`` in one read transaction, close the store."""
    p = _pipeline(settings)
    try:
        with p.db.read() as s:
            return query(s, p)
    finally:
        p.close()


def _account(settings: Settings, name: str) -> AccountSettings:
    try:
        return settings.account(name)
    except KeyError as exc:
        raise CommandError(str(exc.args[0])) from None


def _flush(p: Runtime, args: argparse.Namespace) -> int:
    """Deliver queued work now (the CLI's stand-in for the daemon's outbox worker)."""
    if getattr(args, "queue_only", False):
        return 0
    from mailrouter.deliver.outbox import OutboxWorker

    done: int = asyncio.run(OutboxWorker(p).run_once())
    return done


# ---------------------------------------------------------------------------- commands


def cmd_check_config(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.notify import check_templates

    problems = check_templates(settings)
    if args.json:
        _print_json({"ok": not problems, "problems": problems, "settings": describe(settings)})
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

    forced: list[AccountSettings] = []
    if args.account:
        forced = [_account(settings, args.account)]
    elif args.rcpt:
        acc = settings.account_for_address(args.rcpt)
        if acc is None:
            raise CommandError(f"{args.rcpt} is not a configured account address")
        forced = [acc]
    p = _pipeline(settings)
    results = []
    try:
        for item in collect(args.files):
            accounts = forced or accounts_for(item.raw, settings)
            if not accounts:
                raise CommandError(
                    f"{item.origin}: no configured account among its recipients; "
                    "give --account NAME or --rcpt ADDRESS"
                )
            r = Pipeline(p).accept(item.raw, accounts, source="cli", envelope_sender=args.sender)
            results.append(_decision_dict(item.origin, r.decision, r.interaction_id))
        delivered = _flush(p, args)
    finally:
        p.close()
    if args.json:
        _print_json(results)
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

    from mailrouter.ingest.replay import accounts_for, collect, date_order
    from mailrouter.pipeline import Pipeline, StoreUnavailable

    forced = [_account(settings, args.account)] if args.account else []
    try:
        items = date_order(list(collect(args.paths)))
    except FileNotFoundError as exc:
        raise CommandError(str(exc)) from None
    p = _pipeline(settings)
    pipeline = Pipeline(p)
    counts: Counter[str] = Counter()
    unroutable: list[str] = []
    failed: list[str] = []
    bar = tqdm(
        total=len(items),
        unit="msg",
        file=sys.stderr,
        disable=args.json or len(items) < 200 or not sys.stderr.isatty(),
    )
    try:
        with contextlib.ExitStack() as stack:
            # A dry run is one transaction for the whole run, rolled back at the end:
            # later messages see the interactions earlier ones would have created.
            scratch = stack.enter_context(p.db.scratch()) if args.dry_run else None
            for item in items:
                accounts = forced or accounts_for(item.raw, settings)
                if not accounts:
                    unroutable.append(item.origin)
                elif scratch is not None:
                    r = pipeline.accept_in(scratch, item.raw, accounts, source="replay")
                    counts[r.decision.action] += 1
                else:
                    try:
                        r = pipeline.accept(item.raw, accounts, source="replay")
                        counts[r.decision.action] += 1
                    except StoreUnavailable as exc:
                        failed.append(f"{item.origin}: {exc}")
                bar.update()
        delivered = 0 if args.dry_run else _flush(p, args)
    finally:
        bar.close()
        p.close()
    summary = {
        "messages": len(items),
        "dry_run": args.dry_run,
        "actions": dict(counts),
        "unroutable": len(unroutable),
        "store_errors": len(failed),
        "delivered": delivered,
    }
    if args.json:
        _print_json({**summary, "unroutable_files": unroutable, "failed_files": failed})
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
    from mailrouter.routing import ACTIONS
    from mailrouter.threads import RULES

    raw = Path(args.file).read_bytes() if args.file != "-" else sys.stdin.buffer.read()
    accounts = [_account(settings, args.account)] if args.account else accounts_for(raw, settings)
    if not accounts:
        raise CommandError("no configured account among the recipients; give --account NAME")
    from mailrouter.pipeline import Pipeline

    p = _pipeline(settings)
    try:
        msg, d = Pipeline(p).explain(raw, accounts)
    finally:
        p.close()
    descriptions = {r.name: r.description for r in RULES}
    descriptions.update(
        {
            "new-interaction": "nothing known matches: a new conversation",
            "malformed": "the message cannot be routed",
            "duplicate": "already stored",
        }
    )
    out = {
        **_decision_dict(args.file, d, d.interaction_id),
        "message_id": f"<{msg.message_id}>",
        "synthetic_id": msg.synthetic_id,
        "parents": [f"<{i}>" for i in msg.parents],
        "automatic": msg.automatic,
        "why": descriptions.get(d.rule, d.rule),
        "action_means": ACTIONS.get(d.action),
    }
    if args.json:
        _print_json(out)
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
            "deliver_to",
            "reason",
        ):
            if out.get(key) not in (None, []):
                value = " ".join(out[key]) if isinstance(out[key], list) else out[key]
                print(f"{key:>13}: {value}")
    return EXIT_OK


def cmd_transfer(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.transfer import TransferRefused, transfer

    p = _pipeline(settings)
    try:
        try:
            r = transfer(p, args.id, args.to, actor=args.by)
        except TransferRefused as exc:
            raise CommandError(f"transfer refused: {exc}") from None
        _flush(p, args)
    finally:
        p.close()
    if args.json:
        _print_json(r.__dict__)
    else:
        note = f"notice {r.notification}" + (f" ({r.reason})" if r.reason else "")
        print(f"interaction {r.interaction_id}: {r.from_account} -> {r.to_account}; {note}")
    return EXIT_OK


def cmd_interactions(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.views import list_interactions

    if args.account:
        _account(settings, args.account)
    rows = _read(
        settings,
        lambda s, p: list_interactions(
            s, p, account=args.account, unread=args.unread, status=args.status, limit=args.limit
        ),
    )
    if args.json:
        _print_json(rows)
    else:
        for r in rows:
            r["new"] = "*" if r["unread"] else ""
        _table(
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

    detail = _read(settings, lambda s, p: interaction_detail(s, args.id))
    if detail is None:
        raise CommandError(f"no interaction {args.id}")
    if args.json:
        _print_json(detail)
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


def cmd_pick(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.interactions import pick

    p = _pipeline(settings)
    try:
        pick(p, args.id, args.agent, force=args.force)
    finally:
        p.close()
    print(f"interaction {args.id} picked by {args.agent}")
    return EXIT_OK


def cmd_close(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.interactions import close

    p = _pipeline(settings)
    try:
        close(p, args.id)
    finally:
        p.close()
    print(f"interaction {args.id} closed")
    return EXIT_OK


def cmd_reply(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.reply import ReplyRefused, reply

    body = (
        Path(args.body_file).read_text(encoding="utf-8")
        if args.body_file != "-"
        else sys.stdin.read()
    )
    p = _pipeline(settings)
    try:
        try:
            r = reply(p, args.id, body, agent=args.agent)
        except ReplyRefused as exc:
            raise CommandError(f"reply refused: {exc}") from None
        _flush(p, args)
    finally:
        p.close()
    print(
        f"interaction {args.id}: reply <{r.message_id}> from {r.account} "
        f"to {', '.join(r.to)} queued"
    )
    return EXIT_OK


def cmd_report(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.report import report

    if args.to <= args.from_:
        raise CommandError("--to must be after --from")
    rows = _read(settings, lambda s, p: report(s, p, args.from_, args.to))
    if args.json:
        _print_json(
            {
                "from": args.from_.isoformat(),
                "to": args.to.isoformat(),
                "attributed_to": "current account",
                "accounts": rows,
            }
        )
    else:
        print(
            f"{args.from_.isoformat()} .. {args.to.isoformat()} (interactions and messages "
            "counted under their current account)"
        )
        _table(
            rows,
            ["account", "interactions", "inbound", "outbound", "transfers_in", "transfers_out"],
        )
    return EXIT_OK


def cmd_queue(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.deliver.queue import requeue
    from mailrouter.views import queue_rows

    p = _pipeline(settings)
    try:
        if args.queue_command == "flush":
            n = _flush(p, args)
            print(f"attempted {n} item(s)")
            return EXIT_OK
        if args.queue_command == "retry":
            requeue(p, args.id)
            n = _flush(p, args)
            print(f"item {args.id} requeued; attempted {n} item(s)")
            return EXIT_OK
        with p.db.read() as s:
            rows = queue_rows(s, all_rows=args.all)
    finally:
        p.close()
    if args.json:
        _print_json(rows)
    else:
        _table(
            rows,
            [
                "id",
                "kind",
                "account",
                "interaction",
                "status",
                "attempts",
                "to",
                "next_attempt_at",
                "last_error",
            ],
        )
    return EXIT_OK


def cmd_held(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.views import held_messages

    rows = _read(settings, lambda s, p: held_messages(s))
    if args.json:
        _print_json(rows)
    else:
        _table(rows, ["id", "received_at", "account", "message_id", "hold_reason"])
    return EXIT_OK


def cmd_release(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter.pipeline import Pipeline, StoreUnavailable

    p = _pipeline(settings)
    try:
        try:
            r = Pipeline(p).release(args.id)
        except StoreUnavailable as exc:
            raise CommandError(f"release failed, message still held: {exc}") from None
        _flush(p, args)
    finally:
        p.close()
    d = r.decision
    print(
        f"message {args.id}: {d.action} interaction={r.interaction_id or '-'} rule={d.rule}"
        + (f" reason={d.reason!r}" if d.reason else "")
    )
    return EXIT_OK if d.action != "hold" else EXIT_FAIL


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


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mailrouter", description=__doc__.split("\n")[0])
    ap.add_argument(
        "-c", "--config", help=f"config file (default: $MAILROUTER_CONFIG or {DEFAULT_CONFIG})"
    )
    ap.add_argument(
        "--log-format", choices=("kv", "json"), help="routing log format (default: config)"
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("--version", action="version", version=f"mailrouter {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    def json_flag(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    def queue_only(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--queue-only",
            action="store_true",
            help="only queue deliveries (a running daemon sends them)",
        )

    cmd("run", cmd_run, "run the daemon in the foreground")
    json_flag(
        cmd(
            "check-config", cmd_check_config, "validate the config and print the effective settings"
        )
    )
    db = cmd("db", cmd_db, "database schema")
    db.add_argument("db_command", choices=("upgrade", "current"))

    sp = cmd("ingest", cmd_ingest, "store and route message files now (as if they had arrived)")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--account", help="receiving account (name or address)")
    g.add_argument("--rcpt", help="receiving account address")
    sp.add_argument("--sender", help="envelope sender ('' for a bounce)")
    sp.add_argument("files", nargs="+", help="message files, directories, Maildirs or mbox files")
    json_flag(sp)
    queue_only(sp)

    sp = cmd("replay", cmd_replay, "feed recorded mail through the pipeline in Date order")
    sp.add_argument("paths", nargs="+", help=".eml files, directories, Maildirs, mbox files")
    sp.add_argument("--account", help="force the receiving account (default: from recipients)")
    sp.add_argument("--dry-run", action="store_true", help="decide everything, store nothing")
    json_flag(sp)
    queue_only(sp)

    sp = cmd("explain", cmd_explain, "show which rule, interaction and mailbox a message would get")
    sp.add_argument("file", help="message file ('-' for stdin)")
    sp.add_argument("--account", help="receiving account (default: from recipients)")
    json_flag(sp)

    sp = cmd("transfer", cmd_transfer, "transfer an interaction to another account")
    sp.add_argument("id", type=int)
    sp.add_argument("--to", required=True, help="target account (name or address)")
    sp.add_argument("--by", help="who transfers (recorded)")
    json_flag(sp)
    queue_only(sp)

    sp = cmd("interactions", cmd_interactions, "list interactions, most recent first")
    sp.add_argument("--account", help="only this account's (name or address)")
    sp.add_argument("--unread", action="store_true", help="only unread ones")
    sp.add_argument("--status", choices=("open", "closed"))
    sp.add_argument("--limit", type=int, default=None)
    json_flag(sp)

    sp = cmd("show", cmd_show, "one interaction with its messages and transfers")
    sp.add_argument("id", type=int)
    json_flag(sp)

    sp = cmd("pick", cmd_pick, "an agent picks an interaction from the list (marks it read)")
    sp.add_argument("id", type=int)
    sp.add_argument("--agent", required=True)
    sp.add_argument("--force", action="store_true", help="take it over from another agent")

    sp = cmd("close", cmd_close, "close an interaction (new customer mail reopens it)")
    sp.add_argument("id", type=int)

    sp = cmd("reply", cmd_reply, "send an agent reply from the interaction's current account")
    sp.add_argument("id", type=int)
    sp.add_argument("--body-file", required=True, help="plain-text body ('-' for stdin)")
    sp.add_argument("--agent", help="who replies (recorded)")
    queue_only(sp)

    sp = cmd("report", cmd_report, "per-account counts for a period (by current account)")
    sp.add_argument("--from", dest="from_", type=_date, required=True, metavar="DATE")
    sp.add_argument("--to", type=_date, required=True, metavar="DATE")
    json_flag(sp)

    sp = cmd("queue", cmd_queue, "outbox: list pending/failed items, flush, retry a failed one")
    qs = sp.add_subparsers(dest="queue_command", metavar="ACTION")
    qs.add_parser("flush", help="attempt everything due now")
    rt = qs.add_parser("retry", help="requeue a failed item")
    rt.add_argument("id", type=int)
    sp.add_argument("--all", action="store_true", help="include sent items")
    json_flag(sp)

    json_flag(cmd("held", cmd_held, "messages held for inspection, with the reason"))
    sp = cmd("release", cmd_release, "route a held message again, once its cause is fixed")
    sp.add_argument("id", type=int, help="message id from `mailrouter held`")
    queue_only(sp)
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
    from mailrouter.errors import Refused
    from mailrouter.store.db import SchemaError

    try:
        return int(args.func(settings, args))
    except (CommandError, Refused) as exc:
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
