"""Prometheus metrics: the hooks the stages call where things happen, and ``/metrics``.

Every :class:`~mailrouter.runtime.Runtime` carries a :class:`Metrics`.  The base class's
hooks do nothing, so a CLI command or a test that did not ask for metrics pays one empty
call per event and never imports prometheus-client.  The daemon's runtime carries a
:class:`PrometheusMetrics`: counters and histograms in its *own*
:class:`~prometheus_client.CollectorRegistry` (never the process-global one, so tests and
several runtimes in one process stay apart), plus a collector that reads the queue and
interaction gauges from the store at scrape time.

Labels are bounded by construction: account names come from the config, rules, actions,
stages and results from the code.  A Message-ID, an address or a customer is never a label.
An HTTP front end serves :meth:`Metrics.render` at ``/metrics``; it reads the store, so
call it in a thread (``await asyncio.to_thread(rt.metrics.render)``) from async code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from mailrouter import __version__
from mailrouter.log import event

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import GaugeMetricFamily, Metric

    from mailrouter.runtime import Runtime

__all__ = [
    "CONTENT_TYPE",
    "NOTICE_RESULTS",
    "QUEUES",
    "Metrics",
    "PrometheusMetrics",
    "render",
    "reply_class",
]

log = logging.getLogger("mailrouter.metrics")

# The classic text exposition format: what every Prometheus (2.x and 3.x) scrapes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

NOTICE_RESULTS = ("queued", "sent", "suppressed", "failed")
# mailrouter_queue_messages{queue}: the outbox by state, and the held messages.
QUEUES = ("pending", "deferred", "sending", "failed", "held", "held-messages")
INTERACTION_STATES = ("open", "unread")

# Seconds.  Delivery delay runs from queueing to the server's 250: milliseconds into a
# local Maildir, hours for a smarthost that is down.
DELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400)
# Thread resolution is a few indexed look-ups; accept is that plus a durable commit.
RESOLVE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
ACCEPT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


def reply_class(reply: str) -> str | None:
    """``2xx`` … ``5xx`` for a final SMTP reply line, None for a continuation (``250-``)."""
    if len(reply) < 3 or not reply[0].isdigit() or reply[3:4] == "-":
        return None
    return f"{reply[0]}xx"


class Metrics:
    """The instrumentation hooks; this base records nothing (metrics off)."""

    enabled = False

    def received(self, account: str, source: str, result: str) -> None:
        """A message came in for ``account`` and was ``result`` (an action, or tempfail)."""

    def decided(self, rule: str, action: str) -> None:
        """The routing took ``action`` because of thread rule ``rule``."""

    def resolved(self, seconds: float) -> None:
        """Thread resolution and the routing decision took ``seconds``."""

    def accepted(self, seconds: float) -> None:
        """One :meth:`Pipeline.accept` — parse, decide, commit — took ``seconds``."""

    def delivered(self, backend: str, status: str, delay: float | None) -> None:
        """A delivery attempt ended ``status`` (sent, deferred, bounced); ``delay``: since
        the job was queued, for a sent one."""

    def transferred(self, from_account: str, to_account: str, result: str) -> None:
        """A transfer was done (``ok``) or refused (the refusal's code)."""

    def notice(self, result: str) -> None:
        """A transfer notice was queued, suppressed, sent, or failed for good."""

    def smtp_reply(self, listener: str, reply: str) -> None:
        """The ``smtp`` or ``lmtp`` listener sent ``reply`` (one or more lines)."""

    def imap_reconnect(self, account: str) -> None:
        """The IMAP watcher of ``account`` lost its session and will connect again."""

    def watch_store(self, rt: Runtime) -> None:
        """Read the queue and interaction gauges from ``rt``'s store at scrape time."""

    def render(self) -> tuple[bytes, str]:
        """The ``/metrics`` response: (body, content type)."""
        return b"", CONTENT_TYPE


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """``registry`` in the text exposition format: (body, content type)."""
    from prometheus_client import generate_latest

    return generate_latest(registry), CONTENT_TYPE


class PrometheusMetrics(Metrics):
    """The hooks, counting into :attr:`registry` (a new one unless given)."""

    enabled = True

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._received = Counter(
            "mailrouter_messages_received",
            "Messages accepted from SMTP, LMTP, IMAP or the command line, by what became of them",
            ["account", "source", "result"],
            registry=r,
        )
        self._decisions = Counter(
            "mailrouter_routing_decisions",
            "Routing decisions by the thread rule that matched and the action taken",
            ["rule", "action"],
            registry=r,
        )
        self._deliveries = Counter(
            "mailrouter_deliveries",
            "Delivery attempts of the outbox by backend and outcome (sent, deferred, bounced)",
            ["backend", "status"],
            registry=r,
        )
        self._delay = Histogram(
            "mailrouter_delivery_delay_seconds",
            "Time from queueing to successful delivery",
            buckets=DELAY_BUCKETS,
            registry=r,
        )
        self._transfers = Counter(
            "mailrouter_transfers",
            "Transfers of interactions between accounts (result ok, or the refusal's code)",
            ["from_account", "to_account", "result"],
            registry=r,
        )
        self._notices = Counter(
            "mailrouter_notices",
            "Transfer notices to customers: queued, suppressed, sent, failed",
            ["result"],
            registry=r,
        )
        self._replies = Counter(
            "mailrouter_smtp_replies",
            "Replies the SMTP and LMTP listeners sent, by class (2xx, 3xx, 4xx, 5xx)",
            ["listener", "class"],
            registry=r,
        )
        self._reconnects = Counter(
            "mailrouter_imap_reconnects",
            "IMAP watcher sessions lost (each is followed by a reconnect)",
            ["account"],
            registry=r,
        )
        self._resolve = Histogram(
            "mailrouter_resolve_duration_seconds",
            "Thread resolution and routing decision time per message",
            buckets=RESOLVE_BUCKETS,
            registry=r,
        )
        self._accept = Histogram(
            "mailrouter_accept_duration_seconds",
            "Time to accept one message: parse, decide and the durable commit",
            buckets=ACCEPT_BUCKETS,
            registry=r,
        )
        Gauge(
            "mailrouter_build_info", "The running mailrouter version", ["version"], registry=r
        ).labels(__version__).set(1)
        # Series that exist before their first event, so rate() and dashboards see a 0.
        for result in NOTICE_RESULTS:
            self._notices.labels(result)
        for listener in ("smtp", "lmtp"):
            for cls in ("2xx", "4xx", "5xx"):
                self._replies.labels(listener, cls)
        self._store: StoreCollector | None = None

    def received(self, account: str, source: str, result: str) -> None:
        self._received.labels(account, source, result).inc()

    def decided(self, rule: str, action: str) -> None:
        self._decisions.labels(rule, action).inc()

    def resolved(self, seconds: float) -> None:
        self._resolve.observe(seconds)

    def accepted(self, seconds: float) -> None:
        self._accept.observe(seconds)

    def delivered(self, backend: str, status: str, delay: float | None) -> None:
        self._deliveries.labels(backend, status).inc()
        if delay is not None:
            self._delay.observe(max(0.0, delay))

    def transferred(self, from_account: str, to_account: str, result: str) -> None:
        self._transfers.labels(from_account, to_account, result).inc()

    def notice(self, result: str) -> None:
        self._notices.labels(result).inc()

    def smtp_reply(self, listener: str, reply: str) -> None:
        for line in reply.split("\r\n"):
            cls = reply_class(line)
            if cls is not None:
                self._replies.labels(listener, cls).inc()

    def imap_reconnect(self, account: str) -> None:
        self._reconnects.labels(account).inc()

    def watch_store(self, rt: Runtime) -> None:
        if self._store is not None:
            self.registry.unregister(self._store)
        self._store = StoreCollector(rt)
        self.registry.register(self._store)

    def render(self) -> tuple[bytes, str]:
        return render(self.registry)


class StoreCollector:
    """Gauges read from the store at scrape time: the queue and the open interactions.

    Each is one grouped query over an index (``ix_outbox_due``, ``ix_messages_status``,
    ``ix_interactions_status``): the cost follows the queue and the open interactions,
    never the message history.
    """

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def describe(self) -> Iterator[Metric]:
        # Names only: registering must not read the store.
        return iter(self._families())

    def _families(
        self,
    ) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        from prometheus_client.metrics_core import GaugeMetricFamily

        return (
            GaugeMetricFamily(
                "mailrouter_queue_messages",
                "Items in the queue: outbox jobs by state, and held messages",
                labels=["queue"],
            ),
            GaugeMetricFamily(
                "mailrouter_queue_oldest_age_seconds",
                "Age of the oldest item in each queue (0 when it is empty)",
                labels=["queue"],
            ),
            GaugeMetricFamily(
                "mailrouter_interactions",
                "Open interactions by current account; unread ones are also counted as open",
                labels=["account", "state"],
            ),
            GaugeMetricFamily(
                "mailrouter_store_up", "1 if the store answered this scrape's queries"
            ),
        )

    def collect(self) -> Iterator[Metric]:
        from sqlalchemy.exc import SQLAlchemyError

        from mailrouter.deliver.queue import depth
        from mailrouter.store.models import utcnow
        from mailrouter.views import open_interaction_counts

        depth_, oldest, interactions, up = self._families()
        try:
            with self.rt.db.read() as s:
                now = utcnow()
                queues = depth(s)
                counts = open_interaction_counts(s)
        except SQLAlchemyError as exc:
            event(log, "metrics-store-failed", logging.WARNING, error=str(exc))
            up.add_metric([], 0)
            yield up
            return
        for name in QUEUES:
            count, since = queues.get(name, (0, None))
            depth_.add_metric([name], count)
            oldest.add_metric([name], _age(now, since))
        for account_id, name in sorted(self.rt.accounts.names.items()):
            for state in INTERACTION_STATES:
                interactions.add_metric([name, state], counts.get((account_id, state), 0))
        up.add_metric([], 1)
        yield from (depth_, oldest, interactions, up)


def _age(now: datetime, since: datetime | None) -> float:
    return 0.0 if since is None else max(0.0, (now - since).total_seconds())
