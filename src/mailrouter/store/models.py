"""SQLAlchemy models: accounts, interactions, messages, transfers, the outbox and its
delivery attempts, IMAP state, instances and leases, agents (with their accounts), the
idempotency keys of their API replies and their desk sessions.

Message-IDs are stored bare (no angle brackets).  ``message_refs`` keeps the ids a message
points at (In-Reply-To and References, at most the root and the 99 nearest: see
``parse.MAX_REFERENCES``), so thread resolution is an indexed lookup and a parent that
arrives after its reply still finds its thread.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

__all__ = [
    "INSTANCES",
    "INTERACTIONS",
    "LEASES",
    "MESSAGES",
    "MESSAGE_RECIPIENTS",
    "MESSAGE_REFS",
    "OUTBOX",
    "OUTBOX_ATTEMPTS",
    "Account",
    "Agent",
    "AgentAccount",
    "AttemptStatus",
    "Base",
    "DeskSession",
    "Direction",
    "IdempotencyKey",
    "ImapState",
    "Instance",
    "Interaction",
    "Lease",
    "Message",
    "MessageRecipient",
    "MessageRef",
    "Outbox",
    "OutboxAttempt",
    "OutboxKind",
    "OutboxStatus",
    "Transfer",
    "utcnow",
]

# Stable constraint names make Alembic migrations portable between SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite's INTEGER PRIMARY KEY is its rowid; BigInteger there would lose autoincrement.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps go in and come out timezone-aware in UTC on every backend.

    SQLite has no time zones: it stores naive UTC, and we put the zone back on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Direction(enum.StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


class OutboxKind(enum.StrEnum):
    DELIVER = "deliver"  # put an inbound message into an account's mailbox
    NOTIFY = "notify"  # transfer notice to the customer
    REPLY = "reply"  # agent reply to the customer


class OutboxStatus(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"  # permanent: 5xx, or lifetime exceeded
    BOUNCED = "bounced"  # sent, then reported undeliverable by a bounce (DSN)
    HELD = "held"  # parked by an operator (`queue hold`): never claimed until released
    DELETED = "deleted"  # dropped by an operator (`queue delete`): kept for `trace`


class AttemptStatus(enum.StrEnum):
    """How one delivery attempt ended, in the log's words (``status=``, after Postfix)."""

    SENT = "sent"
    DEFERRED = "deferred"  # temporary failure: the job waits for its next try
    BOUNCED = "bounced"  # permanent failure, or the job's lifetime ran out


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)
    transfer_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    transfer_notify: Mapped[bool] = mapped_column(Boolean, default=False)
    transfer_template: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Interaction(Base):
    __tablename__ = "interactions"
    # The interactions gauge counts open ones by account at every scrape.
    __table_args__ = (Index("ix_interactions_status", "status", "account_id", "unread"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    origin_account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    status: Mapped[str] = mapped_column(String(20), default="open")
    unread: Mapped[bool] = mapped_column(Boolean, default=True)
    distribution: Mapped[str] = mapped_column(String(20), default="queue")
    assigned_agent: Mapped[str | None] = mapped_column(String(200))
    customer_address: Mapped[str | None] = mapped_column(String(320))
    customer_name: Mapped[str | None] = mapped_column(String(320))
    subject: Mapped[str | None] = mapped_column(Text)
    # Not a foreign key: interactions and messages would reference each other, and a
    # cycle of constraints makes table creation order backend-specific.
    last_customer_message_pk: Mapped[int | None] = mapped_column(BigId)
    last_activity_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    account: Mapped[Account] = relationship(foreign_keys=[account_id], lazy="joined")
    origin_account: Mapped[Account] = relationship(foreign_keys=[origin_account_id], lazy="joined")


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        # Ingest is idempotent on (Message-ID, content hash); the accounts it was addressed
        # to are in message_recipients.
        UniqueConstraint("message_id", "content_hash", name="uq_messages_identity"),
        Index("ix_messages_interaction", "interaction_id", "id"),
        # `queue`, `status` and the metrics count held messages at every call: an index,
        # so that costs the held rows, not the whole message history.
        Index("ix_messages_status", "status", "received_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    interaction_id: Mapped[int | None] = mapped_column(ForeignKey("interactions.id"))
    direction: Mapped[str] = mapped_column(String(10))
    # The account the message was originally addressed to (inbound) or sent from (outbound).
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    # Where its copy was delivered when that differs from account_id (a routed message).
    routed_to_account_id: Mapped[int | None] = mapped_column(ForeignKey("accounts.id"))
    message_id: Mapped[str] = mapped_column(String(998), index=True)
    synthetic_id: Mapped[bool] = mapped_column(Boolean, default=False)
    in_reply_to: Mapped[str | None] = mapped_column(Text)
    references: Mapped[str | None] = mapped_column(Text)
    from_addr: Mapped[str | None] = mapped_column(Text)
    reply_to: Mapped[str | None] = mapped_column(Text)
    to_addrs: Mapped[str | None] = mapped_column(Text)
    subject: Mapped[str | None] = mapped_column(Text)
    date: Mapped[datetime | None] = mapped_column(UTCDateTime())
    size: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64))
    automatic: Mapped[str | None] = mapped_column(String(200))  # why it is auto-generated
    status: Mapped[str] = mapped_column(String(10), default="stored")  # stored | held
    hold_reason: Mapped[str | None] = mapped_column(Text)
    rule: Mapped[str | None] = mapped_column(String(50))
    action: Mapped[str | None] = mapped_column(String(30))
    source: Mapped[str | None] = mapped_column(String(50))  # smtp, lmtp, imap, cli, replay
    # The SMTP/LMTP envelope sender ("" for a bounce's null sender; None: not known, IMAP).
    envelope_from: Mapped[str | None] = mapped_column(String(320))
    step: Mapped[str | None] = mapped_column(String(50))  # the routing rule that decided
    matched_id: Mapped[str | None] = mapped_column(String(998))  # the stored id it matched
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    # Last, and every migration keeps it last (0006): SQLite fills a last-column blob in
    # slices without ever holding the whole message (store/inserts.py).
    raw: Mapped[bytes] = mapped_column(LargeBinary)

    account: Mapped[Account] = relationship(foreign_keys=[account_id], lazy="joined")
    routed_to: Mapped[Account | None] = relationship(
        foreign_keys=[routed_to_account_id], lazy="joined"
    )


class MessageRecipient(Base):
    """Every account a message was addressed to (a Cc to sales@ and support@ is one message)."""

    __tablename__ = "message_recipients"

    message_pk: Mapped[int] = mapped_column(ForeignKey("messages.id"), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), primary_key=True)


class MessageRef(Base):
    """One id a message points at: position 0 is In-Reply-To, then References nearest-first."""

    __tablename__ = "message_refs"

    message_pk: Mapped[int] = mapped_column(ForeignKey("messages.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    ref_id: Mapped[str] = mapped_column(String(998), index=True)


class Transfer(Base):
    __tablename__ = "transfers"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    interaction_id: Mapped[int] = mapped_column(ForeignKey("interactions.id"), index=True)
    from_account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    to_account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    actor: Mapped[str | None] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    # queued | suppressed | off — "sent"/"failed" are read from the outbox row.
    notification: Mapped[str] = mapped_column(String(20), default="off")
    notification_reason: Mapped[str | None] = mapped_column(Text)
    notification_message_id: Mapped[str | None] = mapped_column(String(998))
    notification_outbox_id: Mapped[int | None] = mapped_column(ForeignKey("outbox.id"))

    from_account: Mapped[Account] = relationship(foreign_keys=[from_account_id], lazy="joined")
    to_account: Mapped[Account] = relationship(foreign_keys=[to_account_id], lazy="joined")


class Outbox(Base):
    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_due", "status", "next_attempt_at"),
        Index("ix_outbox_message_pk", "message_pk"),  # `trace`: the jobs of one message
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(10))
    interaction_id: Mapped[int | None] = mapped_column(ForeignKey("interactions.id"))
    message_pk: Mapped[int | None] = mapped_column(ForeignKey("messages.id"))
    # deliver: the account whose mailbox receives it; notify/reply: the sending account.
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    envelope_from: Mapped[str] = mapped_column(String(320), default="")
    envelope_to: Mapped[str] = mapped_column(Text, default="")  # comma-separated
    status: Mapped[str] = mapped_column(String(10), default=OutboxStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    deadline: Mapped[datetime] = mapped_column(UTCDateTime())
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The instance (process incarnation) holding the claim: its heartbeat decides when a
    # claim of a dead process comes back, and finishing is fenced on it.
    claimed_by: Mapped[str | None] = mapped_column(String(32))
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)

    account: Mapped[Account] = relationship(lazy="joined")


class Instance(Base):
    """One incarnation of a process that claims work (a daemon, or a CLI flush).

    ``name`` is stable across restarts of the same daemon (host and state directory, or
    ``daemon.instance_name``); ``id`` is new at every start.  A new incarnation retires
    its name's older ones at once, so their claims are not left to run out.
    """

    __tablename__ = "instances"
    __table_args__ = (Index("ix_instances_name", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(300))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime())
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Lease(Base):
    """Work only one instance may do at a time (watching one IMAP mailbox): held by an
    instance until ``expires_at``, renewed while it is healthy."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(600), primary_key=True)
    holder: Mapped[str] = mapped_column(String(32))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime())


class OutboxAttempt(Base):
    """One delivery attempt of an outbox job, with the server's reply: `trace` reads these."""

    __tablename__ = "outbox_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    outbox_id: Mapped[int] = mapped_column(ForeignKey("outbox.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)  # 1 for the first try
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(10))  # AttemptStatus
    relay: Mapped[str] = mapped_column(String(400))  # maildir, pickup, smtp:host:port, …
    dsn: Mapped[str | None] = mapped_column(String(16))  # enhanced status code, e.g. 4.7.1
    reply: Mapped[str | None] = mapped_column(Text)  # the server's reply, or our error


class ImapState(Base):
    __tablename__ = "imap_state"

    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), primary_key=True)
    mailbox: Mapped[str] = mapped_column(String(500), primary_key=True)
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # The end of the watcher's last complete catch-up (even one that found nothing new).
    last_sync_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AgentAccount(Base):
    """An account an agent belongs to (an agent sees what these accounts own)."""

    __tablename__ = "agent_accounts"

    agent_id: Mapped[int] = mapped_column(
        ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True
    )
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), primary_key=True)


class Agent(Base):
    """A person (or script) using the HTTP API or the desk.

    Only hashes are stored.  A token is ``mrt_<token_id>_<secret>``: ``token_id`` is not
    secret and finds the row, ``token_hash`` checks the secret.  Rotating replaces both.
    """

    __tablename__ = "agents"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    token_id: Mapped[str] = mapped_column(String(32), unique=True)
    token_hash: Mapped[str] = mapped_column(String(300))
    password_hash: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    token_rotated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    password_set_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    accounts: Mapped[list[Account]] = relationship(
        secondary="agent_accounts", lazy="selectin", order_by=Account.name
    )


class IdempotencyKey(Base):
    """An API reply's ``Idempotency-Key`` with its outcome, written in the reply's transaction.

    A retried request with the same key (same agent) finds the row and gets the same
    answer instead of sending again; ``request_hash`` tells a retry from a different
    request that reuses the key.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("agent", "key", name="uq_idempotency_keys_agent_key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    agent: Mapped[str] = mapped_column(String(200))
    key: Mapped[str] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))
    interaction_id: Mapped[int] = mapped_column(ForeignKey("interactions.id"))
    message_id: Mapped[str] = mapped_column(String(998))
    outbox_id: Mapped[int] = mapped_column(ForeignKey("outbox.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DeskSession(Base):
    """A signed-in desk session: the browser holds a random secret, we keep its SHA-256.

    Looked up (with its agent) on every desk request, so removing the agent, changing its
    password or signing out ends the session from the next request on.  ``csrf`` is the
    token every form of the session carries.
    """

    __tablename__ = "desk_sessions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    agent_id: Mapped[int] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    # The agent's password_set_at when it signed in: a new password ends older sessions.
    password_set_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)

    agent: Mapped[Agent] = relationship(lazy="joined")


# Plain tables for Core statements on the ingest hot path (see pipeline.add_message).
INTERACTIONS = cast(Table, Interaction.__table__)
MESSAGES = cast(Table, Message.__table__)
MESSAGE_REFS = cast(Table, MessageRef.__table__)
MESSAGE_RECIPIENTS = cast(Table, MessageRecipient.__table__)
OUTBOX = cast(Table, Outbox.__table__)
INSTANCES = cast(Table, Instance.__table__)
LEASES = cast(Table, Lease.__table__)
OUTBOX_ATTEMPTS = cast(Table, OutboxAttempt.__table__)
