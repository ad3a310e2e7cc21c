"""``mailrouter status``: how each stage is doing, read from the store and the settings.

One read function, :func:`status`, returns a JSON-ready dict; the CLI prints it and an
HTTP front end serves it as ``GET /healthz?verbose=1``.  What it can know from the store:
the queue (depth and oldest age by queue), the held messages, each IMAP watcher's last
complete sync, the schema version.  What only a running daemon knows (listeners bound,
watcher states) it passes in as ``live`` and finds under ``"live"``.  No secret ever
appears: the database URL is shown without its password.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from alembic.runtime.migration import MigrationContext
from sqlalchemy import select
from sqlalchemy.engine import make_url

from mailrouter import __version__
from mailrouter.config import ListenerSettings
from mailrouter.deliver.mailbox import relay_of_account, relay_of_outbound
from mailrouter.deliver.queue import depth
from mailrouter.metrics import QUEUES
from mailrouter.runtime import Runtime
from mailrouter.store.migrate import head_revision
from mailrouter.store.models import ImapState, utcnow

__all__ = ["status"]

# A deferred job this old, or a watcher this long without a complete sync, is a warning.
DEFERRED_WARN_SECONDS = 3600.0


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _age(now: datetime, since: datetime | None) -> float | None:
    return None if since is None else round(max(0.0, (now - since).total_seconds()), 3)


def _listener(name: str, lst: ListenerSettings) -> dict[str, Any]:
    return {
        "name": name,
        "enabled": lst.enabled,
        "address": f"{lst.host}:{lst.port}",
        "tls": lst.tls_cert is not None,
        "auth": lst.require_auth,
        "max_message_size": lst.max_message_size,
        "max_connections": lst.max_connections,
    }


def status(rt: Runtime, live: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The status report: ``ok`` overall, then per stage, queue, account and listener."""
    settings = rt.settings
    with rt.db.read() as s:
        now = utcnow()
        queues = depth(s)
        marks = {(m.account_id, m.mailbox): m for m in s.scalars(select(ImapState))}
        schema = MigrationContext.configure(s.connection()).get_current_revision()
    head = head_revision()

    queue = {
        name: {"count": queues.get(name, (0, None))[0], "oldest_age_seconds": 0.0}
        for name in QUEUES
    }
    for name, (_count, since) in queues.items():
        queue[name]["oldest_age_seconds"] = _age(now, since) or 0.0

    accounts = []
    stages: dict[str, dict[str, Any]] = {}
    for acc in settings.accounts:
        imap = None
        if acc.imap is not None:
            mark = marks.get((rt.accounts.id(acc.name), acc.imap.mailbox))
            synced = mark.last_sync_at if mark is not None else None
            age = _age(now, synced)
            imap = {
                "host": f"{acc.imap.host}:{acc.imap.port}",
                "mailbox": acc.imap.mailbox,
                "uidvalidity": mark.uidvalidity if mark is not None else None,
                "last_uid": mark.last_uid if mark is not None else None,
                "last_sync_at": _iso(synced),
                "last_sync_age_seconds": age,
            }
            # A watcher catches up after every IDLE round (at most idle_timeout apart) or
            # poll: twice the longer of those without a sync means it is not getting through.
            stale_after = 2 * max(acc.imap.idle_timeout, acc.imap.poll_interval)
            stages[f"imap:{acc.name}"] = (
                {"state": "unknown", "note": "never synced"}
                if age is None
                else {"state": "warning", "note": f"no complete sync for {age:.0f}s"}
                if age > stale_after
                else {"state": "ok"}
            )
        accounts.append(
            {
                "name": acc.name,
                "address": acc.address,
                "delivery": relay_of_account(acc),
                "transfer": acc.transfer.enabled,
                "notify": acc.transfer.notify,
                "imap": imap,
            }
        )

    notes = []
    deferred = queue["deferred"]
    if deferred["count"]:
        notes.append(f"{deferred['count']} deferred, oldest {deferred['oldest_age_seconds']:.0f}s")
    if queue["failed"]["count"]:
        notes.append(f"{queue['failed']['count']} failed for good (mailrouter queue)")
    if queue["held"]["count"]:
        notes.append(f"{queue['held']['count']} held by an operator")
    stages["deliver"] = {
        "state": "warning"
        if deferred["oldest_age_seconds"] > DEFERRED_WARN_SECONDS or queue["failed"]["count"]
        else "ok",
        "relay": relay_of_outbound(settings.outbound),
        **({"note": "; ".join(notes)} if notes else {}),
    }
    held = queue["held-messages"]["count"]
    stages["ingest"] = (
        {"state": "warning", "note": f"{held} message(s) held for inspection (mailrouter queue)"}
        if held
        else {"state": "ok"}
    )
    stages["store"] = (
        {"state": "ok"}
        if schema == head
        else {"state": "error", "note": f"schema {schema or 'empty'}, needs {head}"}
    )
    out: dict[str, Any] = {
        # Warnings (a deferred queue, held messages) need a look; only errors are "not ok".
        "ok": all(st["state"] != "error" for st in stages.values()),
        "version": __version__,
        "checked_at": now.isoformat(),
        "schema": {"current": schema, "head": head, "up_to_date": schema == head},
        "database": make_url(settings.database_url).render_as_string(hide_password=True),
        "stages": stages,
        "queue": queue,
        "held_messages": held,
        "listeners": [_listener("smtp", settings.smtp), _listener("lmtp", settings.lmtp)],
        "outbound": relay_of_outbound(settings.outbound),
        "accounts": accounts,
    }
    if live is not None:
        out["live"] = dict(live)
    return out
