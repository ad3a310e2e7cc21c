"""Prometheus metrics: counters that move as mail flows through the real pipeline, gauges
read from the store at scrape time, bounded labels, and the Grafana dashboard's names.

The scrape over HTTP is tested with the HTTP server; here ``render()`` is the scrape.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from conftest import need
from helpers import ROOT, accept, flush, make_settings, scenario, subprocess_env
from mailrouter import __version__
from mailrouter.config import Settings, load_from_text
from mailrouter.daemon import Daemon
from mailrouter.errors import Refused
from mailrouter.ingest.imap import ImapWatcher
from mailrouter.metrics import CONTENT_TYPE, Metrics, PrometheusMetrics
from mailrouter.pipeline import Pipeline
from mailrouter.runtime import Runtime
from mailrouter.transfer import transfer
from servers import Dovecot, free_port

CHAIRS = "chairs-quote"
DASHBOARD = ROOT / "contrib" / "grafana" / "mailrouter.json"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(metrics: Metrics) -> Samples:
    """Every sample of a scrape, by (name, labels)."""
    body, content_type = metrics.render()
    assert content_type == CONTENT_TYPE
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(got: Samples, name: str, **labels: str) -> float:
    return got.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def measured(tmp_path: Path) -> Iterator[tuple[Runtime, PrometheusMetrics]]:
    """A runtime on a fresh store whose stages count into their own registry."""
    metrics = PrometheusMetrics()
    rt = Runtime.open(make_settings(tmp_path), metrics=metrics)
    try:
        yield rt, metrics
    finally:
        rt.close()


def test_counters_move_as_mail_flows_through_the_pipeline(
    measured: tuple[Runtime, PrometheusMetrics],
) -> None:
    """Ingest, deliver, transfer (notice sent), a routed reply, a hold, a refused transfer."""
    rt, metrics = measured
    first = accept(rt, scenario(CHAIRS, "01-customer-asks.eml"), "sales", source="smtp")
    accept(rt, scenario(CHAIRS, "02-customer-adds-detail.eml"), "sales", source="smtp")
    assert first.interaction_id is not None
    assert flush(rt) == 2
    transfer(rt, first.interaction_id, "support", actor="bob")
    assert flush(rt) == 1  # the notice, into the pickup directory
    accept(rt, scenario(CHAIRS, "03-customer-replies-to-sales.eml"), "sales", source="imap")
    accept(rt, b"", "billing", source="lmtp")
    with pytest.raises(Refused):
        transfer(rt, first.interaction_id, "support")  # it is support's already
    assert flush(rt) == 1

    got = samples(metrics)
    received = "mailrouter_messages_received_total"
    assert value(got, received, account="sales", source="smtp", result="deliver") == 2
    assert value(got, received, account="sales", source="imap", result="route") == 1
    assert value(got, received, account="billing", source="lmtp", result="hold") == 1
    decisions = "mailrouter_routing_decisions_total"
    assert value(got, decisions, rule="new-interaction", action="deliver") == 1
    assert value(got, decisions, rule="in-reply-to", action="deliver") == 1
    assert value(got, decisions, rule="in-reply-to", action="route") == 1
    assert value(got, decisions, rule="malformed", action="hold") == 1
    deliveries = "mailrouter_deliveries_total"
    assert value(got, deliveries, backend="maildir", status="sent") == 3
    assert value(got, deliveries, backend="pickup", status="sent") == 1
    assert value(got, "mailrouter_delivery_delay_seconds_count") == 4
    transfers = "mailrouter_transfers_total"
    assert value(got, transfers, from_account="sales", to_account="support", result="ok") == 1
    assert (
        value(got, transfers, from_account="support", to_account="support", result="same-account")
        == 1
    )
    notices = "mailrouter_notices_total"
    assert [value(got, notices, result=r) for r in ("queued", "sent", "suppressed", "failed")] == [
        1,
        1,
        0,
        0,
    ]
    assert value(got, "mailrouter_accept_duration_seconds_count") == 4
    assert value(got, "mailrouter_resolve_duration_seconds_count") == 4
    assert value(got, "mailrouter_build_info", version=__version__) == 1


def test_queue_and_interaction_gauges_are_read_from_the_store_at_scrape_time(
    measured: tuple[Runtime, PrometheusMetrics],
) -> None:
    """A queued delivery and a held message show up at the next scrape, and go with them."""
    rt, metrics = measured
    accept(rt, scenario(CHAIRS, "01-customer-asks.eml"), "sales")
    accept(rt, b"", "sales")
    got = samples(metrics)
    depth, age = "mailrouter_queue_messages", "mailrouter_queue_oldest_age_seconds"
    assert value(got, depth, queue="pending") == 1
    assert value(got, depth, queue="held-messages") == 1
    assert value(got, depth, queue="deferred") == 0
    assert value(got, age, queue="pending") >= 0
    assert value(got, "mailrouter_interactions", account="sales", state="open") == 1
    assert value(got, "mailrouter_interactions", account="sales", state="unread") == 1
    assert value(got, "mailrouter_interactions", account="support", state="open") == 0
    assert value(got, "mailrouter_store_up") == 1

    flush(rt)
    got = samples(metrics)
    assert value(got, depth, queue="pending") == 0
    assert value(got, age, queue="pending") == 0
    assert value(got, depth, queue="held-messages") == 1


def test_labels_never_carry_a_message_id_an_address_or_a_customer(
    measured: tuple[Runtime, PrometheusMetrics],
) -> None:
    """After real traffic, no label value contains an @ or a customer's name."""
    rt, metrics = measured
    first = accept(rt, scenario(CHAIRS, "01-customer-asks.eml"), "sales")
    assert first.interaction_id is not None
    flush(rt)
    with pytest.raises(Refused):
        transfer(rt, first.interaction_id, "nobody@nowhere.test")
    transfer(rt, first.interaction_id, "support@example.test")
    flush(rt)
    labels = {v for (_name, pairs) in samples(metrics) for _k, v in pairs}
    assert not [v for v in labels if "@" in v or "Anna" in v or "customer" in v]
    assert {"sales", "support", ""} <= labels  # the unknown target is counted as ""


def test_every_runtime_counts_into_its_own_registry(tmp_path: Path) -> None:
    """Two PrometheusMetrics never share a count, and the global registry stays empty."""
    a, b = PrometheusMetrics(), PrometheusMetrics()
    a.received("sales", "smtp", "deliver")
    assert value(samples(a), "mailrouter_messages_received_total", account="sales",
                 source="smtp", result="deliver") == 1  # fmt: skip
    assert not [k for k in samples(b) if k[0] == "mailrouter_messages_received_total"]
    assert not [m for m in REGISTRY.collect() if m.name.startswith("mailrouter")]


def test_metrics_off_costs_no_prometheus_import(tmp_path: Path) -> None:
    """A CLI command's runtime has the empty hooks: prometheus-client is never imported."""
    settings = make_settings(tmp_path)
    code = (
        "import sys\n"
        "from mailrouter.cli import main\n"
        f"assert main(['-c', {str(settings.config_path)!r}, 'ingest', "
        f"{str(ROOT / 'fixtures/scenarios/chairs-quote/01-customer-asks.eml')!r}]) == 0\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- listeners, IMAP


def _listener_settings(tmp_path: Path) -> Settings:
    text = f"""
state_dir = "{tmp_path / "state"}"
[templates]
directory = "{ROOT / "config" / "templates"}"
[smtp]
port = {free_port()}
[outbox]
poll_interval = 0.2
[accounts.sales]
address = "sales@example.test"
"""
    path = tmp_path / "mailrouter.toml"
    path.write_text(text)
    return load_from_text(text, path)


MESSAGE = b"From: carol@customer.test\r\nTo: sales@example.test\r\nSubject: hi\r\n"
MESSAGE += b"Message-ID: <m-1@customer.test>\r\n\r\nHello.\r\n"


def _session(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        assert c.sendmail("carol@customer.test", ["sales@example.test"], MESSAGE) == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            c.sendmail("carol@customer.test", ["nobody@elsewhere.test"], MESSAGE)


async def test_the_daemon_counts_its_smtp_replies_by_class(tmp_path: Path) -> None:
    """One session, one message and one unknown recipient: 2xx, 3xx (354) and a 5xx."""
    d = Daemon(_listener_settings(tmp_path))
    await d.startup()
    try:
        await asyncio.to_thread(_session, d.settings.smtp.port)
        got = await asyncio.to_thread(samples, d.metrics)
    finally:
        d.stop.set()
        await d.shutdown()
    replies = "mailrouter_smtp_replies_total"
    assert value(got, replies, listener="smtp", **{"class": "5xx"}) == 1  # 550 5.1.1
    assert value(got, replies, listener="smtp", **{"class": "3xx"}) == 1  # 354 for DATA
    # 220, EHLO, MAIL, RCPT, the 250 after DATA, RSET, MAIL again (the 550 RCPT is 5xx).
    assert value(got, replies, listener="smtp", **{"class": "2xx"}) >= 6
    received = "mailrouter_messages_received_total"
    assert value(got, received, account="sales", source="smtp", result="deliver") == 1


async def test_a_refused_imap_login_counts_as_a_reconnect(
    tmp_path: Path, dovecot_clean: Dovecot
) -> None:
    """Dovecot refuses the password: the watcher backs off, reconnects, and it is counted."""
    secret = tmp_path / "wrong-password"
    secret.write_text("not the password\n")
    text = f"""
state_dir = "{tmp_path / "state"}"
[templates]
directory = "{ROOT / "config" / "templates"}"
[smtp]
enabled = false
[accounts.sales]
address = "sales@example.test"
[accounts.sales.imap]
host = "{dovecot_clean.host}"
port = {dovecot_clean.imap_port}
password_file = "{secret}"
timeout = 5
"""
    path = tmp_path / "mailrouter.toml"
    path.write_text(text)
    settings = load_from_text(text, path)
    metrics = PrometheusMetrics()
    rt = await asyncio.to_thread(Runtime.open, settings, metrics=metrics)
    stop = asyncio.Event()
    watcher = ImapWatcher(Pipeline(rt), settings.account("sales"))
    task = asyncio.create_task(watcher.run(stop))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while loop.time() < deadline:
            got = await asyncio.to_thread(samples, metrics)
            if value(got, "mailrouter_imap_reconnects_total", account="sales") >= 1:
                break
            await asyncio.sleep(0.1)
        assert value(got, "mailrouter_imap_reconnects_total", account="sales") >= 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await rt.aclose()


# --------------------------------------------------------------------------- Grafana


def _dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text("utf-8"))
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_every_metric_the_dashboard_queries_is_in_the_scrape(
    measured: tuple[Runtime, PrometheusMetrics],
) -> None:
    """contrib/grafana/mailrouter.json asks only for names that render() exposes."""
    _rt, metrics = measured
    body = metrics.render()[0].decode()
    exposed = {
        family.name + suffix
        for family in text_string_to_metric_families(body)
        for suffix in ("", "_total", "_bucket", "_sum", "_count", "_created")
    }
    used = {name for q in _dashboard_queries() for name in re.findall(r"mailrouter_\w+", q)}
    assert used, "the dashboard queries no mailrouter metric"
    assert used <= exposed, sorted(used - exposed)
    # The panels: ingest rate, decisions by rule, queue depth and age, delivery
    # delay, transfers, notices.
    for name in (
        "mailrouter_messages_received_total",
        "mailrouter_routing_decisions_total",
        "mailrouter_queue_messages",
        "mailrouter_queue_oldest_age_seconds",
        "mailrouter_delivery_delay_seconds_bucket",
        "mailrouter_transfers_total",
        "mailrouter_notices_total",
    ):
        assert name in used, name


def test_the_scrape_passes_promtool_and_the_dashboard_queries_parse(
    tmp_path: Path, measured: tuple[Runtime, PrometheusMetrics]
) -> None:
    """`promtool check metrics` finds no naming problem; every panel query is valid PromQL."""
    promtool = shutil.which("promtool")
    need(promtool is not None, "promtool (Debian package prometheus) is not installed")
    assert promtool is not None
    rt, metrics = measured
    accept(rt, scenario(CHAIRS, "01-customer-asks.eml"), "sales")
    flush(rt)
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=metrics.render()[0], capture_output=True, timeout=60
    )
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr
    rules = tmp_path / "dashboard.rules.yml"
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for n, q in enumerate(_dashboard_queries()):
        lines += [f"      - record: dashboard:query{n}", f"        expr: {json.dumps(q)}"]
    rules.write_text("\n".join(lines).replace("$instance", ".*") + "\n")
    checked = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
