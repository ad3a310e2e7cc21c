"""The API's request and response bodies, which the OpenAPI document is generated from.

Response fields are exactly those of the CLI's ``--json`` (built by ``views.py`` and
``agent_views.py``; the models only describe them, and a test checks that the two agree).
Timestamps are the same ISO 8601 strings the CLI prints.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Account",
    "AccountTransfer",
    "Interaction",
    "InteractionDetail",
    "InteractionPage",
    "Message",
    "QueueAttempt",
    "QueueChange",
    "QueueFlush",
    "QueueItem",
    "QueueItemDetail",
    "Reply",
    "ReplyQueued",
    "Report",
    "ReportRow",
    "TransferRecord",
    "TransferRequest",
    "TransferResult",
    "Transferred",
]

Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
MaybeTimestamp = Annotated[str | None, Field(json_schema_extra={"format": "date-time"})]


class _Out(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccountTransfer(_Out):
    """The account's Advanced settings (from the TOML file; read-only here)."""

    enabled: bool = Field(description="`accounts.NAME.transfer.enabled`: transfers out allowed")
    notify: bool = Field(description="`accounts.NAME.transfer.notify`: the customer gets a notice")
    template: str | None = Field(description="`accounts.NAME.transfer.template`")
    targets: list[str] = Field(description="accounts a transfer out of this one may go to")


class Account(_Out):
    name: str
    address: str
    display_name: str | None
    unread: int = Field(description="interactions owned now and unread")
    open: int = Field(description="interactions owned now and open")
    transfer: AccountTransfer


class Interaction(_Out):
    """One interaction, as ``mailrouter interactions --json`` prints it."""

    id: int
    account: str = Field(description="the account that owns it now")
    account_address: str
    origin_account: str = Field(description="the account it started in")
    created_at: Timestamp
    last_activity_at: Timestamp
    unread: bool
    status: Literal["open", "closed"]
    distribution: Literal["queue", "manual"]
    assigned_agent: str | None
    subject: str | None
    customer: str | None = Field(description="the customer's address")
    customer_name: str | None


class InteractionPage(_Out):
    items: list[Interaction]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null: last")


class Message(_Out):
    """A stored message with its original addresses (seed rule 9)."""

    message_id: str
    synthetic_id: bool
    direction: Literal["inbound", "outbound"]
    account: str = Field(description="the account it was addressed to or sent from")
    account_address: str
    routed_to: str | None = Field(description="where it was delivered, when not `account`")
    from_: str | None = Field(alias="from")
    to: str | None
    subject: str | None
    date: MaybeTimestamp
    received_at: Timestamp
    in_reply_to: str | None
    size: int
    status: str
    hold_reason: str | None
    rule: str | None
    action: str | None
    automatic: str | None
    source: str | None


class TransferRecord(_Out):
    """One transfer in an interaction's history."""

    id: int
    from_: str = Field(alias="from")
    to: str
    by: str | None = Field(description="the agent who transferred it")
    at: Timestamp
    notification: str = Field(description="queued, sent, failed, suppressed or off")
    notification_reason: str | None
    notification_message_id: str | None


class InteractionDetail(Interaction):
    """An interaction with its messages and transfers, as ``mailrouter show --json``."""

    messages: list[Message]
    transfers: list[TransferRecord]


class TransferRequest(_In):
    to: str = Field(min_length=1, max_length=320, description="target account, name or address")


class TransferResult(_Out):
    """The transfer just made, as ``mailrouter transfer --json``, and its ``notice``."""

    transfer_id: int
    interaction_id: int
    from_account: str
    to_account: str
    notification: Literal["queued", "suppressed", "off"]
    reason: str | None
    notice_message_id: str | None
    outbox_id: int | None
    notice: str = Field(description='"queued", "off" or "suppressed: REASON"')


class Transferred(_Out):
    interaction: Interaction
    transfer: TransferResult


class Reply(_In):
    body: str = Field(max_length=200_000, description="plain text")
    close: bool = Field(default=False, description="close the interaction with the reply")


class ReplyQueued(_Out):
    message_id: str = Field(description="the reply's Message-ID, as in the interaction's messages")


class ReportRow(_Out):
    account: str
    address: str
    interactions: int
    inbound: int
    outbound: int
    transfers_in: int
    transfers_out: int


class Report(_Out):
    """``mailrouter report --json``: counted under each interaction's *current* account."""

    from_: Timestamp = Field(alias="from")
    to: Timestamp
    attributed_to: Literal["current account"]
    accounts: list[ReportRow]


class QueueItem(_Out):
    """One row of ``mailrouter queue --json``: an outbox job (``o34``) or a message held
    for inspection (``m12``, kind ``message``)."""

    queue_id: str = Field(description="`o34`: outbox job 34; `m12`: held message 12")
    id: int
    kind: Literal["deliver", "notify", "reply", "message"]
    account: str
    interaction: int | None
    status: str = Field(
        description="a job: pending, sending, sent, failed, held or deleted; a message: held"
    )
    attempts: int
    to: str | None = Field(description="envelope recipients, comma-separated")
    created_at: MaybeTimestamp
    next_attempt_at: MaybeTimestamp
    deadline: MaybeTimestamp
    sent_at: MaybeTimestamp
    last_error: str | None
    reason: str | None = Field(
        description="why it is in the queue: deferred, bounced, expired, held by operator, "
        "… or a held message's hold reason"
    )
    message_id: str | None


class QueueAttempt(_Out):
    """One delivery attempt with the server's reply (``queue show``, ``trace``)."""

    attempt: int
    started_at: MaybeTimestamp
    finished_at: MaybeTimestamp
    status: str = Field(description="sent, deferred or bounced")
    relay: str | None
    dsn: str | None
    reply: str | None


class QueueItemDetail(QueueItem):
    """``mailrouter queue show ID --json``: a job's envelope, headers and every attempt;
    a held message's envelope, headers and where the routing stopped."""

    envelope_from: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    message: int | None = Field(default=None, description="a job: the stored message's id")
    attempt_log: list[QueueAttempt] | None = Field(default=None, description="a job's attempts")
    source: str | None = Field(default=None, description="a held message: how it came in")
    size: int | None = None
    rule: str | None = None
    step: str | None = None
    automatic: str | None = None


class QueueChange(_Out):
    """What an operation did to one item: a line of ``queue ACTION ID --json``'s items."""

    queue_id: str
    status: str = Field(description="the item's status afterwards")
    action: str | None = Field(description="a released message: what the routing decided now")
    rule: str | None
    interaction: int | None
    reason: str | None
    job: str | None = Field(description="a released message: its new delivery job (`o…`)")


class QueueFlush(_Out):
    """``queue retry --all``: pending jobs made due now (the daemon delivers them)."""

    made_due: int
