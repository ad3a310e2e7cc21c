"""The queue tools (``mailrouter queue …``) against a real store, the real outbox worker and
a real smarthost on loopback that fails on request.

Ids say their kind: ``m<N>`` is a held message, ``o<N>`` an outbox job.  Every action is
a domain operation that refuses with a code and changes nothing when it refuses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import mailrouter.pipeline
from helpers import accept, config_text, make_settings, pipeline, run_cli, scenario
from mailrouter.config import Settings, load
from mailrouter.deliver import queue
from mailrouter.deliver.outbox import OutboxWorker
from mailrouter.errors import Refused
from mailrouter.store.models import Outbox
from mailrouter.transfer import transfer
from servers import CaptureSmarthost

# Every test here runs on SQLite and on the real PostgreSQL (tests/servers.py).
pytestmark = pytest.mark.usefixtures("backend")

CHAIRS = "chairs-quote"
PICKUP = '[outbound]\ntype = "pickup"\npath = "pickup"\n'


def smtp_settings(tmp_path: Path, host: CaptureSmarthost) -> Settings:
    """The test accounts with notices sent over SMTP to ``host``; retries an hour apart."""
    text = config_text(tmp_path).replace(
        PICKUP,
        "[outbound]\n"
        'type = "smtp"\n'
        f'host = "{host.host}"\n'
        f"port = {host.port}\n"
        'tls = "none"\n'
        "timeout = 10\n",
    )
    text += "\n[outbox]\ninitial_backoff = 3600\nmax_backoff = 7200\n"
    path = tmp_path / "mailrouter.toml"
    path.write_text(text, "utf-8")
    return load(path, env={})


def cli(settings: Settings, *args: str) -> tuple[int, str, str]:
    return run_cli(settings, *args)


def cli_json(settings: Settings, *args: str) -> Any:
    code, out, err = run_cli(settings, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def notice_job(settings: Settings) -> int:
    """Customer mail to sales, delivered; its transfer to support queues a notice: its job."""
    with pipeline(settings) as p:
        first = accept(p, scenario(CHAIRS, "01-customer-asks.eml"), "sales")
        assert first.interaction_id is not None
        assert _flush(p) == 1  # the delivery into sales' Maildir
        r = transfer(p, first.interaction_id, "support", actor="bob")
    assert r.outbox_id is not None
    return r.outbox_id


def _flush(p: Any) -> int:
    import asyncio

    return asyncio.run(OutboxWorker(p).run_once())


def item(settings: Settings, queue_id: str) -> dict[str, Any]:
    [found] = [r for r in cli_json(settings, "queue", "--all") if r["queue_id"] == queue_id]
    return found


def held_by_a_routing_bug(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> int:
    """A real message held because the routing code crashed (internal-error): its key."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated routing bug")

    with pipeline(settings) as p:
        monkeypatch.setattr(mailrouter.pipeline, "decide", broken)
        held = accept(p, scenario(CHAIRS, "01-customer-asks.eml"), "sales")
        monkeypatch.undo()
    assert held.decision.action == "hold" and held.message_pk is not None
    return held.message_pk


# --------------------------------------------------------------------------- list, show


def test_list_shows_held_messages_and_outbox_jobs_in_one_view(
    tmp_path: Path, capture_smarthost: CaptureSmarthost
) -> None:
    """A held message (m…) and a deferred notice (o…): reason, attempts, next try, error."""
    settings = smtp_settings(tmp_path, capture_smarthost)
    job = notice_job(settings)
    capture_smarthost.fail_next(451, "4.7.1 greylisted, try again", at="data")
    with pipeline(settings) as p:
        assert _flush(p) == 1
        held = accept(p, b"", "billing")
    rows = cli_json(settings, "queue")
    by_id = {r["queue_id"]: r for r in rows}
    assert set(by_id) == {f"o{job}", f"m{held.message_pk}"}
    notice = by_id[f"o{job}"]
    assert (notice["id"], notice["kind"], notice["status"], notice["attempts"]) == (
        job,
        "notify",
        "pending",
        1,
    )
    assert notice["reason"] == "deferred" and notice["next_attempt_at"] is not None
    assert "451 4.7.1 greylisted" in notice["last_error"]
    message = by_id[f"m{held.message_pk}"]
    assert (message["kind"], message["status"], message["account"]) == (
        "message",
        "held",
        "billing",
    )
    assert message["reason"] == "empty message" and message["to"] == "billing@example.test"

    code, out, _ = cli(settings, "queue", "list")
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split()[:3] == ["QUEUE_ID", "KIND", "STATUS"]
    assert any(line.startswith(f"o{job} ") and "deferred" in line for line in lines)
    assert lines[-1] == "-- 1 held-message, 1 pending"
    # The group's flags and the action's both work, in either place.
    assert (
        cli_json(settings, "queue", "list")
        == rows
        == json.loads(cli(settings, "queue", "--json", "list")[1])
    )


def test_show_has_every_attempt_with_the_server_reply(
    tmp_path: Path, capture_smarthost: CaptureSmarthost
) -> None:
    """451 then 250: `queue show o…` lists both attempts with relay, DSN and the reply."""
    settings = smtp_settings(tmp_path, capture_smarthost)
    job = notice_job(settings)
    capture_smarthost.fail_next(451, "4.7.1 greylisted, try again", at="data")
    with pipeline(settings) as p:
        assert _flush(p) == 1
    assert cli(settings, "queue", "retry", f"o{job}")[0] == 0
    shown = cli_json(settings, "queue", "show", f"o{job}")
    assert shown["status"] == "sent" and shown["headers"]["To"]
    relay = f"smtp:{capture_smarthost.host}:{capture_smarthost.port}"
    assert [(a["attempt"], a["status"], a["relay"], a["dsn"]) for a in shown["attempt_log"]] == [
        (1, "deferred", relay, "4.7.1"),
        (2, "sent", relay, "2.0.0"),
    ]
    assert "451 4.7.1 greylisted, try again" in shown["attempt_log"][0]["reply"]
    assert shown["attempt_log"][1]["reply"] == "250 2.0.0 OK captured"
    code, out, _ = cli(settings, "queue", "show", str(job))  # a bare number is a job
    assert code == 0 and "#2" in out and "250 2.0.0 OK captured" in out


# --------------------------------------------------------------------------- retry


@pytest.mark.parametrize("how", [("retry", "--all"), ("flush",)])
def test_retry_all_tries_a_deferred_job_now_like_postqueue_f(
    tmp_path: Path, capture_smarthost: CaptureSmarthost, how: tuple[str, ...]
) -> None:
    """The relay is back an hour before the next try: `retry --all` sends it now."""
    settings = smtp_settings(tmp_path, capture_smarthost)
    job = notice_job(settings)
    capture_smarthost.fail_next(421, "4.3.2 shutting down", at="mail")
    with pipeline(settings) as p:
        assert _flush(p) == 1
        assert _flush(p) == 0  # not due for an hour: what `queue flush` used to try
    code, out, err = cli(settings, "queue", *how)
    assert (code, out.strip()) == (0, "attempted 1 item(s)"), err
    assert item(settings, f"o{job}")["status"] == "sent"
    [got] = capture_smarthost.messages
    assert got.rcpt_tos == ("anna.berg@customer.example",)  # the notice answers 01


def test_retry_all_leaves_failed_and_held_jobs_alone(
    tmp_path: Path, capture_smarthost: CaptureSmarthost
) -> None:
    """`retry --all` is for what waits: a 5xx job stays failed, a held one stays held."""
    settings = smtp_settings(tmp_path, capture_smarthost)
    job = notice_job(settings)
    capture_smarthost.fail_next(550, "5.7.1 rejected by policy", at="data")
    with pipeline(settings) as p:
        assert _flush(p) == 1
    assert cli_json(settings, "queue", "retry", "--all") == {"made_due": 0, "attempted": 0}
    assert item(settings, f"o{job}")["status"] == "failed"
    assert capture_smarthost.messages == []


def test_retry_of_a_failed_job_sends_it_after_the_cause_is_fixed(
    tmp_path: Path, capture_smarthost: CaptureSmarthost
) -> None:
    """550, fixed at the smarthost, `queue retry o…`: sent, with a fresh lifetime."""
    settings = smtp_settings(tmp_path, capture_smarthost)
    job = notice_job(settings)
    capture_smarthost.fail_next(550, "5.7.1 rejected by policy", at="data")
    with pipeline(settings) as p:
        assert _flush(p) == 1
    failed = item(settings, f"o{job}")
    assert (failed["status"], failed["reason"]) == ("failed", "bounced")
    code, out, err = cli(settings, "queue", "retry", f"o{job}")
    assert (code, out.splitlines()) == (0, [f"o{job}: pending", "attempted 1 item(s)"]), err
    sent = item(settings, f"o{job}")
    assert (sent["status"], sent["attempts"]) == ("sent", 2)
    assert len(capture_smarthost.messages) == 1


# --------------------------------------------------------------------------- hold, release


def test_a_held_job_is_never_attempted_until_released(
    tmp_path: Path, capture_smarthost: CaptureSmarthost
) -> None:
    """hold: the worker passes it by (retry --all too); release: due now, and sent."""
    settings = smtp_settings(tmp_path, capture_smarthost)
    job = notice_job(settings)
    code, out, err = cli(settings, "queue", "hold", f"o{job}")
    assert (code, out.strip()) == (0, f"o{job}: held"), err
    held = item(settings, f"o{job}")
    assert (held["status"], held["reason"]) == ("held", "held by operator")
    with pipeline(settings) as p:
        assert _flush(p) == 0
    assert cli(settings, "queue", "retry", "--all")[1].strip() == "attempted 0 item(s)"
    assert capture_smarthost.messages == []

    code, out, err = cli(settings, "queue", "release", f"o{job}")
    assert (code, out.splitlines()) == (0, [f"o{job}: pending", "attempted 1 item(s)"]), err
    assert item(settings, f"o{job}")["status"] == "sent"
    assert len(capture_smarthost.messages) == 1


def test_release_of_a_held_message_routes_it_and_keeps_its_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`queue release m…` is `release`: routed again, delivered, still message N."""
    settings = make_settings(tmp_path)
    pk = held_by_a_routing_bug(settings, monkeypatch)
    assert [r["queue_id"] for r in cli_json(settings, "queue")] == [f"m{pk}"]
    code, out, err = cli(settings, "queue", "release", f"m{pk}")
    assert code == 0, err
    first, second = out.splitlines()
    assert first.startswith(f"m{pk}: deliver interaction=1 rule=new-interaction job=o")
    assert second == "attempted 1 item(s)"
    assert cli_json(settings, "queue") == []
    shown = cli_json(settings, "show", "1")
    assert [m["status"] for m in shown["messages"]] == ["stored"]


def test_release_of_a_still_broken_message_keeps_it_held_under_the_same_id(
    tmp_path: Path,
) -> None:
    """An empty message released again is held again (exit 1), and is still m<N>."""
    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        held = accept(p, b"", "sales")
    code, out, _ = cli(settings, "queue", "release", f"m{held.message_pk}")
    assert code == 1 and out.strip() == (
        f"m{held.message_pk}: hold interaction=- rule=malformed reason='empty message'"
    )
    assert [r["queue_id"] for r in cli_json(settings, "queue")] == [f"m{held.message_pk}"]


# --------------------------------------------------------------------------- delete


def test_delete_wants_yes_off_a_terminal_and_changes_nothing_without_it(
    tmp_path: Path, capture_smarthost: CaptureSmarthost
) -> None:
    """stdin is not a terminal here: without --yes, exit 1 and the job is still pending."""
    settings = smtp_settings(tmp_path, capture_smarthost)
    job = notice_job(settings)
    code, _, err = cli(settings, "queue", "delete", f"o{job}")
    assert code == 1 and "--yes" in err
    assert item(settings, f"o{job}")["status"] == "pending"


def test_delete_drops_the_job_and_never_the_stored_message(
    tmp_path: Path, capture_smarthost: CaptureSmarthost
) -> None:
    """`delete o… --yes`: never attempted again; the notice stays stored on its interaction."""
    settings = smtp_settings(tmp_path, capture_smarthost)
    job = notice_job(settings)
    before = cli_json(settings, "show", "1")["messages"]
    code, out, err = cli(settings, "queue", "delete", f"o{job}", "--yes")
    assert (code, out.strip()) == (0, f"o{job}: deleted"), err
    assert cli_json(settings, "queue") == []
    assert item(settings, f"o{job}")["status"] == "deleted"  # kept for trace (queue --all)
    with pipeline(settings) as p:
        assert _flush(p) == 0
    assert cli(settings, "queue", "retry", "--all")[0] == 0
    assert capture_smarthost.messages == []
    assert cli_json(settings, "show", "1")["messages"] == before
    [t] = cli_json(settings, "show", "1")["transfers"]
    assert t["notification"] == "queued"  # what the transfer did; trace says what followed


def test_delete_refuses_a_held_message(tmp_path: Path) -> None:
    """A held message is a stored message: `delete m…` is refused and it stays."""
    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        held = accept(p, b"", "sales")
    code, _, err = cli(settings, "queue", "delete", f"m{held.message_pk}", "--yes")
    assert code == 1 and "never a stored message" in err
    assert len(cli_json(settings, "held")) == 1


# --------------------------------------------------------------------------- refusals


def _claimed(p: Any) -> None:
    OutboxWorker(p).claim(10)  # a worker took it and is delivering it now


@pytest.mark.parametrize(
    ("op", "qid", "state", "code"),
    [
        (queue.retry, "o{job}", "sent", "already-sent"),
        (queue.retry, "o{job}", "held", "held"),
        (queue.retry, "m{msg}", "", "not-a-job"),
        (queue.hold, "o{job}", "sending", "being-delivered"),
        (queue.hold, "o{job}", "held", "already-held"),
        (queue.hold, "m{msg}", "", "already-held"),
        (queue.release, "o{job}", "", "not-held"),
        (queue.delete, "o{job}", "sent", "already-sent"),
        (queue.delete, "o{job}", "sending", "being-delivered"),
        (queue.delete, "m{msg}", "", "not-a-job"),
        (queue.retry, "o999", "", "not-found"),
        (queue.release, "m999", "", "not-found"),
    ],
)
def test_refusals_carry_a_code_and_change_nothing(
    tmp_path: Path, op: Any, qid: str, state: str, code: str
) -> None:
    """Each operation refuses in its own words (code + sentence) and leaves the row as it was."""
    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        ok = accept(p, scenario(CHAIRS, "01-customer-asks.eml"), "sales")
        held = accept(p, b"", "sales")
        assert ok.outbox_id is not None
        if state == "sent":
            assert _flush(p) == 1
        elif state == "sending":
            _claimed(p)
        elif state == "held":
            queue.hold(p, queue.parse_id(f"o{ok.outbox_id}"))
        target = queue.parse_id(qid.format(job=ok.outbox_id, msg=held.message_pk))
        before = _rows(p)
        with pytest.raises(Refused) as refused:
            op(p, target)
        assert refused.value.code == code and refused.value.message
        assert _rows(p) == before


def _rows(p: Any) -> list[tuple[Any, ...]]:
    from sqlalchemy import select

    from mailrouter.store.models import Message

    with p.db.read() as s:
        jobs = [
            (o.id, o.status, o.attempts, o.next_attempt_at, o.deadline)
            for o in s.scalars(select(Outbox).order_by(Outbox.id)).unique()
        ]
        messages = [
            (m.id, m.status, m.hold_reason)
            for m in s.scalars(select(Message).order_by(Message.id)).unique()
        ]
    return [*jobs, *messages]


@pytest.mark.parametrize("text", ["x12", "o", "12m", "o-1", ""])
def test_a_queue_id_that_is_not_one_is_refused(text: str) -> None:
    """Ids are m<N>, o<N> or <N>; anything else is refused with bad-queue-id."""
    with pytest.raises(Refused) as refused:
        queue.parse_id(text)
    assert refused.value.code == "bad-queue-id"


def test_several_ids_each_get_their_answer_and_one_refusal_is_exit_1(tmp_path: Path) -> None:
    """`queue hold o1 o999`: o1 is held, o999 refused on stderr; exit 1."""
    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        ok = accept(p, scenario(CHAIRS, "01-customer-asks.eml"), "sales")
    code, out, err = cli(settings, "queue", "hold", f"o{ok.outbox_id}", "o999")
    assert code == 1
    assert out.strip() == f"o{ok.outbox_id}: held"
    assert "mailrouter: no queue item o999" in err
    assert "event=refused" in err and "code=not-found" in err


# --------------------------------------------------------------------------- both stores


@pytest.fixture
def store_settings(tmp_path: Path) -> Settings:
    """The test accounts on this test's store (the module runs on both)."""
    return make_settings(tmp_path)


def test_every_action_locks_and_changes_its_row_on_both_stores(store_settings: Settings) -> None:
    """hold, release, retry, delete, the listing and the depth on SQLite and PostgreSQL."""
    from mailrouter.metrics import PrometheusMetrics
    from mailrouter.runtime import Runtime

    metrics = PrometheusMetrics()
    p = Runtime.open(store_settings, metrics=metrics)
    try:
        ok = accept(p, scenario(CHAIRS, "01-customer-asks.eml"), "sales")
        accept(p, b"", "sales")
        qid = queue.parse_id(f"o{ok.outbox_id}")
        assert queue.hold(p, qid).status == "held"
        assert _flush(p) == 0
        assert queue.release(p, qid).status == "pending"
        assert queue.retry(p, qid).status == "pending"
        with p.db.read() as s:
            depth = queue.depth(s)
            listed = {r["queue_id"] for r in queue.list_queue(s)}
        assert listed == {f"o{qid.number}", "m2"}
        assert (depth["pending"][0], depth["held-messages"][0]) == (1, 1)
        assert b'mailrouter_queue_messages{queue="pending"} 1.0' in metrics.render()[0]
        assert queue.delete(p, qid).status == "deleted"
        assert _flush(p) == 0
    finally:
        p.close()
