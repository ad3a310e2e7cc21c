"""Store look-ups shared by the pipeline, transfers and the CLI (no business rules here)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import datetime
from email.utils import parseaddr
from typing import Any

from sqlalchemy import bindparam, func, select, text
from sqlalchemy.orm import Session

from mailrouter.config import Settings
from mailrouter.store.models import (
    INTERACTIONS,
    MESSAGE_RECIPIENTS,
    MESSAGE_REFS,
    MESSAGES,
    Account,
    Interaction,
    Message,
    Outbox,
    Transfer,
)
from mailrouter.store.prepared import Prepared

__all__ = [
    "AccountMap",
    "StoreView",
    "accounts_in_sync",
    "last_customer_raw",
    "latest_inbound_message",
    "lock_interaction",
    "notices_to_since",
    "sync_accounts",
]


def lock_interaction(session: Session, interaction_id: int) -> Interaction | None:
    """Load an interaction and lock its row until the transaction ends.

    ``OF interactions``: its account relationships are eager outer joins, and PostgreSQL
    refuses FOR UPDATE on the nullable side of an outer join.
    """
    return session.scalar(
        select(Interaction).where(Interaction.id == interaction_id).with_for_update(of=Interaction)
    )


def last_customer_raw(session: Session, interaction: Interaction) -> bytes | None:
    """The raw bytes of the interaction's last customer message, if it has one."""
    if interaction.last_customer_message_pk is None:
        return None
    return session.scalar(
        select(Message.raw).where(Message.id == interaction.last_customer_message_pk)
    )


def latest_inbound_message(session: Session, interaction_id: int) -> tuple[int, str | None] | None:
    """The key and stored automatic-mail classification of the interaction's latest inbound
    message, or None if it has none."""
    row = session.execute(
        select(Message.id, Message.automatic)
        .where(Message.interaction_id == interaction_id, Message.direction == "inbound")
        .order_by(Message.id.desc())
        .limit(1)
    ).first()
    return (row[0], row[1]) if row is not None else None


def notices_to_since(session: Session, address: str, since: datetime) -> int:
    """How many transfer notices were queued to ``address`` since ``since``.

    Through the transfers of that period (indexed by time), so the per-customer cap on
    automatic mail costs the same however large the outbox grows.
    """
    count = session.scalar(
        select(func.count())
        .select_from(Transfer)
        .join(Outbox, Outbox.id == Transfer.notification_outbox_id)
        .where(
            Transfer.at >= since,
            Transfer.notification == "queued",
            Outbox.envelope_to == address,
        )
    )
    return count or 0


class AccountMap:
    """Account name ↔ row id, loaded once (accounts change only with the config)."""

    def __init__(self, ids: dict[str, int]) -> None:
        self.ids = ids
        self.names = {v: k for k, v in ids.items()}

    def id(self, name: str) -> int:
        return self.ids[name]

    def name(self, account_id: int) -> str:
        return self.names[account_id]


def accounts_in_sync(session: Session, settings: Settings) -> AccountMap | None:
    """The account map when the table already mirrors the config, else None (read only).

    Opening the store for a read-only command must not take the write lock: only when
    the config changed does :func:`sync_accounts` need a write transaction.
    """
    rows = {a.name: a for a in session.scalars(select(Account))}
    for acc in settings.accounts:
        row = rows.get(acc.name)
        if row is None or (
            row.address,
            row.transfer_enabled,
            row.transfer_notify,
            row.transfer_template,
        ) != (acc.address, acc.transfer.enabled, acc.transfer.notify, acc.transfer.template):
            return None
    return AccountMap({name: row.id for name, row in rows.items()})


def sync_accounts(session: Session, settings: Settings) -> AccountMap:
    """Mirror configured accounts into the table (insert new, update settings), by name.

    Accounts removed from the config keep their rows: interactions and reports refer to them.
    """
    if session.get_bind().dialect.name == "postgresql":
        # Instances starting at once on one database would each insert the same new
        # accounts and all but one die on the unique address.  This lock conflicts only
        # with itself and with writes to accounts (readers pass): the second sync waits,
        # then reads the first one's rows and has nothing to insert.  SQLite needs none:
        # its writers take the database lock up front (BEGIN IMMEDIATE).
        session.execute(text("LOCK TABLE accounts IN SHARE ROW EXCLUSIVE MODE"))
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


_M, _R, _RC, _I = MESSAGES.c, MESSAGE_REFS.c, MESSAGE_RECIPIENTS.c, INTERACTIONS.c


# Built once (per IN-list length): these run several times per message, and building a
# statement costs more than executing it on SQLite.
def _ids(n: int) -> list[Any]:
    return [bindparam(f"id{k}") for k in range(n)]


@functools.lru_cache(maxsize=128)  # lengths seen: 1 to MAX_REFERENCES + 2
def _interactions_of(n: int) -> Prepared:
    """The stored messages among ``n`` ids that are in an interaction, oldest first.

    One statement per list length (at most the ids one message names: parse() keeps
    MAX_REFERENCES + 1 parents), instead of an expanding IN that Prepared cannot run."""
    return Prepared(
        select(_M.message_id, _M.interaction_id, _M.direction)
        .where(_M.message_id.in_(_ids(n)), _M.interaction_id.is_not(None))
        .order_by(_M.id)
    )


@functools.lru_cache(maxsize=128)  # lengths seen: 1 to MAX_REFERENCES + 2
def _interactions_referencing(n: int) -> Prepared:
    """The messages in an interaction that name one of ``n`` ids, oldest first."""
    return Prepared(
        select(_R.ref_id, _M.interaction_id)
        .join_from(MESSAGE_REFS, MESSAGES, _M.id == _R.message_pk)
        .where(_R.ref_id.in_(_ids(n)), _M.interaction_id.is_not(None))
        .order_by(_M.id)
    )


# These return integers and strings only: run on the driver directly (store/prepared.py).
_OWNER = Prepared(select(_I.account_id).where(_I.id == bindparam("iid")))
_EXISTING = Prepared(
    select(_M.id).where(_M.message_id == bindparam("mid"), _M.content_hash == bindparam("h"))
)
_RECIPIENTS = Prepared(select(_RC.account_id).where(_RC.message_pk == bindparam("pk")))
_SENDERS = Prepared(
    select(_M.from_addr, _M.reply_to, _M.to_addrs).where(
        _M.interaction_id == bindparam("iid"), _M.direction == "inbound"
    )
)
_CUSTOMER = Prepared(select(_I.customer_address).where(_I.id == bindparam("iid")))
_OUR_ADDRESSES = Prepared(select(Account.address))


class StoreView:
    """The routing decision's window on the store (implements ``RoutingView``).

    Core statements on the session's connection: these run several times per message.
    """

    def __init__(self, session: Session, accounts: AccountMap) -> None:
        self.conn = session.connection()
        self.accounts = accounts
        # Direction of the stored message interactions_of named for an id, kept from that
        # same query: outbound() is then answered without another round trip.
        self._direction: dict[str, str] = {}
        self._our_addresses: set[str] | None = None

    def _first(
        self, stmt: Callable[[int], Prepared], ids: Sequence[str]
    ) -> dict[str, tuple[Any, ...]]:
        if not ids:
            return {}
        out: dict[str, tuple[Any, ...]] = {}
        params = {f"id{k}": mid for k, mid in enumerate(ids)}
        for mid, *rest in stmt(len(ids)).rows(self.conn, params):
            out.setdefault(mid, tuple(rest))
        return out

    def interactions_of(self, ids: Sequence[str]) -> dict[str, int]:
        found = self._first(_interactions_of, ids)
        self._direction.update({mid: direction for mid, (_iid, direction) in found.items()})
        return {mid: iid for mid, (iid, _direction) in found.items()}

    def interactions_referencing(self, ids: Sequence[str]) -> dict[str, int]:
        return {mid: iid for mid, (iid,) in self._first(_interactions_referencing, ids).items()}

    def outbound(self, ids: Sequence[str]) -> set[str]:
        missing = [mid for mid in ids if mid not in self._direction]
        if missing:
            self.interactions_of(missing)
        return {mid for mid in ids if self._direction.get(mid) == "outbound"}

    def owner_of(self, interaction_id: int) -> str:
        account_id = _OWNER.scalar(self.conn, {"iid": interaction_id})
        assert account_id is not None, f"interaction {interaction_id} vanished"
        return self.accounts.name(account_id)

    def participants(self, interaction_id: int) -> set[str]:
        # Whoever wrote in it, and whoever they addressed (a colleague on Cc).  Our own
        # accounts are among the addressees, but they are left out: they never send
        # inbound mail, and anyone can write From: sales@… to pass for a participant.
        found = {_CUSTOMER.scalar(self.conn, {"iid": interaction_id}) or ""}
        for from_addr, reply_to, to_addrs in _SENDERS.rows(self.conn, {"iid": interaction_id}):
            found.add(parseaddr(from_addr or "")[1])
            found.add(reply_to or "")
            found.update((to_addrs or "").split(", "))
        return {a.strip().lower() for a in found if a} - self._ours()

    def _ours(self) -> set[str]:
        if self._our_addresses is None:
            self._our_addresses = {a.lower() for (a,) in _OUR_ADDRESSES.rows(self.conn)}
        return self._our_addresses

    def existing(self, message_id: str, content_hash: str) -> tuple[int, set[str]] | None:
        pk = _EXISTING.scalar(self.conn, {"mid": message_id, "h": content_hash})
        if pk is None:
            return None
        ids = _RECIPIENTS.rows(self.conn, {"pk": pk})
        return pk, {self.accounts.name(i) for (i,) in ids}
