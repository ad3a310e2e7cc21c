"""``/api/v1/queue`` against a real ``mailrouter run``: the queue tools of ``mailrouter
queue`` for admins, with the same fields as ``queue --json`` and, when refused, the same
sentence the command prints; any other agent gets 403 before anything is looked up.

The daemon sends agent replies through a capture smarthost that greylists (451) or
refuses (550) on request, so the queue has deferred, failed, held and sent jobs; an
empty message ingested from the command line is a held message (``m…``).
"""

from __future__ import annotations

import itertools
import json
import re
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from served import Served, start, wait_until

import mailrouter.deliver.queue
from helpers import config_text, run_cli
from mailrouter.config import Settings, load
from mailrouter.http.problems import PROBLEM_JSON, PROBLEMS
from servers import CaptureSmarthost, TlsFiles, free_port

_seq = itertools.count(1)


@dataclass
class Q:
    served: Served
    smarthost: CaptureSmarthost
    tokens: dict[str, str]

    @property
    def settings(self) -> Settings:
        return self.served.settings

    def call(self, agent: str | None, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self.served.client(self.tokens[agent] if agent else None) as c:
            return c.request(method, "/api/v1/queue" + path, **kwargs)

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.call("root", method, path, **kwargs)
        assert r.status_code == 200, r.text
        return r.json()

    def cli(self, *args: str) -> Any:
        code, out, err = run_cli(self.settings, "queue", *args, "--json")
        assert code == 0, err
        return json.loads(out)

    def item(self, queue_id: str) -> dict[str, Any]:
        [found] = [
            r for r in self.ok("GET", "", params={"all": "true"}) if r["queue_id"] == queue_id
        ]
        return found


def settings_for(tmp_path: Path, smarthost: CaptureSmarthost) -> Settings:
    """helpers' three accounts; SMTP and HTTP on free ports; replies through the smarthost,
    retried only after an hour (a deferred job stays deferred while the test looks)."""
    text = config_text(tmp_path).replace(
        "[smtp]\nenabled = false\n", f"[smtp]\nport = {free_port()}\n"
    )
    text = text.replace(
        '[outbound]\ntype = "pickup"\npath = "pickup"\n',
        f'[outbound]\ntype = "smtp"\nhost = "{smarthost.host}"\nport = {smarthost.port}\n'
        'tls = "none"\ntimeout = 10\n',
    )
    text += (
        f"\n[http]\nenabled = true\nport = {free_port()}\n"
        "\n[outbox]\npoll_interval = 0.2\ninitial_backoff = 3600\nmax_backoff = 7200\n"
        "\n[daemon]\nshutdown_timeout = 10\n"
    )
    path = tmp_path / "mailrouter.toml"
    path.write_text(text, "utf-8")
    return load(path, env={})


@pytest.fixture(scope="module")
def q(tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles) -> Iterator[Q]:
    smarthost = CaptureSmarthost(tls=tls_files, starttls=False)
    smarthost.start()
    try:
        settings = settings_for(tmp_path_factory.mktemp("queue-api"), smarthost)
        served = start(settings)
        try:
            tokens = {}
            for name, args in {"root": ["--admin"], "alice": ["--account", "sales"]}.items():
                code, out, err = run_cli(settings, "agent", "add", name, *args)
                assert code == 0, err
                tokens[name] = out.strip()
            yield Q(served, smarthost, tokens)
        finally:
            assert served.stop() == 0, served.log()
    finally:
        smarthost.stop()


def customer_mail(q: Q, customer: str) -> int:
    """A customer writes to sales over SMTP; returns the interaction it opened."""
    n = next(_seq)
    raw = (
        f"From: {customer}\r\nTo: sales@example.test\r\nSubject: order {n}\r\n"
        f"Message-ID: <queue-api-{n}@customer.test>\r\n\r\nWhere is order {n}?\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", q.settings.smtp.port, timeout=30) as c:
        c.ehlo()
        c.mail(customer)
        c.rcpt("sales@example.test")
        code, reply = c.data(raw)
    assert code == 250, reply
    return int(reply.decode().rsplit("interaction=", 1)[1])


def reply_job(q: Q, customer: str) -> str:
    """An agent's reply to a new interaction of ``customer``: its queue id (``o…``)."""
    iid = customer_mail(q, customer)
    with q.served.client(q.tokens["root"]) as c:
        r = c.post(f"/api/v1/interactions/{iid}/reply", json={"body": "On its way."})
    assert r.status_code == 202, r.text
    message_id = r.json()["message_id"]
    rows = q.ok("GET", "", params={"all": "true"})
    [job] = [row for row in rows if row["kind"] == "reply" and row["message_id"] == message_id]
    return str(job["queue_id"])


def deferred_job(q: Q, customer: str) -> str:
    """A reply the smarthost greylisted once: pending, tried once, next try in an hour."""
    q.smarthost.fail_next(451, "4.7.1 greylisted, try again", at="data")
    qid = reply_job(q, customer)
    assert wait_until(lambda: q.item(qid)["attempts"] == 1)
    assert (q.item(qid)["status"], q.item(qid)["reason"]) == ("pending", "deferred")
    return qid


def cli_refusal(q: Q, *args: str) -> str:
    """What `mailrouter queue ARGS` says when it refuses (exit 1)."""
    code, _out, err = run_cli(q.settings, "queue", *args)
    assert code == 1, err
    [line] = [ln for ln in err.splitlines() if ln.startswith("mailrouter: ")]
    return line.removeprefix("mailrouter: ")


def assert_refused(r: httpx.Response, status: int, code: str, detail: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM_JSON
    body = r.json()
    assert (body["status"], body["code"], body["detail"]) == (status, code, detail)


# --------------------------------------------------------------------------- access

ALL = [
    ("GET", ""),
    ("GET", "/o1"),
    ("POST", "/o1/retry"),
    ("POST", "/retry-all"),
    ("POST", "/o1/hold"),
    ("POST", "/o1/release"),
    ("DELETE", "/o1"),
]


@pytest.mark.parametrize(("method", "path"), ALL, ids=[f"{m} {p}" for m, p in ALL])
def test_the_queue_is_for_admins_only(q: Q, method: str, path: str) -> None:
    """A non-admin is refused 403 (the same for an item that exists or not); no token 401."""
    before = q.cli("--all")
    r = q.call("alice", method, path)
    assert_refused(r, 403, "admin-only", "agent alice is not an admin")
    r = q.call("alice", method, path.replace("o1", "o999999"))
    assert r.status_code == 403
    assert q.call(None, method, path).status_code == 401
    assert q.cli("--all") == before


def test_unknown_and_malformed_ids(q: Q) -> None:
    """No such item: 404 with the command's sentence; not an id at all: 422."""
    for method, path in [("GET", "/o999999"), ("POST", "/o999999/retry"), ("DELETE", "/999999")]:
        r = q.call("root", method, path)
        assert_refused(r, 404, "not-found", cli_refusal(q, "retry", "o999999"))
    r = q.call("root", "GET", "/x12")
    assert_refused(r, 422, "bad-queue-id", cli_refusal(q, "retry", "x12"))


# --------------------------------------------------------------------------- reading


def test_list_and_show_are_queue_json(q: Q) -> None:
    """GET /queue is `queue --json`, `?all=true` is `queue --all --json`, GET /queue/ID is
    `queue show ID --json` — the attempt log with the server's reply included."""
    qid = deferred_job(q, "dana@customer.test")
    assert q.ok("GET", "") == q.cli()
    assert q.ok("GET", "", params={"all": "true"}) == q.cli("--all")
    shown = q.ok("GET", f"/{qid}")
    assert shown == q.cli("show", qid)
    [attempt] = shown["attempt_log"]
    assert attempt["status"] == "deferred" and "451 4.7.1 greylisted" in attempt["reply"]
    assert shown["headers"]["To"] == "dana@customer.test"
    assert q.ok("GET", "/" + qid.removeprefix("o")) == shown  # a bare number is a job
    r = q.call("root", "GET", "", params={"limit": 1})
    assert len(r.json()) == 1


# --------------------------------------------------------------------------- changing


def test_hold_retry_all_release_then_the_daemon_sends_it(q: Q) -> None:
    """hold parks a deferred job (retry-all leaves it); release lets the daemon send it;
    after that every change is refused in the command's words."""
    qid = deferred_job(q, "erin@customer.test")
    held = q.ok("POST", f"/{qid}/hold")
    assert held == {
        "queue_id": qid,
        "status": "held",
        "action": None,
        "rule": None,
        "interaction": None,
        "reason": None,
        "job": None,
    }
    assert_refused(
        q.call("root", "POST", f"/{qid}/hold"), 409, "already-held", cli_refusal(q, "hold", qid)
    )
    assert_refused(
        q.call("root", "POST", f"/{qid}/retry"), 409, "held", cli_refusal(q, "retry", qid)
    )
    # retry-all makes every *pending* job due (other tests' too); a held one stays held.
    assert set(q.ok("POST", "/retry-all")) == {"made_due"}
    assert q.item(qid)["status"] == "held"

    sent_before = len(q.smarthost.messages)
    assert q.ok("POST", f"/{qid}/release")["status"] == "pending"
    assert wait_until(lambda: q.item(qid)["status"] == "sent")
    assert q.smarthost.messages[sent_before].rcpt_tos == ("erin@customer.test",)
    for method, path, args in [
        ("POST", f"/{qid}/retry", ("retry", qid)),
        ("POST", f"/{qid}/hold", ("hold", qid)),
        ("DELETE", f"/{qid}", ("delete", "--yes", qid)),
    ]:
        r = q.call("root", method, path)
        assert_refused(r, 409, "already-sent", cli_refusal(q, *args))
    assert_refused(
        q.call("root", "POST", f"/{qid}/release"), 409, "not-held", cli_refusal(q, "release", qid)
    )


def test_retry_all_makes_deferred_jobs_due_and_the_daemon_sends_them(q: Q) -> None:
    """`postqueue -f`: a job deferred for an hour is sent right after retry-all."""
    qid = deferred_job(q, "fay@customer.test")
    assert q.ok("POST", "/retry-all")["made_due"] >= 1
    assert wait_until(lambda: q.item(qid)["status"] == "sent")
    assert [a["status"] for a in q.ok("GET", f"/{qid}")["attempt_log"]] == ["deferred", "sent"]


def test_failed_job_is_retried_or_deleted_never_the_message(q: Q) -> None:
    """550 fails a job for good; retry gives it a fresh try (refused again: failed); delete
    drops it, and the stored message stays in its interaction."""
    q.smarthost.refuse("gus@customer.test", 550, "5.1.1 no such user")
    qid = reply_job(q, "gus@customer.test")
    assert wait_until(lambda: q.item(qid)["status"] == "failed")
    assert q.item(qid)["reason"] == "bounced"

    assert q.ok("POST", f"/{qid}/retry")["status"] == "pending"
    assert wait_until(lambda: q.item(qid)["status"] == "failed")
    assert_refused(
        q.call("root", "POST", f"/{qid}/hold"), 409, "failed", cli_refusal(q, "hold", qid)
    )

    shown = q.ok("GET", f"/{qid}")
    assert q.ok("DELETE", f"/{qid}")["status"] == "deleted"
    assert qid not in {r["queue_id"] for r in q.ok("GET", "")}
    assert q.item(qid)["status"] == "deleted"
    assert_refused(
        q.call("root", "DELETE", f"/{qid}"), 409, "deleted", cli_refusal(q, "delete", "--yes", qid)
    )
    with q.served.client(q.tokens["root"]) as c:
        messages = c.get(f"/api/v1/interactions/{shown['interaction']}").json()["messages"]
    # The question and the reply are both still stored; only the delivery job is gone.
    assert [m["direction"] for m in messages] == ["inbound", "outbound"]


def test_held_message_is_shown_and_released_not_retried_or_deleted(q: Q, tmp_path: Path) -> None:
    """An empty message is held (m…): shown as `queue show`, retry/hold/delete refused in
    the command's words; release routes it again, and it is held again, with its reason."""
    empty = tmp_path / "empty.eml"
    empty.write_bytes(b"")
    code, _out, err = run_cli(
        q.settings, "ingest", "--account", "sales", "--queue-only", str(empty)
    )
    assert code in (0, 1), err
    [mid] = [r["queue_id"] for r in q.ok("GET", "") if r["kind"] == "message"]
    shown = q.ok("GET", f"/{mid}")
    assert shown == q.cli("show", mid)
    assert (shown["status"], shown["reason"]) == ("held", "empty message")
    for method, path, code_, args in [
        ("POST", f"/{mid}/retry", "not-a-job", ("retry", mid)),
        ("POST", f"/{mid}/hold", "already-held", ("hold", mid)),
        ("DELETE", f"/{mid}", "not-a-job", ("delete", "--yes", mid)),
    ]:
        assert_refused(q.call("root", method, path), 409, code_, cli_refusal(q, *args))
    released = q.ok("POST", f"/{mid}/release")
    assert (released["queue_id"], released["status"], released["action"]) == (mid, "held", "hold")
    assert released["reason"] == "empty message"


def test_every_queue_refusal_has_its_status_in_the_one_table() -> None:
    """Each code deliver/queue.py refuses with is mapped in http/problems.py (none falls
    through to the 409 default unnoticed)."""
    source = Path(mailrouter.deliver.queue.__file__).read_text("utf-8")
    codes = set(re.findall(r'Refused\(\s*"([a-z-]+)"', source))
    assert {"bad-queue-id", "not-a-job", "already-held", "being-delivered"} <= codes
    assert codes - set(PROBLEMS) == set()
    assert PROBLEMS["bad-queue-id"].status == 422 and PROBLEMS["not-found"].status == 404
