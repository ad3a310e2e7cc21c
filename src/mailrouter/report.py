"""Per-account activity report for a period, counted under each interaction's *current* owner.

This is the seed's documented behaviour (DESIGN §2 rule 10): the same report for the same
period gives different per-account figures before and after a transfer, because the
interaction's messages move with it.  Transfers themselves are events and are counted
under the accounts they went from and to.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mailrouter.runtime import Runtime
from mailrouter.store.models import Interaction, Message, Transfer

__all__ = ["report", "report_document"]

FIELDS = ("interactions", "inbound", "outbound", "transfers_in", "transfers_out")


def report(s: Session, rt: Runtime, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Rows per configured account for ``start <= t < end``."""
    rows: dict[int, dict[str, Any]] = {
        rt.accounts.id(a.name): {
            "account": a.name,
            "address": a.address,
            **dict.fromkeys(FIELDS, 0),
        }
        for a in rt.settings.accounts
    }

    def add(field: str, query: Any) -> None:
        for account_id, n in s.execute(query):
            if account_id in rows:
                rows[account_id][field] += n

    add(
        "interactions",
        select(Interaction.account_id, func.count())
        .where(Interaction.created_at >= start, Interaction.created_at < end)
        .group_by(Interaction.account_id),
    )
    for direction in ("inbound", "outbound"):
        add(
            direction,
            select(Interaction.account_id, func.count())
            .join(Message, Message.interaction_id == Interaction.id)
            .where(
                Message.direction == direction,
                Message.received_at >= start,
                Message.received_at < end,
            )
            .group_by(Interaction.account_id),
        )
    add(
        "transfers_in",
        select(Transfer.to_account_id, func.count())
        .where(Transfer.at >= start, Transfer.at < end)
        .group_by(Transfer.to_account_id),
    )
    add(
        "transfers_out",
        select(Transfer.from_account_id, func.count())
        .where(Transfer.at >= start, Transfer.at < end)
        .group_by(Transfer.from_account_id),
    )
    return list(rows.values())


def report_document(s: Session, rt: Runtime, start: datetime, end: datetime) -> dict[str, Any]:
    """``report --json`` (and the API's report): the period, how it counts, the rows."""
    return {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "attributed_to": "current account",
        "accounts": report(s, rt, start, end),
    }
