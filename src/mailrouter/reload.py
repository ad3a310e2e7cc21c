"""Reload on SIGHUP: read the config file again, check it, and swap it in without a restart.

The new file is loaded and checked as at start-up — the loader's ``file:line: key``
errors, a trial render of every notice template, the listeners' certificates, and
whatever else a :class:`Reloader` checks.  If anything fails, the reload is refused and
logged, and the running settings stay.  Otherwise the accounts are mirrored into the store
(a new account gets its row) and :meth:`~mailrouter.runtime.Runtime.swap` makes the new
settings current for every stage in one step — the SMTP handler, the pipeline and the
outbox worker read them through the runtime — and then each reloader applies its part:
the log level, the certificates, the IMAP watchers.  No connection is dropped and no
queued job is touched: a session open across the reload finishes, and from its next
command on sees the new accounts.

A running process cannot change where it listens, which database it uses, where its state
lives or its log format (:data:`NEEDS_RESTART`).  A reload keeps those at their old values
and logs a warning naming each changed key.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

from mailrouter.config import ConfigError, Secret, Settings, describe, load
from mailrouter.config.settings import toml_fields
from mailrouter.ingest.smtp import Listener, tls_context
from mailrouter.ingest.watchers import WatcherSet
from mailrouter.log import event, set_level
from mailrouter.runtime import Runtime
from mailrouter.store.queries import sync_accounts

__all__ = [
    "NEEDS_RESTART",
    "Change",
    "Problem",
    "ReloadPlan",
    "ReloadRefused",
    "Reloader",
    "imap_reloader",
    "log_level_reloader",
    "plan_reload",
    "reload",
    "reload_settings",
    "settings_keys",
    "templates_reloader",
    "tls_reloader",
]

log = logging.getLogger("mailrouter.daemon")

# TOML key → the Settings field path it sets.  The sockets are bound, the database opened
# and the log handler made once, at start-up.
NEEDS_RESTART: Mapping[str, tuple[str, ...]] = {
    "state_dir": ("state_dir",),
    "database.url": ("database_url",),
    "database.auto_upgrade": ("auto_upgrade",),
    "log.format": ("log_format",),
    # The name under which this daemon's claims and IMAP leases are held.
    "daemon.instance_name": ("instance_name",),
    **{
        f"{proto}.{key}": (proto, key)
        for proto in ("smtp", "lmtp", "http")
        for key in ("enabled", "host", "port")
    },
}


# --------------------------------------------------------------------------- what changed


@dataclass(frozen=True)
class Change:
    """One key whose value differs; values as ``check-config`` shows them (secrets masked)."""

    key: str
    kind: Literal["added", "removed", "changed"]
    old: Any = None
    new: Any = None


def settings_keys(settings: Settings) -> dict[str, Any]:
    """Every setting under its dotted TOML key, valued as ``describe()`` shows it.

    Accounts are keyed by name (``accounts.sales.transfer.enabled``); a setting that is
    None or an empty table has no key.
    """
    return _keys(describe(settings), settings)


def _compared(settings: Settings) -> dict[str, Any]:
    """The same keys, valued for comparison: what ``describe()`` masks is compared too, so
    a rotated password (same file, new content) counts as a change."""
    raw: dict[str, Any] = {"database_url": settings.database_url}

    def unmask(value: Any) -> Any:
        if isinstance(value, Secret):
            return ("secret", value.get())
        if is_dataclass(value) and not isinstance(value, type):
            return {f.name: unmask(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, Mapping):
            return {k: unmask(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [unmask(v) for v in value]
        return value

    for f in fields(settings):
        if f.name != "database_url":
            raw[f.name] = unmask(getattr(settings, f.name))
    return _keys(raw, settings)


def _keys(data: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    top = {f.name: key for key, f in toml_fields(Settings).items()}
    out: dict[str, Any] = {}
    for name, value in data.items():
        key = top.get(name)
        if key is None:
            continue  # config_path: not a setting of the file
        if name == "accounts":
            for acc, obj in zip(value, settings.accounts, strict=True):
                _flatten(out, f"accounts.{obj.name}", {k: v for k, v in acc.items() if k != "name"})
        else:
            _flatten(out, key, value)
    return out


def _flatten(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(out, f"{key}.{k}", v)
    elif value is not None:
        out[key] = value


def _diff(old: Settings, new: Settings) -> list[Change]:
    shown_old, shown_new = settings_keys(old), settings_keys(new)
    raw_old, raw_new = _compared(old), _compared(new)
    accounts_old = {a.name for a in old.accounts}
    accounts_new = {a.name for a in new.accounts}
    changes = [Change(f"accounts.{n}", "added") for n in sorted(accounts_new - accounts_old)]
    changes += [Change(f"accounts.{n}", "removed") for n in sorted(accounts_old - accounts_new)]
    whole = {c.key + "." for c in changes}
    for key in sorted(raw_old.keys() | raw_new.keys()):
        if any(key.startswith(prefix) for prefix in whole):
            continue  # a whole account came or went: one line says so
        if raw_old.get(key) == raw_new.get(key):
            continue
        before, after = shown_old.get(key), shown_new.get(key)
        kind: Literal["added", "removed", "changed"] = (
            "added" if key not in raw_old else "removed" if key not in raw_new else "changed"
        )
        changes.append(Change(key, kind, before, after))
    return changes


@dataclass(frozen=True)
class ReloadPlan:
    settings: Settings  # what the daemon runs with after the reload
    changes: tuple[Change, ...]  # applied by the reload
    needs_restart: tuple[Change, ...]  # changed in the file, kept at the old value

    @property
    def accounts_changed(self) -> bool:
        return any(c.key.startswith("accounts.") for c in self.changes)


def plan_reload(old: Settings, new: Settings, needs_restart: Sequence[Change] = ()) -> ReloadPlan:
    """What reloading ``new`` over ``old`` applies, and what it keeps until a restart."""
    restart = [*needs_restart]
    effective = new
    for c in _diff(old, new):
        path = NEEDS_RESTART.get(c.key)
        if path is not None:
            restart.append(c)
            effective = _keep(effective, old, path)
    return ReloadPlan(effective, tuple(_diff(old, effective)), tuple(restart))


def _keep(new: Any, old: Any, path: tuple[str, ...]) -> Any:
    """``new`` with the field at ``path`` taken from ``old``."""
    head, *rest = path
    if rest:
        return replace(new, **{head: _keep(getattr(new, head), getattr(old, head), tuple(rest))})
    return replace(new, **{head: getattr(old, head)})


# --------------------------------------------------------------------------- refusing


@dataclass(frozen=True)
class Problem:
    """Why a reload was refused: the key, the operator's sentence, and where, if known."""

    key: str | None
    error: str
    file: str | None = None
    line: int | None = None


class ReloadRefused(Exception):
    """The new configuration cannot be applied; nothing was changed."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(p.error for p in self.problems))


# --------------------------------------------------------------------------- reloaders

Apply = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Reloader:
    """One part of the daemon that takes part in a reload.

    ``prepare(old, new)`` runs in a worker thread before anything changes: it checks
    ``new`` (raising :class:`ReloadRefused` refuses the whole reload) and returns what to
    do once ``new`` is current — an async callable run in the event loop — or None.
    The daemon keeps a list of them; a new part (agents, say) appends its own.
    """

    name: str
    prepare: Callable[[Settings, Settings], Apply | None]


def templates_reloader() -> Reloader:
    """Every notifying account's template loads and renders (read from disk at each notice)."""

    def prepare(old: Settings, new: Settings) -> None:
        from mailrouter.notify import check_templates

        problems = check_templates(new)
        if problems:
            raise ReloadRefused(
                [Problem(p.partition(": ")[0], f"notice template: {p}") for p in problems]
            )

    return Reloader("templates", prepare)


def log_level_reloader() -> Reloader:
    """``log.level``, when the file changed it (a ``-v`` on the command line survives others)."""

    def prepare(old: Settings, new: Settings) -> Apply | None:
        if old.log_level == new.log_level:
            return None

        async def apply() -> None:
            set_level(new.log_level)

        return apply

    return Reloader("log", prepare)


def tls_reloader(listeners: Sequence[Listener]) -> Reloader:
    """The listeners' certificates, read again (a renewed certificate at the same path too)."""

    def prepare(old: Settings, new: Settings) -> Apply:
        contexts: list[tuple[Listener, ssl.SSLContext | None]] = []
        for lst in listeners:
            cfg = new.lmtp if lst.lmtp else new.smtp
            try:
                contexts.append((lst, tls_context(cfg)))
            except (OSError, ssl.SSLError) as exc:
                key = f"{lst.proto}.tls_cert"
                raise ReloadRefused(
                    [Problem(key, f"{key}: cannot load {cfg.tls_cert} with {cfg.tls_key}: {exc}")]
                ) from exc

        async def apply() -> None:
            for lst, ctx in contexts:
                lst.use_tls(ctx)

        return apply

    return Reloader("tls", prepare)


def imap_reloader(watchers: WatcherSet) -> Reloader:
    """IMAP watchers started, stopped or restarted to match the new accounts."""

    def prepare(old: Settings, new: Settings) -> Apply:
        return functools.partial(watchers.sync, new, new.shutdown_timeout)

    return Reloader("imap", prepare)


# --------------------------------------------------------------------------- reloading

Loader = Callable[[Path, Mapping[str, str]], Settings]


async def reload_settings(
    rt: Runtime,
    reloaders: Sequence[Reloader],
    *,
    env: Mapping[str, str] | None = None,
    loader: Loader = load,
) -> ReloadPlan:
    """Load, check and apply the config file again; raises :class:`ReloadRefused`."""
    env = dict(os.environ if env is None else env)
    old = rt.settings
    restart: list[Change] = []
    try:
        new = await asyncio.to_thread(loader, old.config_path, env)
        if new.state_dir != old.state_dir:
            # Every relative state path (database, Maildirs, pickup) resolves under the
            # state directory: read the file again against the one we are running with.
            restart.append(Change("state_dir", "changed", str(old.state_dir), str(new.state_dir)))
            pinned = {**env, "MAILROUTER_STATE_DIR": str(old.state_dir)}
            new = await asyncio.to_thread(loader, old.config_path, pinned)
    except ConfigError as exc:
        raise ReloadRefused([Problem(exc.key or None, str(exc), exc.file, exc.line)]) from exc
    plan = plan_reload(old, new, restart)

    applies: list[tuple[str, Apply]] = []
    for r in reloaders:
        apply = await asyncio.to_thread(r.prepare, old, plan.settings)
        if apply is not None:
            applies.append((r.name, apply))

    accounts = rt.accounts
    if plan.accounts_changed:
        settings = plan.settings
        try:
            accounts = await rt.writes.submit(lambda s: sync_accounts(s, settings))
        except Exception as exc:  # the store's problem: refuse, and keep running
            raise ReloadRefused(
                [Problem("accounts", f"cannot record the accounts in the store: {exc}")]
            ) from exc

    # The one place settings change: every stage reads them through the runtime.
    rt.swap(plan.settings, accounts)
    for name, apply in applies:
        try:
            await apply()
        except Exception:  # noqa: BLE001 - the new settings are in; report the part that failed
            event(log, "reload-apply-failed", logging.ERROR, exc_info=True, part=name)
    return plan


async def reload(
    rt: Runtime,
    reloaders: Sequence[Reloader],
    *,
    env: Mapping[str, str] | None = None,
    loader: Loader = load,
) -> bool:
    """:func:`reload_settings`, logged: each change, each key that needs a restart, or why
    it was refused.  True when the new settings are in; never raises for a bad config."""
    path = str(rt.settings.config_path)
    event(log, "reloading", config=path)
    try:
        plan = await reload_settings(rt, reloaders, env=env, loader=loader)
    except ReloadRefused as exc:
        for p in exc.problems:
            event(
                log,
                "reload-refused",
                logging.ERROR,
                file=p.file or path,
                line=p.line,
                key=p.key,
                error=p.error,
            )
        return False
    except Exception:  # noqa: BLE001 - a bug must not take the running daemon down with it
        event(log, "reload-failed", logging.ERROR, exc_info=True, config=path)
        return False
    for c in plan.needs_restart:
        event(
            log,
            "reload-needs-restart",
            logging.WARNING,
            key=c.key,
            running=c.old,
            configured=c.new,
        )
    for c in plan.changes:
        event(log, "config-changed", key=c.key, change=c.kind, old=c.old, new=c.new)
    event(
        log,
        "reloaded",
        config=path,
        changed=len(plan.changes),
        needs_restart=",".join(c.key for c in plan.needs_restart) or None,
        accounts=len(plan.settings.accounts),
    )
    return True
