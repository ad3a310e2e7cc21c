"""Store look-ups shared by the pipeline, transfers and the CLI (no business rules here)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailrouter.config import Settings
from mailrouter.store.models import Account, Interaction, Message, MessageRecipient, MessageRef

__all__ = ["AccountMap", "StoreView", "sync_accounts"]


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
    """The routing decision's window on the store (implements ``RoutingView``)."""

    def __init__(self, session: Session, accounts: AccountMap) -> None:
        self.session = session
        self.accounts = accounts

    def interactions_of(self, ids: Sequence[str]) -> dict[str, int]:
        if not ids:
            return {}
        q = (
            select(Message.message_id, Message.interaction_id)
            .where(Message.message_id.in_(list(ids)), Message.interaction_id.is_not(None))
            .order_by(Message.id)
        )
        out: dict[str, int] = {}
        for mid, iid in self.session.execute(q):
            if iid is not None:
                out.setdefault(mid, iid)
        return out

    def interactions_referencing(self, ids: Sequence[str]) -> dict[str, int]:
        if not ids:
            return {}
        q = (
            select(MessageRef.ref_id, Message.interaction_id)
            .join(Message, Message.id == MessageRef.message_pk)
            .where(MessageRef.ref_id.in_(list(ids)), Message.interaction_id.is_not(None))
            .order_by(Message.id)
        )
        out: dict[str, int] = {}
        for mid, iid in self.session.execute(q):
            if iid is not None:
                out.setdefault(mid, iid)
        return out

    def owner_of(self, interaction_id: int) -> str:
        account_id = self.session.scalar(
            select(Interaction.account_id).where(Interaction.id == interaction_id)
        )
        assert account_id is not None, f"interaction {interaction_id} vanished"
        return self.accounts.name(account_id)

    def existing(self, message_id: str, content_hash: str) -> tuple[int, set[str]] | None:
        pk = self.session.scalar(
            select(Message.id).where(
                Message.message_id == message_id, Message.content_hash == content_hash
            )
        )
        if pk is None:
            return None
        ids = self.session.scalars(
            select(MessageRecipient.account_id).where(MessageRecipient.message_pk == pk)
        )
        return pk, {self.accounts.name(i) for i in ids}
