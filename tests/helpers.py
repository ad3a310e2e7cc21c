"""Shared test helpers: settings in a temporary state dir, recorded scenarios, mailbox reads.

Tests build their own :class:`Settings` (never ``./var``): three accounts, ``sales``
(transfer enabled, notice on with ``config/templates/transfer_notice``), ``support``
(transfer enabled, notify left at its default, off) and ``billing`` (no ``[transfer]``
table at all, so every default applies).  Each keyword of :func:`make_settings` replaces
one account's ``[transfer]`` table.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any
from unittest import mock

from sqlalchemy import func, select

from mailrouter.cli import main
from mailrouter.config import Settings, load
from mailrouter.deliver.outbox import OutboxWorker
from mailrouter.ingest.replay import accounts_for
from mailrouter.log import LogHandler
from mailrouter.pipeline import Accepted, Pipeline
from mailrouter.runtime import Runtime
from mailrouter.store.models import Message, Outbox, Transfer
from mailrouter.views import interaction_detail, list_interactions

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "config" / "templates"
SCENARIOS = ROOT / "fixtures" / "scenarios"
# The token ``06-customer-replies-to-notice.eml`` carries where the notice's Message-ID goes:
# notices get a fresh random id, so the recorded reply cannot know it in advance.
NOTICE_PLACEHOLDER = "NOTICE-MESSAGE-ID@placeholder.invalid"

ADDRESSES = {
    "sales": "sales@example.test",
    "support": "support@example.test",
    "billing": "billing@example.test",
}
DISPLAY_NAMES = {"sales": "Example Sales", "support": "Example Support", "billing": "Billing"}
DEFAULT_TRANSFER: dict[str, dict[str, Any] | None] = {
    "sales": {"enabled": True, "notify": True, "template": "transfer_notice"},
    "support": {"enabled": True},
    "billing": None,
}
# The store every settings file written here names.  The ``backend`` fixture
# (tests/servers.py) points it at PostgreSQL for a test that runs on both stores.
DATABASE_URL = "sqlite:///mailrouter.db"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_text(
    tmp_path: Path,
    *,
    template_dir: Path = TEMPLATES,
    **transfer: Mapping[str, Any] | None,
) -> str:
    """The TOML :func:`make_settings` writes (``transfer``: account name → [transfer] table)."""
    unknown = set(transfer) - set(ADDRESSES)
    if unknown:
        raise TypeError(f"unknown account(s) {sorted(unknown)}; known: {sorted(ADDRESSES)}")
    tables = {**DEFAULT_TRANSFER, **transfer}
    lines = [
        f"state_dir = {_toml_value(tmp_path / 'state')}",
        'hostname = "mailrouter.example.test"',
        "",
        "[database]",
        f"url = {_toml_value(DATABASE_URL)}",
        "",
        "[templates]",
        f"directory = {_toml_value(template_dir)}",
        "",
        "[smtp]",
        "enabled = false",
        "",
        "[outbound]",
        'type = "pickup"',
        'path = "pickup"',
    ]
    for name, address in ADDRESSES.items():
        lines += [
            "",
            f"[accounts.{name}]",
            f"address = {_toml_value(address)}",
            f"display_name = {_toml_value(DISPLAY_NAMES[name])}",
        ]
        table = tables[name]
        if table is not None:
            lines.append(f"[accounts.{name}.transfer]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def make_settings(
    tmp_path: Path,
    *,
    template_dir: Path = TEMPLATES,
    **transfer: Mapping[str, Any] | None,
) -> Settings:
    """Write ``tmp_path/mailrouter.toml`` and load it (state under ``tmp_path/state``).

    ``make_settings(tmp_path, support={"enabled": True, "notify": True, "template": "x"})``
    replaces support's ``[transfer]`` table; ``billing=None`` leaves the table out.
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "mailrouter.toml"
    path.write_text(config_text(tmp_path, template_dir=template_dir, **transfer), "utf-8")
    return load(path, env={})


@contextmanager
def pipeline(settings: Settings) -> Iterator[Runtime]:
    """An open runtime on the settings' store, closed (engine disposed) afterwards."""
    p = Runtime.open(settings)
    try:
        yield p
    finally:
        p.close()


# --------------------------------------------------------------------------- scenarios


def scenario(name: str, file: str, **substitutions: str) -> bytes:
    """The raw bytes of ``fixtures/scenarios/<name>/<file>``, with tokens replaced."""
    raw = (SCENARIOS / name / file).read_bytes()
    for old, new in substitutions.items():
        raw = raw.replace(old.encode(), new.encode())
    return raw


def accept(p: Runtime, raw: bytes, *accounts: str, source: str = "test") -> Accepted:
    """Accept ``raw`` for the named accounts (default: the configured ones among its To/Cc)."""
    chosen = (
        [p.settings.account(a) for a in accounts] if accounts else accounts_for(raw, p.settings)
    )
    return Pipeline(p).accept(raw, chosen, source=source)


def flush(p: Runtime) -> int:
    """Run the outbox worker once (deliveries, notices); returns the jobs attempted."""
    return asyncio.run(OutboxWorker(p).run_once())


# --------------------------------------------------------------------------- mailboxes


def maildir_messages(settings: Settings, account: str) -> list[bytes]:
    """Every message file in the account's Maildir (new/ and cur/), in delivery order."""
    path = settings.account(account).delivery.path
    assert path is not None
    files = [f for sub in ("new", "cur") if (path / sub).is_dir() for f in (path / sub).iterdir()]
    return [f.read_bytes() for f in sorted(files, key=lambda f: f.name)]


def pickup_messages(settings: Settings) -> list[bytes]:
    """Every outbound message written to the pickup directory, oldest outbox row first."""
    path = settings.outbound.path
    assert path is not None
    if not path.is_dir():
        return []
    files = sorted(path.glob("*.eml"), key=lambda f: int(f.name.split("x", 1)[0]))
    return [f.read_bytes() for f in files]


def raw_headers(raw: bytes) -> dict[str, list[str]]:
    """Header fields as written (unfolded, not decoded), by lower-case name, in order."""
    head = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("ascii", "surrogateescape")
    out: dict[str, list[str]] = {}
    name = ""
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and name:
            out[name][-1] += line
            continue
        name, _, value = line.partition(":")
        name = name.strip().lower()
        out.setdefault(name, []).append(value.strip())
    return out


def header(raw: bytes, name: str) -> str:
    """The single raw value of header ``name`` (asserts it occurs exactly once)."""
    values = raw_headers(raw).get(name.lower(), [])
    assert len(values) == 1, f"{name}: expected once, found {values!r}"
    return values[0]


def plain_body(raw: bytes) -> str:
    """The decoded text/plain part of a message, with LF line endings."""
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    part = msg.get_body(("plain",))  # type: ignore[attr-defined]
    assert part is not None, "no text/plain part"
    return str(part.get_content()).replace("\r\n", "\n")


# --------------------------------------------------------------------------- store reads


def detail(p: Runtime, interaction_id: int) -> dict[str, Any]:
    """``mailrouter show --json`` for one interaction, through the same view code."""
    with p.db.read() as s:
        out = interaction_detail(s, interaction_id)
    assert out is not None, f"no interaction {interaction_id}"
    return out


def interactions(p: Runtime, **filters: Any) -> list[dict[str, Any]]:
    """``mailrouter interactions --json`` rows, through the same view code."""
    with p.db.read() as s:
        return list_interactions(s, p, **filters)


def counts(p: Runtime) -> dict[str, int]:
    """Row counts of the tables a refused operation must leave alone."""
    with p.db.read() as s:
        return {
            "messages": s.scalar(select(func.count()).select_from(Message)) or 0,
            "transfers": s.scalar(select(func.count()).select_from(Transfer)) or 0,
            "outbox": s.scalar(select(func.count()).select_from(Outbox)) or 0,
        }


# --------------------------------------------------------------------------- CLI


def run_cli(settings: Settings, *args: str) -> tuple[int, str, str]:
    """``mailrouter -c <settings' file> ARGS`` in-process: (exit status, stdout, stderr).

    MAILROUTER_STATE_DIR is pinned to the settings' state dir (a developer's own value must
    not leak in), and logging is restored afterwards: ``main`` points its handler at the
    stderr of the moment, which would be stale for the next call.
    """
    root, logger = logging.getLogger(), logging.getLogger("mailrouter")
    saved = (logger.handlers[:], logger.level, logger.propagate, root.level)
    out, err = io.StringIO(), io.StringIO()
    env = {"MAILROUTER_STATE_DIR": str(settings.state_dir)}
    try:
        with mock.patch.dict(os.environ, env), redirect_stdout(out), redirect_stderr(err):
            code = main(["-c", str(settings.config_path), *args])
    finally:
        for handler in [h for h in root.handlers if isinstance(h, LogHandler)]:
            root.removeHandler(handler)
        logger.handlers[:], logger.level, logger.propagate, level = saved
        root.setLevel(level)
    return code, out.getvalue(), err.getvalue()


def subprocess_env(settings: Settings | None = None) -> dict[str, str]:
    """The environment for a ``mailrouter`` subprocess: this one without any MAILROUTER_*
    variable, and with MAILROUTER_STATE_DIR pinned to ``settings``' state dir if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROUTER_")}
    if settings is not None:
        env["MAILROUTER_STATE_DIR"] = str(settings.state_dir)
    return env


def ids_in(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    return [int(r["id"]) for r in rows]
