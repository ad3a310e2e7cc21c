"""What an agent may read: its accounts with their counts, pages of interactions, one
interaction, the report — each filtered to the agent's :attr:`~mailrouter.agents.Agent.scope`.

The rows are those of :mod:`mailrouter.views` (the CLI's ``--json`` shapes): this module
chooses *which* rows an agent gets and in what order, never what a row looks like.
Interactions are listed unread first, then by most recent activity, in pages: the
cursor is the position after the last row of a page, so a page never repeats rows of
the one before even while new mail arrives.  (An interaction whose unread flag or
activity changes between two pages moves in the order, and may be seen twice or not at
all: a list refreshed from the top does not have that problem.)
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, false, func, or_, select
from sqlalchemy.orm import Session

from mailrouter.agents import Agent
from mailrouter.config import AccountSettings
from mailrouter.errors import Refused
from mailrouter.report import report_document
from mailrouter.runtime import Runtime
from mailrouter.store.models import Interaction
from mailrouter.views import interaction_detail, interaction_dict

__all__ = [
    "Page",
    "account_rows",
    "interaction_page",
    "scoped_account",
    "scoped_report",
    "visible_detail",
    "visible_interaction",
]


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


def scoped_account(rt: Runtime, agent: Agent, name: str) -> AccountSettings:
    """The configured account ``name`` (name or address), if ``agent`` belongs to it."""
    try:
        acc = rt.settings.account(name)
    except KeyError as exc:
        raise Refused("unknown-account", str(exc.args[0])) from None
    if not agent.sees(acc.name):
        raise Refused("not-your-account", f"agent {agent.name} is not in account {acc.name}")
    return acc


def account_rows(s: Session, rt: Runtime, agent: Agent) -> list[dict[str, Any]]:
    """The agent's accounts (all, for an admin) with unread and open counts and their
    transfer settings — read from the config, the one source of truth for them."""
    accounts = [a for a in rt.settings.accounts if agent.sees(a.name)]
    ids = [rt.accounts.id(a.name) for a in accounts]
    counts = {
        account_id: (int(unread or 0), int(opened or 0))
        for account_id, unread, opened in s.execute(
            select(
                Interaction.account_id,
                func.sum(case((Interaction.unread.is_(True), 1), else_=0)),
                func.sum(case((Interaction.status == "open", 1), else_=0)),
            )
            .where(Interaction.account_id.in_(ids))
            .group_by(Interaction.account_id)
        )
    }
    rows = []
    for acc in accounts:
        unread, opened = counts.get(rt.accounts.id(acc.name), (0, 0))
        t = acc.transfer
        targets = [a.name for a in rt.settings.accounts if a.name != acc.name] if t.enabled else []
        rows.append(
            {
                "name": acc.name,
                "address": acc.address,
                "display_name": acc.display_name,
                "unread": unread,
                "open": opened,
                "transfer": {
                    "enabled": t.enabled,
                    "notify": t.notify,
                    "template": t.template,
                    "targets": targets,
                },
            }
        )
    return rows


# --------------------------------------------------------------------------- pages


def _encode_cursor(i: Interaction) -> str:
    raw = json.dumps([int(i.unread), i.last_activity_at.isoformat(), i.id]).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode_cursor(cursor: str) -> tuple[bool, datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        unread, at, last_id = json.loads(raw)
        if not (isinstance(unread, int) and isinstance(at, str) and isinstance(last_id, int)):
            raise ValueError(cursor)
        return bool(unread), datetime.fromisoformat(at), last_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise Refused(
            "bad-cursor", "the cursor is not one this API handed out (start again without it)"
        ) from None


def interaction_page(
    s: Session,
    rt: Runtime,
    agent: Agent,
    *,
    account: str | None = None,
    unread: bool | None = None,
    status: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page:
    """One page of the interactions the agent sees: unread first, then most recent."""
    q = select(Interaction).order_by(
        Interaction.unread.desc(), Interaction.last_activity_at.desc(), Interaction.id.desc()
    )
    if account is not None:
        acc = scoped_account(rt, agent, account)
        q = q.where(Interaction.account_id == rt.accounts.id(acc.name))
    elif agent.scope is not None:
        ids = [rt.accounts.ids[n] for n in agent.scope if n in rt.accounts.ids]
        q = q.where(Interaction.account_id.in_(ids))
    if unread is not None:
        q = q.where(Interaction.unread.is_(unread))
    if status is not None:
        q = q.where(Interaction.status == status)
    if cursor is not None:
        u, at, last_id = _decode_cursor(cursor)
        # Every key descends, so "after the cursor" is "less than it", key by key; for
        # the unread flag that is: read rows come after unread ones.
        q = q.where(
            or_(
                Interaction.unread.is_(False) if u else false(),
                and_(
                    Interaction.unread.is_(u),
                    or_(
                        Interaction.last_activity_at < at,
                        and_(Interaction.last_activity_at == at, Interaction.id < last_id),
                    ),
                ),
            )
        )
    rows = list(s.scalars(q.limit(limit + 1)).unique())
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(
        [interaction_dict(i) for i in rows], _encode_cursor(rows[-1]) if more and rows else None
    )


# --------------------------------------------------------------------------- one interaction


def visible_interaction(s: Session, agent: Agent, interaction_id: int) -> Interaction:
    """The interaction, if the agent sees it; refused exactly like a missing one if not."""
    i = s.get(Interaction, interaction_id)
    if i is None or not agent.sees(i.account.name):
        raise Refused("not-found", f"no interaction {interaction_id}")
    return i


def visible_detail(s: Session, agent: Agent, interaction_id: int) -> dict[str, Any]:
    """``show --json`` of an interaction the agent sees."""
    visible_interaction(s, agent, interaction_id)
    detail = interaction_detail(s, interaction_id)
    assert detail is not None
    return detail


def scoped_report(
    s: Session, rt: Runtime, agent: Agent, start: datetime, end: datetime
) -> dict[str, Any]:
    """``report --json`` with the rows of the agent's accounts only."""
    if end <= start:
        raise Refused("bad-period", "the end of the period must be after its start")
    doc = report_document(s, rt, start, end)
    doc["accounts"] = [row for row in doc["accounts"] if agent.sees(row["account"])]
    return doc
