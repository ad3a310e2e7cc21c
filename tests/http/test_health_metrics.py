"""``/metrics`` and ``/healthz?verbose=1`` on a real ``mailrouter run``: Prometheus scrapes
counters that move as mail comes in over SMTP and is delivered; an admin gets the status
report with the daemon's live state, anyone else the small public answer."""

from __future__ import annotations

import json
import smtplib
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from served import Served, http_settings, start, wait_until

from helpers import maildir_messages, run_cli
from mailrouter import __version__
from mailrouter.metrics import CONTENT_TYPE

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, dict[str, str]]]:
    """The daemon, an admin's token and a sales agent's."""
    settings = http_settings(tmp_path_factory.mktemp("ops-http"))
    s = start(settings)
    try:
        tokens = {}
        for name, args in {"root": ["--admin"], "alice": ["--account", "sales"]}.items():
            code, out, err = run_cli(settings, "agent", "add", name, *args)
            assert code == 0, err
            tokens[name] = out.strip()
        yield s, tokens
    finally:
        assert s.stop() == 0, s.log()


def scrape(served: Served) -> Samples:
    with served.client() as c:
        r = c.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == CONTENT_TYPE
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(got: Samples, name: str, **labels: str) -> float:
    return got.get((name, frozenset(labels.items())), 0.0)


def send(served: Served, n: int, *, in_reply_to: str | None = None) -> None:
    refs = f"In-Reply-To: <{in_reply_to}>\r\n" if in_reply_to else ""
    raw = (
        f"From: Customer <metrics{n}@customer.test>\r\nTo: sales@example.test\r\n"
        f"Subject: metrics {n}\r\nMessage-ID: <metrics-{n}@customer.test>\r\n{refs}\r\n"
        f"Hello {n}.\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", served.settings.smtp.port, timeout=30) as c:
        assert c.sendmail(f"metrics{n}@customer.test", ["sales@example.test"], raw) == {}


def test_metrics_scrape_moves_with_mail_flowing(served: tuple[Served, dict[str, str]]) -> None:
    """Two messages over SMTP, delivered into the Maildir: the received, decision,
    delivery and SMTP reply counters each move by what happened, gauges are read."""
    s, _ = served
    before = scrape(s)
    assert value(before, "mailrouter_build_info", version=__version__) == 1
    assert value(before, "mailrouter_store_up") == 1
    delivered = len(maildir_messages(s.settings, "sales"))

    send(s, 1)
    send(s, 2, in_reply_to="metrics-1@customer.test")
    assert wait_until(lambda: len(maildir_messages(s.settings, "sales")) == delivered + 2)
    # The worker counts a delivery after the file is in place: scrape until it has.
    after: Samples = {}

    def counted() -> bool:
        nonlocal after
        after = scrape(s)
        got = value(after, "mailrouter_deliveries_total", backend="maildir", status="sent")
        return (
            got - value(before, "mailrouter_deliveries_total", backend="maildir", status="sent")
            >= 2
        )

    assert wait_until(counted), after

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert (
        moved(
            "mailrouter_messages_received_total", account="sales", source="smtp", result="deliver"
        )
        == 2
    )
    assert (
        moved("mailrouter_routing_decisions_total", rule="new-interaction", action="deliver") == 1
    )
    assert moved("mailrouter_routing_decisions_total", rule="in-reply-to", action="deliver") == 1
    assert moved("mailrouter_smtp_replies_total", listener="smtp", **{"class": "2xx"}) >= 2
    assert moved("mailrouter_accept_duration_seconds_count") == 2
    assert moved("mailrouter_delivery_delay_seconds_count") >= 2
    assert value(after, "mailrouter_interactions", account="sales", state="open") >= 1
    assert value(after, "mailrouter_queue_messages", queue="pending") == 0


def test_metrics_is_not_in_the_openapi_document(served: tuple[Served, dict[str, str]]) -> None:
    s, _ = served
    with s.client() as c:
        paths = c.get("/api/v1/openapi.json").json()["paths"]
    assert "/metrics" not in paths and "/healthz" in paths


def test_healthz_verbose_for_an_admin_is_status_json_with_live_state(
    served: tuple[Served, dict[str, str]],
) -> None:
    """An admin's `?verbose=1` is `mailrouter status --json`, plus the daemon's live view."""
    s, tokens = served
    with s.client(tokens["root"]) as c:
        r = c.get("/healthz", params={"verbose": 1})
    assert r.status_code == 200, r.text
    got = r.json()
    code, out, err = run_cli(s.settings, "status", "--json")
    assert code == 0, err
    cli = json.loads(out)
    live = got.pop("live")
    # The same report; only the moment it was taken (and so the ages) differ.
    for report in (got, cli):
        report.pop("checked_at")
        for q in report["queue"].values():
            q.pop("oldest_age_seconds")
    assert got == cli
    assert got["ok"] is True and got["version"] == __version__
    assert live["phase"] == "accepting"
    assert live["listening"] == {
        "smtp": [f"127.0.0.1:{s.settings.smtp.port}"],
        "http": [f"127.0.0.1:{s.settings.http.port}"],
    }
    assert live["pid"] == s.proc.pid
    assert live["reload_refused"] is False and live["imap"] == {}
    assert live["uptime_seconds"] > 0


@pytest.mark.parametrize("who", [None, "alice"], ids=["no-token", "not-admin"])
def test_healthz_verbose_without_an_admin_stays_the_public_answer(
    served: tuple[Served, dict[str, str]], who: str | None
) -> None:
    s, tokens = served
    with s.client(tokens[who] if who else None) as c:
        for params in ({}, {"verbose": 1}):
            r = c.get("/healthz", params=params)
            assert r.status_code == 200
            assert r.json() == {"status": "ok", "version": __version__}


def test_healthz_verbose_with_a_bad_token_is_401(served: tuple[Served, dict[str, str]]) -> None:
    """A token that does not authenticate is refused, as everywhere; without verbose it is
    not even looked at (a load balancer's headers never make /healthz fail)."""
    s, _ = served
    with s.client("mrt_0000000000000000_nope") as c:
        r = c.get("/healthz", params={"verbose": 1})
        assert r.status_code == 401
        body: dict[str, Any] = r.json()
        assert body["code"] == "bad-token"
        assert c.get("/healthz").status_code == 200
