"""Store look-ups shared by the pipeline, transfers and the CLI (no business rules here)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailrouter.config import Settings
from mailrouter.store.models import (
    INTERACTIONS,
    MESSAGE_RECIPIENTS,
    MESSAGE_REFS,
    MESSAGES,
    Account,
    Interaction,
)

__all__ = ["AccountMap", "StoreView", "lock_interaction", "sync_accounts"]


def lock_interaction(session: Session, interaction_id: int) -> Interaction | None:
    """Load an interaction and lock its row until the transaction ends.

    ``OF interactions``: its account relationships are eager outer joins, and PostgreSQL
    refuses FOR UPDATE on the nullable side of an outer join.
    """
    return session.scalar(
        select(Interaction).where(Interaction.id == interaction_id).with_for_update(of=Interaction)
    )


class AccountMap:
    """Account name ↔ row id, loaded once (accounts change only with the config)."""

    def __init__(self, ids: dict[str, int]) -> None:
        self.ids = ids
        self.names = {v: k for k, v in ids.items()}

    def id(self, name: str) -> int:
        return self.ids[name]

    def name(self, account_id: int) -> str:
        return self.names[account_id]


def sync_accounts(session: Session, settings: Settings) -> AccountMap:
    """Mirror configured accounts into the table (insert new, update settings), by name.

    Accounts removed from the config keep their rows: interactions and reports refer to them.
    """
    rows = {a.name: a for a in session.scalars(select(Account))}
    for acc in settings.accounts:
        row = rows.get(acc.name)
        if row is None:
            row = Account(name=acc.name, address=acc.address)
            session.add(row)
            rows[acc.name] = row
        row.address = acc.address
        row.transfer_enabled = acc.transfer.enabled
        row.transfer_notify = acc.transfer.notify
        row.transfer_template = acc.transfer.template
    session.flush()
    return AccountMap({name: row.id for name, row in rows.items()})


class StoreView:
    """The routing decision's window on the store (implements ``RoutingView``).

    Core statements on the session's connection: these run several times per message.
    """

    def __init__(self, session: Session, accounts: AccountMap) -> None:
        self.conn = session.connection()
        self.accounts = accounts

    def interactions_of(self, ids: Sequence[str]) -> dict[str, int]:
        if not ids:
            return {}
        m = MESSAGES.c
        q = (
            select(m.message_id, m.interaction_id)
            .where(m.message_id.in_(list(ids)), m.interaction_id.is_not(None))
            .order_by(m.id)
        )
        out: dict[str, int] = {}
        for mid, iid in self.conn.execute(q):
            out.setdefault(mid, iid)
        return out

    def interactions_referencing(self, ids: Sequence[str]) -> dict[str, int]:
        if not ids:
            return {}
        m, r = MESSAGES.c, MESSAGE_REFS.c
        q = (
            select(r.ref_id, m.interaction_id)
            .join_from(MESSAGE_REFS, MESSAGES, m.id == r.message_pk)
            .where(r.ref_id.in_(list(ids)), m.interaction_id.is_not(None))
            .order_by(m.id)
        )
        out: dict[str, int] = {}
        for mid, iid in self.conn.execute(q):
            out.setdefault(mid, iid)
        return out

    def owner_of(self, interaction_id: int) -> str:
        i = INTERACTIONS.c
        account_id = self.conn.scalar(select(i.account_id).where(i.id == interaction_id))
        assert account_id is not None, f"interaction {interaction_id} vanished"
        return self.accounts.name(account_id)

    def existing(self, message_id: str, content_hash: str) -> tuple[int, set[str]] | None:
        m = MESSAGES.c
        pk = self.conn.scalar(
            select(m.id).where(m.message_id == message_id, m.content_hash == content_hash)
        )
        if pk is None:
            return None
        rc = MESSAGE_RECIPIENTS.c
        ids = self.conn.scalars(select(rc.account_id).where(rc.message_pk == pk))
        return pk, {self.accounts.name(i) for i in ids}
