"""The durable outbox: :func:`enqueue` writes delivery work in the caller's transaction, and
the worker delivers routed mail and sends notices and replies, with retries.

Rows are written in the same transaction as the change that causes them (pipeline,
transfer, reply).  The worker claims a batch of due rows in one statement, with a lease
fenced on its instance (so a crashed worker's rows become claimable again), delivers
outside any transaction, then records the outcomes.  Maildir deliveries go as a batch
whose outcomes are recorded in one commit; the other backends go job by job.  Every
backend is idempotent on the row's key (Maildir tmp name, pickup name, IMAP search by
Message-ID), so a crash between "delivered" and "marked sent" does not deliver twice.
Temporary failures back off exponentially with jitter until the row's deadline; permanent
ones (5xx) are marked failed and stay visible in ``mailrouter queue``.  Every attempt is
recorded with the server's reply (``outbox_attempts``, read by ``mailrouter trace``) in the
same transaction as its outcome, and logged as one ``event=outbox`` line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, func, insert, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from mailrouter.config import Settings
from mailrouter.deliver.errors import DeliveryError
from mailrouter.deliver.mailbox import (
    Delivered,
    Drop,
    adds_envelope_headers,
    deliver_to_account,
    deliver_to_maildirs,
    relay_of_account,
    relay_of_outbound,
    send_outbound,
    settle_maildirs,
    trace_head,
)
from mailrouter.log import event
from mailrouter.notify.compose import Composed
from mailrouter.parse import format_id, parse
from mailrouter.retry import backoff, wait_first, wait_unless_stopped
from mailrouter.runtime import Runtime
from mailrouter.store.blobs import BLOB_THRESHOLD, blob_connection, read_raw
from mailrouter.store.inserts import add_message, insert_outbox
from mailrouter.store.instances import claim_is_dead, heartbeat, register, retire
from mailrouter.store.models import (
    MESSAGES,
    OUTBOX,
    OUTBOX_ATTEMPTS,
    AttemptStatus,
    Direction,
    Message,
    Outbox,
    OutboxKind,
    OutboxStatus,
    utcnow,
)

__all__ = [
    "Job",
    "OutboxWorker",
    "Outcome",
    "dsn_of",
    "enqueue",
    "mark_bounced",
    "queue_counts",
    "queue_outbound",
]

log = logging.getLogger("mailrouter.outbox")

# Deliveries attempted at once: enough to overlap I/O, few enough to be kind to a smarthost.
CONCURRENCY = 8
# After a round that found less than a full batch, wait this long before claiming again:
# deliveries a little later (a tenth of a second) in exchange for batches, not single jobs.
LINGER = 0.1
# The store refusing writes (disk full, locked): the worker pauses, doubling from this up
# to the cap, and starts again from the bottom once a round went through.
STORE_RETRY_INITIAL = 0.5
STORE_RETRY_CAP = 30.0

_DSN = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")
_DEFAULT_DSN = {
    AttemptStatus.SENT: "2.0.0",
    AttemptStatus.DEFERRED: "4.0.0",
    AttemptStatus.BOUNCED: "5.0.0",
}
_INSERT_ATTEMPT = insert(OUTBOX_ATTEMPTS)


def dsn_of(text: str | None, status: AttemptStatus) -> str:
    """The enhanced status code (RFC 3463) in a server's reply, or the generic one for
    ``status`` when the reply has none (a Maildir, a refused connection)."""
    found = _DSN.search(text or "")
    if found is not None and found.group(1)[0] == _DEFAULT_DSN[status][0]:
        return found.group(1)
    return _DEFAULT_DSN[status]


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    account: str
    interaction_id: int | None
    payload: bytes  # the message; for a delivery without ``head``, as stored
    message_id: str
    envelope_from: str
    envelope_to: list[str]
    attempts: int
    deadline: datetime
    key: str
    created_at: datetime
    relay: str  # where the attempt goes: maildir, pickup, smtp:HOST:PORT, …
    head: bytes = b""  # trace fields to write in front of ``payload``

    @property
    def whole(self) -> bytes:
        """The message as it goes out: ``head`` and ``payload`` (copied only with a head)."""
        return self.head + self.payload if self.head else self.payload


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended: the job's new status, and the attempt's in the log's words."""

    status: str  # OutboxStatus: sent, pending (to retry), failed
    attempt: AttemptStatus  # sent, deferred, bounced
    dsn: str
    reply: str


# One attempt ready to record: the job, how it failed (None: delivered), what the other
# side said, and when the attempt started.
Attempt = tuple[Job, DeliveryError | None, Delivered | None, datetime | None]


def enqueue(
    session: Session,
    settings: Settings,
    *,
    kind: OutboxKind,
    account_id: int,
    interaction_id: int | None,
    message_pk: int | None,
    payload: bytes = b"",
    envelope_from: str = "",
    envelope_to: Sequence[str] = (),
) -> int:
    """Write work for the outbox worker in the caller's transaction (the outbox pattern)."""
    now = utcnow()
    return insert_outbox(
        session,
        kind=kind.value,
        account_id=account_id,
        interaction_id=interaction_id,
        message_pk=message_pk,
        payload=payload,
        envelope_from=envelope_from,
        envelope_to=",".join(envelope_to),
        status="pending",
        attempts=0,
        created_at=now,
        next_attempt_at=now,
        deadline=now + timedelta(seconds=settings.outbox.lifetime),
    )


def queue_outbound(
    session: Session,
    settings: Settings,
    composed: Composed,
    *,
    kind: OutboxKind,
    account_id: int,
    interaction_id: int,
    source: str,
) -> tuple[int, int]:
    """Store our own composed message on its interaction and queue it for sending.

    Stored as an outbound message so the customer's answer to it resolves to this
    interaction; queued in the same transaction.  Returns (message key, outbox key).
    """
    message_pk = add_message(
        session,
        parse(composed.raw),
        direction=Direction.OUTBOUND,
        account_id=account_id,
        interaction_id=interaction_id,
        source=source,
    )
    outbox_pk = enqueue(
        session,
        settings,
        kind=kind,
        account_id=account_id,
        interaction_id=interaction_id,
        message_pk=message_pk,
        payload=composed.raw,
        envelope_from=composed.envelope_from,
        envelope_to=composed.envelope_to,
    )
    return message_pk, outbox_pk


def queue_counts(session: Session) -> dict[str, int]:
    """Outbox rows waiting (pending), in hand (sending) and given up on (failed).

    Cheap enough to ask every few seconds: it counts from the (status, next attempt) index.
    """
    wanted = [OutboxStatus.PENDING.value, OutboxStatus.SENDING.value, OutboxStatus.FAILED.value]
    rows = session.execute(
        select(Outbox.status, func.count()).where(Outbox.status.in_(wanted)).group_by(Outbox.status)
    )
    counts = dict.fromkeys(wanted, 0)
    counts.update({status: n for status, n in rows.tuples()})
    return counts


def mark_bounced(session: Session, message_id: str, why: str) -> int:
    """Our message ``message_id`` was sent but bounced: its outbox row says so, with the
    recipients' status.  Returns the rows changed (0 when it is not ours, or not sent)."""
    ours = select(Message.id).where(
        Message.message_id == message_id, Message.direction == Direction.OUTBOUND.value
    )
    res = session.execute(
        update(Outbox)
        .where(Outbox.message_pk.in_(ours), Outbox.status == OutboxStatus.SENT.value)
        .values(status=OutboxStatus.BOUNCED.value, last_error=f"bounced: {why}")
    )
    return int(getattr(res, "rowcount", 0) or 0)


class OutboxWorker:
    """Claims due outbox rows in batches and delivers them.

    Each worker is one *instance* (``store/instances.py``): its claims carry its id, it
    beats while it runs, and it retires when it stops.  ``name`` is stable across
    restarts for the daemon (so a restart takes back the dead predecessor's claims at
    once); a worker without one (a CLI flush, a test) gets a name of its own.
    """

    def __init__(self, rt: Runtime, *, name: str | None = None) -> None:
        self.rt = rt
        self.name = name or f"worker:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.instance_id: str | None = None
        self._wake = asyncio.Event()
        # Attempts made whose outcome the store could not take (disk full, locked): kept
        # here and recorded before anything new is claimed.
        self._unrecorded: list[tuple[Job, DeliveryError | None]] = []

    @property
    def settings(self) -> Settings:
        """The current settings (read through the runtime, so a reload applies at once)."""
        return self.rt.settings

    def wake(self) -> None:
        """New work was committed: look now instead of at the next poll."""
        self._wake.set()

    # ------------------------------------------------------------------ store side (sync)

    def claim(self, limit: int) -> list[Job]:
        with self.rt.db.write() as s:
            return self._claim_in(s, limit)

    def register_in(self, s: Session) -> str:
        if self.instance_id is None:
            self.instance_id = register(s, self.name, utcnow())
        return self.instance_id

    def _claim_in(self, s: Session, limit: int) -> list[Job]:
        me = self.register_in(s)
        now = utcnow()
        lease = now + timedelta(seconds=self.settings.outbox.lease)
        o, m = OUTBOX.c, MESSAGES.c
        due = or_(
            (o.status == OutboxStatus.PENDING.value) & (o.next_attempt_at <= now),
            # A worker that died mid-delivery left its rows "sending": take them back once
            # its instance is retired or silent (seconds), or its lease ran out.
            (o.status == OutboxStatus.SENDING.value)
            & claim_is_dead(now, self.settings.outbox.dead_after),
        )
        # Core statements, not ORM objects: the claim runs on the writer thread, which
        # ingest shares, once per batch; the unit of work's bookkeeping cost more than
        # the SQL itself.
        conn = s.connection()
        blobs = blob_connection(conn, BLOB_THRESHOLD)  # SQLite: big messages in slices
        # SKIP LOCKED lets several instances share the PostgreSQL outbox; SQLAlchemy
        # drops it on SQLite, where BEGIN IMMEDIATE already serialises claimers.
        ids = list(
            conn.execute(
                select(o.id)
                .where(due)
                .order_by(o.next_attempt_at, o.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).scalars()
        )
        if not ids:
            return []
        conn.execute(
            update(OUTBOX)
            .where(o.id.in_(ids), due)
            .values(
                status=OutboxStatus.SENDING.value,
                claimed_until=lease,
                claimed_by=me,
                attempts=o.attempts + 1,
            )
        )
        rows = conn.execute(
            select(
                o.id,
                o.kind,
                o.account_id,
                o.interaction_id,
                o.payload,
                o.envelope_from,
                o.envelope_to,
                o.attempts,
                o.deadline,
                o.created_at,
                m.id.label("message_pk"),
                m.message_id,
                m.content_hash,
                # A big message is read from its pages afterwards (store/blobs.py).
                (m.raw if blobs is None else case((m.size < BLOB_THRESHOLD, m.raw))).label("raw"),
                m.envelope_from.label("message_envelope_from"),
                m.account_id.label("message_account_id"),
                m.routed_to_account_id,
            )
            .select_from(OUTBOX.outerjoin(MESSAGES, m.id == o.message_pk))
            .where(o.id.in_(ids), o.claimed_by == me, o.claimed_until == lease)
            .order_by(o.id)
        ).all()
        jobs: list[Job] = []
        for ob in rows:
            has_message = ob.message_pk is not None
            raw = ob.raw
            if has_message and raw is None and blobs is not None:
                raw = read_raw(blobs, ob.message_pk)
            head = b""
            payload = ob.payload
            account = self.rt.accounts.name(ob.account_id)
            relay = relay_of_outbound(self.settings.outbound)
            envelope_from = ob.envelope_from
            if ob.kind == OutboxKind.DELIVER.value:
                acc = self.settings.account(account)
                relay = relay_of_account(acc)
                if has_message:
                    routed_from = None
                    if ob.routed_to_account_id is not None:
                        routed_from = self.rt.account_of(ob.message_account_id).address
                    # The envelope is known for SMTP and LMTP ingest; replayed and
                    # IMAP-watched mail has none (its own MDA wrote its Return-Path).
                    # With one, we are the MDA into a Maildir or over APPEND and write
                    # Return-Path and Delivered-To; an LMTP server writes them itself
                    # from our MAIL FROM and RCPT TO, so only the inbound ones go.
                    sender = ob.message_envelope_from
                    mda = sender is not None and adds_envelope_headers(acc)
                    # The trace fields apart from the body: a big message is never
                    # copied whole to put them in front (the Maildir writer writes both).
                    head, payload = trace_head(
                        raw,
                        ob.interaction_id,
                        routed_from,
                        return_path=sender if mda else None,
                        delivered_to=acc.address if mda else None,
                        strip_return_path=sender is not None and not mda,
                    )
                    envelope_from = sender or ""
            jobs.append(
                Job(
                    id=ob.id,
                    kind=ob.kind,
                    account=account,
                    interaction_id=ob.interaction_id,
                    payload=payload,
                    head=head,
                    message_id=ob.message_id if has_message else "",
                    envelope_from=envelope_from,
                    envelope_to=[a for a in ob.envelope_to.split(",") if a],
                    attempts=ob.attempts,
                    deadline=ob.deadline,
                    key=f"{ob.id}x{(ob.content_hash[:12] if has_message else 'out')}",
                    created_at=ob.created_at,
                    relay=relay,
                )
            )
        return jobs

    def finish(
        self,
        job: Job,
        error: DeliveryError | None,
        delivered: Delivered | None = None,
        started: datetime | None = None,
    ) -> Outcome:
        with self.rt.db.write() as s:
            return self._finish_in(s, job, error, delivered, started)

    def _finish_in(
        self,
        s: Session,
        job: Job,
        error: DeliveryError | None,
        delivered: Delivered | None = None,
        started: datetime | None = None,
    ) -> Outcome:
        """Record the attempt and the job's new state, in the caller's transaction."""
        [outcome] = self._finish_many_in(s, [(job, error, delivered, started)])
        return outcome

    def _finish_many_in(self, s: Session, attempts: Sequence[Attempt]) -> list[Outcome]:
        """Record attempts and their jobs' new states, in the caller's transaction.

        Each job's update is fenced on our claim: if we were taken for dead and the row
        was claimed again, the newer claim's outcome is the one that counts (the attempt
        is still recorded, and its outcome says ``claim-lost``).  The successes of a
        batch share one UPDATE, and all attempt rows one INSERT.
        """
        now = utcnow()
        conn = s.connection()
        o = OUTBOX.c
        fence = (o.claimed_by == self.instance_id) & (o.status == OutboxStatus.SENDING.value)
        planned: list[tuple[Job, dict[str, object], AttemptStatus, str]] = []
        for job, error, delivered, _ in attempts:
            values: dict[str, object]
            if error is None:
                values = {"status": OutboxStatus.SENT.value, "sent_at": now, "last_error": None}
                attempt, reply = AttemptStatus.SENT, delivered.reply if delivered else "delivered"
            elif error.permanent or now >= job.deadline:
                why = (
                    str(error)
                    if error.permanent
                    else f"gave up after {job.attempts} attempts: {error}"
                )
                values = {"status": OutboxStatus.FAILED.value, "last_error": why}
                attempt, reply = AttemptStatus.BOUNCED, why
            else:
                delay = backoff(
                    job.attempts,
                    self.settings.outbox.initial_backoff,
                    self.settings.outbox.max_backoff,
                )
                values = {
                    "status": OutboxStatus.PENDING.value,
                    "last_error": str(error),
                    "next_attempt_at": min(now + timedelta(seconds=delay), job.deadline),
                }
                attempt, reply = AttemptStatus.DEFERRED, str(error)
            values["claimed_until"] = None
            values["claimed_by"] = None
            planned.append((job, values, attempt, reply))
        ours: set[int] = set()
        sent = [job.id for job, _, attempt, _ in planned if attempt == AttemptStatus.SENT]
        if sent:
            ours.update(
                conn.execute(
                    update(OUTBOX)
                    .where(o.id.in_(sent), fence)
                    .values(
                        status=OutboxStatus.SENT.value,
                        sent_at=now,
                        last_error=None,
                        claimed_until=None,
                        claimed_by=None,
                    )
                    .returning(o.id)
                ).scalars()
            )
        for job, values, attempt, _ in planned:
            if attempt != AttemptStatus.SENT:
                res = conn.execute(update(OUTBOX).where(o.id == job.id, fence).values(**values))
                if res.rowcount:
                    ours.add(job.id)
        outcomes: list[Outcome] = []
        rows: list[dict[str, object]] = []
        for (job, values, attempt, reply), (_, _, _, started) in zip(
            planned, attempts, strict=True
        ):
            dsn = dsn_of(reply, attempt)
            rows.append(
                {
                    "outbox_id": job.id,
                    "attempt": job.attempts,
                    "started_at": started or now,
                    "finished_at": now,
                    "status": attempt.value,
                    "relay": job.relay,
                    "dsn": dsn,
                    "reply": reply,
                }
            )
            status = str(values["status"]) if job.id in ours else "claim-lost"
            outcomes.append(Outcome(status, attempt, dsn, reply))
        if rows:
            conn.execute(_INSERT_ATTEMPT, rows)
        return outcomes

    def _release_in(self, s: Session, jobs: list[Job]) -> None:
        """Give back claimed jobs that were never attempted (stopping)."""
        s.execute(
            update(Outbox)
            .where(
                Outbox.id.in_([j.id for j in jobs]),
                Outbox.status == OutboxStatus.SENDING.value,
                Outbox.claimed_by == self.instance_id,
            )
            .values(
                status=OutboxStatus.PENDING.value,
                claimed_until=None,
                claimed_by=None,
                attempts=Outbox.attempts - 1,
            )
        )

    # ------------------------------------------------------------------ delivery (async)

    def _drop_of(self, job: Job) -> Drop | None:
        """The Maildir drop of a delivery into a Maildir account (batched), else None."""
        if job.kind != OutboxKind.DELIVER.value:
            return None
        d = self.settings.account(job.account).delivery
        if d.type != "maildir" or d.path is None:
            return None
        return Drop(d.path, job.payload, job.key, head=job.head)

    async def _attempt(self, job: Job) -> Delivered:
        if job.kind == OutboxKind.DELIVER.value:
            acc = self.settings.account(job.account)
            return await deliver_to_account(
                acc,
                job.whole,
                message_id=job.message_id,
                key=job.key,
                mail_from=job.envelope_from,
            )
        return await send_outbound(
            self.settings.outbound,
            job.whole,
            envelope_from=job.envelope_from,
            envelope_to=job.envelope_to,
            key=job.key,
        )

    async def process(self, job: Job) -> str:
        """Attempt ``job`` once and record the outcome; returns the job's new status."""
        error: DeliveryError | None = None
        delivered: Delivered | None = None
        started = utcnow()
        try:
            delivered = await self._attempt(job)
        except DeliveryError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - event() logs it with exc_info
            error = _crashed(job, exc)
        try:
            outcome: Outcome = await self.rt.writes.submit(
                lambda s: self._finish_in(s, job, error, delivered, started)
            )
        except Exception as exc:  # noqa: BLE001 - the store's trouble, logged and kept
            self._keep_unrecorded([(job, error)], exc)
            return "unrecorded"
        drop = self._drop_of(job)
        if drop is not None and _settled(outcome):
            await settle_maildirs([drop])
        self._report(job, error, outcome)
        return outcome.status

    async def process_maildirs(self, jobs: Sequence[Job]) -> list[str]:
        """Attempt Maildir deliveries as one batch and record them in one commit.

        Every file is written and fsynced, each mailbox's directory is fsynced once for
        the whole batch, and all outcomes (job states and attempt rows) go to the store
        as one writer operation: delivery costs the writer one commit per batch, so it
        keeps pace with ingest instead of queueing behind it once per message.
        """
        drops = [drop for job in jobs if (drop := self._drop_of(job)) is not None]
        assert len(drops) == len(jobs), "only Maildir deliveries are batched"
        started = utcnow()
        try:
            results = await deliver_to_maildirs(drops)
        except Exception as exc:  # noqa: BLE001 - event() logs it with exc_info
            results = [_crashed(job, exc) for job in jobs]
        done = [
            (
                job,
                r if isinstance(r, DeliveryError) else None,
                r if isinstance(r, Delivered) else None,
            )
            for job, r in zip(jobs, results, strict=True)
        ]

        def record(s: Session) -> list[Outcome]:
            return self._finish_many_in(s, [(job, err, dlv, started) for job, err, dlv in done])

        try:
            outcomes = await self.rt.writes.submit(record)
        except Exception as exc:  # noqa: BLE001 - the store's trouble, logged and kept
            self._keep_unrecorded([(job, err) for job, err, _ in done], exc)
            return ["unrecorded"] * len(jobs)
        await settle_maildirs(
            [drop for drop, outcome in zip(drops, outcomes, strict=True) if _settled(outcome)]
        )
        for (job, err, _), outcome in zip(done, outcomes, strict=True):
            self._report(job, err, outcome)
        return [o.status for o in outcomes]

    def _keep_unrecorded(
        self, attempts: list[tuple[Job, DeliveryError | None]], exc: Exception
    ) -> None:
        # The attempts are over (maybe delivered) but the store cannot say so now.  Left
        # "sending", the rows would wait for their leases and then go out again; kept,
        # they are recorded as soon as the store takes writes again (next round).
        self._unrecorded.extend(attempts)
        why = _short(exc) if isinstance(exc, SQLAlchemyError) else str(exc)
        for job, _ in attempts:
            event(log, "outbox-unrecorded", logging.ERROR, job=job.id, kind=job.kind, error=why)

    def _report(self, job: Job, error: DeliveryError | None, outcome: Outcome) -> None:
        """Metrics and the one ``event=outbox`` line of a recorded attempt."""
        delay = (utcnow() - job.created_at).total_seconds()
        sent = outcome.attempt == AttemptStatus.SENT
        metrics = self.rt.metrics
        metrics.delivered(job.relay.split(":", 1)[0], outcome.attempt, delay if sent else None)
        if job.kind == OutboxKind.NOTIFY.value and outcome.status != OutboxStatus.PENDING:
            metrics.notice("sent" if sent else "failed")
        acc = self.settings.account(job.account)
        event(
            log,
            "outbox",
            logging.INFO if error is None else logging.WARNING,
            job=job.id,
            kind=job.kind,
            interaction=job.interaction_id,
            msgid=format_id(job.message_id) if job.message_id else None,
            account=acc.address,
            to=",".join(job.envelope_to) or None,
            attempt=job.attempts,
            status=outcome.attempt.value,
            dsn=outcome.dsn,
            relay=job.relay,
            delay=round(delay, 3),
            reply=outcome.reply if sent else None,
            error=str(error) if error else None,
        )

    async def _record_unrecorded(self) -> None:
        """Record the outcomes the store could not take before (raises while it still
        cannot: the stage then backs off and comes back here)."""
        if not self._unrecorded:
            return
        pending = list(self._unrecorded)

        def record(s: Session) -> list[Outcome]:
            return self._finish_many_in(s, [(job, error, None, None) for job, error in pending])

        outcomes = await self.rt.writes.submit(record)
        del self._unrecorded[: len(pending)]
        await settle_maildirs(
            [
                drop
                for (job, _), outcome in zip(pending, outcomes, strict=True)
                if _settled(outcome) and (drop := self._drop_of(job)) is not None
            ]
        )
        for (job, _), outcome in zip(pending, outcomes, strict=True):
            event(log, "outbox-recorded", job=job.id, kind=job.kind, status=outcome.status)

    async def _round(self, stop: asyncio.Event | None = None) -> int:
        """Claim one batch and attempt it; returns the count attempted.

        Maildir deliveries go as one batch (:meth:`process_maildirs`).  The rest —
        LMTP, IMAP APPEND, the smarthost, pickup — are per job: mailboxes (and the
        smarthost queue per sending account) are worked on in parallel, a few at a time,
        each one's jobs in order, so a reply never overtakes its predecessor in the
        agent's mailbox.  Their bookkeeping still shares commits (store/writer.py).
        """
        await self._record_unrecorded()
        jobs = await self.rt.writes.submit(lambda s: self._claim_in(s, self.settings.outbox.batch))
        if not jobs:
            return 0
        batched = [job for job in jobs if self._drop_of(job) is not None]
        lanes: dict[tuple[str, str], list[Job]] = {}
        for job in jobs:
            if self._drop_of(job) is None:
                direction = "in" if job.kind == OutboxKind.DELIVER.value else "out"
                lanes.setdefault((direction, job.account), []).append(job)
        gate = asyncio.Semaphore(CONCURRENCY)
        skipped: list[Job] = []

        async def lane(queue: list[Job]) -> None:
            async with gate:
                for job in queue:
                    if stop is not None and stop.is_set():
                        skipped.append(job)
                    else:
                        await self.process(job)

        async def maildirs() -> None:
            if stop is not None and stop.is_set():
                skipped.extend(batched)
            elif batched:
                await self.process_maildirs(batched)

        await asyncio.gather(maildirs(), *(lane(q) for q in lanes.values()))
        if skipped:
            await self.rt.writes.submit(lambda s: self._release_in(s, skipped))
        return len(jobs) - len(skipped)

    async def run_once(self, max_rounds: int = 1000) -> int:
        """Process everything due now (bounded); returns how many jobs were attempted.

        Beats while it works: a CLI flush, or the daemon's last pass after its heartbeat
        stage has stopped, may take longer than ``outbox.dead_after``, and its claims
        must not look dead to another worker meanwhile (that one would send them again).
        """
        done = 0
        stop = asyncio.Event()
        beating = asyncio.create_task(self.beat(stop))
        try:
            for _ in range(max_rounds):
                n = await self._round()
                if not n:
                    break
                done += n
        finally:
            stop.set()
            await asyncio.gather(beating, return_exceptions=True)
        return done

    async def beat(self, stop: asyncio.Event) -> None:
        """Say this instance is alive every ``outbox.heartbeat`` seconds until ``stop``."""
        while not await wait_unless_stopped(stop, self.settings.outbox.heartbeat):
            try:
                alive = await self.rt.writes.submit(self._beat_in)
            except SQLAlchemyError as exc:
                # The next beat tries again; silent beyond dead_after, our claims would
                # count as dead (then another instance, or our own next claim, takes them).
                event(log, "heartbeat-failed", logging.WARNING, error=_short(exc))
                continue
            if not alive:
                # A newer incarnation of our name started (a second daemon on the same
                # state?) and took our claims back: ours are no longer ours to finish.
                event(log, "instance-retired", logging.ERROR, name=self.name)
                self.instance_id = None

    def _beat_in(self, s: Session) -> bool:
        return heartbeat(s, self.register_in(s), utcnow())

    async def retire(self) -> None:
        """Stopping: mark this instance stopped and give back any claim still held."""
        if self.instance_id is not None:
            me, self.instance_id = self.instance_id, None
            await self.rt.writes.submit(lambda s: retire(s, [me], utcnow()))

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set; jobs in hand finish, unstarted ones are given back.

        A store that refuses writes is an expected fault, not a crash: the worker waits
        with a capped backoff that starts over once the store answers again (a stage
        restart's backoff would keep growing over the daemon's life).
        """
        failures = 0
        while not stop.is_set():
            self._wake.clear()
            try:
                done = await self._round(stop)
            except SQLAlchemyError as exc:
                failures += 1
                pause = backoff(failures, STORE_RETRY_INITIAL, STORE_RETRY_CAP)
                event(
                    log,
                    "outbox-store-unavailable",
                    logging.WARNING,
                    error=_short(exc),
                    retry_in=round(pause, 1),
                )
                await wait_unless_stopped(stop, pause)
                continue
            failures = 0
            if done >= self.settings.outbox.batch:
                continue  # a backlog: the next batch at once
            if done:
                # A partial batch: mail trickles in (or ingest is busy).  Lingering a
                # moment lets the next round take many jobs at once, so its fixed cost
                # (two writer operations, two fsyncs per mailbox) is paid per batch,
                # not per message, while ingest needs the writer and the CPU most.
                await wait_unless_stopped(stop, LINGER)
                continue
            await wait_first(
                self._wake.wait(), stop.wait(), seconds=self.settings.outbox.poll_interval
            )


def _crashed(job: Job, exc: Exception) -> DeliveryError:
    """A bug met while attempting ``job``: logged with its traceback, retried as temporary."""
    event(log, "outbox-crashed", logging.ERROR, exc_info=exc, job=job.id, kind=job.kind)
    return DeliveryError(f"internal error: {type(exc).__name__}: {exc}")


def _settled(outcome: Outcome) -> bool:
    """Whether a recorded outcome is final for the row: a retry will not need evidence.

    Deferred rows are retried; a lost claim belongs to the newer claimer, whose own
    attempt may be about to look for the evidence.
    """
    return outcome.status in (OutboxStatus.SENT.value, OutboxStatus.FAILED.value)


def _short(exc: SQLAlchemyError) -> str:
    """The database's own words, without SQLAlchemy's statement dump and help link."""
    return str(getattr(exc, "orig", None) or exc)
