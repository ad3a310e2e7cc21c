"""The JSON API against a real ``mailrouter run`` over HTTP: every endpoint, every access
rule (three agents on three accounts, and an admin), the pick conflict, each refusal as
problem+json with the store unchanged, token rotation and removal, idempotent replies.

One daemon serves the whole module (starting one takes seconds); each test sends its own
customer mail over SMTP, so it works on interactions no other test touches.
"""

from __future__ import annotations

import itertools
import json
import smtplib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from served import Served, http_settings, start, wait_until
from sqlalchemy import func, select

from helpers import counts, pickup_messages, run_cli
from mailrouter.http.problems import PROBLEM_JSON
from mailrouter.runtime import Runtime
from mailrouter.store.models import IdempotencyKey, Interaction, Outbox
from mailrouter.views import interaction_detail, interaction_dict
from servers import store_at

_seq = itertools.count(1)


@dataclass
class Desk:
    """The daemon, an open runtime on its store (for looking, never for changing), tokens."""

    served: Served
    rt: Runtime
    tokens: dict[str, str]

    def client(self, agent: str) -> httpx.Client:
        return self.served.client(self.tokens[agent])

    def call(self, agent: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self.client(agent) as c:
            return c.request(method, path, **kwargs)


@pytest.fixture(scope="module")
def desk(tmp_path_factory: pytest.TempPathFactory, module_database_url: str) -> Iterator[Desk]:
    """The daemon with agents alice and dave (sales), bob (support), carol (billing), root;
    once on SQLite, once on the real PostgreSQL (a database of its own)."""
    with store_at(module_database_url):
        settings = http_settings(tmp_path_factory.mktemp("api"))
    served = start(settings)
    try:
        tokens = {}
        for name, args in {
            "alice": ["--account", "sales"],
            "dave": ["--account", "sales"],
            "bob": ["--account", "support"],
            "carol": ["--account", "billing"],
            "root": ["--admin"],
        }.items():
            code, out, err = run_cli(settings, "agent", "add", name, *args)
            assert code == 0, err
            tokens[name] = out.strip()
        rt = Runtime.open(settings)
        try:
            yield Desk(served, rt, tokens)
        finally:
            rt.close()
    finally:
        assert served.stop() == 0, served.log()


def send(desk: Desk, to: str, *, extra_headers: str = "", reply_to: str | None = None) -> int:
    """A new customer mail to ``to`` over SMTP; returns the interaction it opened."""
    n = next(_seq)
    refs = f"In-Reply-To: <{reply_to}>\r\n" if reply_to else ""
    raw = (
        f"From: Customer {n} <customer{n}@customer.test>\r\n"
        f"To: {to}\r\n"
        f"Subject: question {n}\r\n"
        f"Message-ID: <api-{n}@customer.test>\r\n"
        f"{refs}{extra_headers}"
        "\r\n"
        f"Hello, question number {n}.\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", desk.served.settings.smtp.port, timeout=30) as c:
        c.ehlo()
        c.mail(f"customer{n}@customer.test")
        c.rcpt(to)
        code, reply = c.data(raw)
    assert code == 250, reply
    # "250 2.0.0 OK deliver interaction=N": the answer names the interaction.
    return int(reply.decode().rsplit("interaction=", 1)[1])


def _quiet(rt: Runtime) -> bool:
    with rt.db.read() as s:
        busy = s.scalar(
            select(func.count())
            .select_from(Outbox)
            .where(Outbox.status.in_(("pending", "sending")))
        )
    return not busy


def snapshot(desk: Desk) -> dict[str, Any]:
    """The store as a refused request must leave it, read once the outbox is idle."""
    assert wait_until(lambda: _quiet(desk.rt)), "the outbox did not settle"
    with desk.rt.db.read() as s:
        ids = s.scalars(select(Interaction.id).order_by(Interaction.id))
        details = [interaction_detail(s, i) for i in ids]
        keys = s.scalar(select(func.count()).select_from(IdempotencyKey))
    return {"details": details, "keys": keys, **counts(desk.rt)}


def detail(desk: Desk, interaction_id: int) -> dict[str, Any]:
    with desk.rt.db.read() as s:
        out = interaction_detail(s, interaction_id)
    assert out is not None
    return out


def assert_problem(r: httpx.Response, status: int, code: str, detail: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM_JSON
    body = r.json()
    assert (body["status"], body["code"]) == (status, code)
    assert body["type"] == f"/api/v1/problems/{code}"
    assert body["title"] and body["detail"]
    if detail is not None:
        assert body["detail"] == detail


# --------------------------------------------------------------------------- reading


def test_accounts_are_the_agents_own_with_counts(desk: Desk) -> None:
    """GET /accounts: an agent gets its accounts, an admin every one; counts are live."""
    before = {a["name"]: a for a in desk.call("root", "GET", "/api/v1/accounts").json()}
    assert list(before) == ["sales", "support", "billing"]
    send(desk, "billing@example.test")
    [billing] = desk.call("carol", "GET", "/api/v1/accounts").json()
    assert billing["name"] == "billing"
    assert billing["unread"] == before["billing"]["unread"] + 1
    assert billing["open"] == before["billing"]["open"] + 1
    assert billing["transfer"] == {
        "enabled": False,
        "notify": False,
        "template": None,
        "targets": [],
    }
    assert [a["name"] for a in desk.call("alice", "GET", "/api/v1/accounts").json()] == ["sales"]


def test_show_is_show_json(desk: Desk) -> None:
    """GET /interactions/{id} is exactly `show --json` (same fields, same values)."""
    iid = send(desk, "sales@example.test")
    r = desk.call("alice", "GET", f"/api/v1/interactions/{iid}")
    assert r.status_code == 200
    assert r.json() == detail(desk, iid)
    assert {"messages", "transfers", "last_activity_at", "customer"} <= r.json().keys()


def test_list_items_are_interactions_json_rows(desk: Desk) -> None:
    """List items are the rows of `interactions --json`, field for field."""
    iid = send(desk, "support@example.test")
    items = desk.call("bob", "GET", "/api/v1/interactions", params={"limit": 200}).json()["items"]
    [item] = [i for i in items if i["id"] == iid]
    with desk.rt.db.read() as s:
        row = s.get(Interaction, iid)
        assert row is not None
        assert item == interaction_dict(row)


def test_list_is_unread_first_then_most_recent_in_cursor_pages(desk: Desk) -> None:
    """Pages of 2 walk the whole list, unread first then newest, no row twice."""
    made = [send(desk, "sales@example.test") for _ in range(4)]
    assert desk.call("alice", "POST", f"/api/v1/interactions/{made[1]}/read").status_code == 200
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(100):
        params: dict[str, Any] = {"account": "sales", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = desk.call("alice", "GET", "/api/v1/interactions", params=params).json()
        assert len(page["items"]) <= 2
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    keys = [(i["unread"], i["last_activity_at"], i["id"]) for i in seen]
    assert keys == sorted(keys, reverse=True)
    assert len({i["id"] for i in seen}) == len(seen)
    with desk.rt.db.read() as s:
        owned = s.scalar(
            select(func.count())
            .select_from(Interaction)
            .where(Interaction.account_id == desk.rt.accounts.id("sales"))
        )
    assert len(seen) == owned
    assert set(made) <= {i["id"] for i in seen}
    assert [i["id"] for i in seen].index(made[1]) > max(
        [i["id"] for i in seen].index(m) for m in (made[0], made[2], made[3])
    )


def test_list_filters_by_unread_status_and_account(desk: Desk) -> None:
    """unread=, status= and account= narrow the list; an admin may name any account."""
    a, b = send(desk, "support@example.test"), send(desk, "support@example.test")
    desk.call("bob", "POST", f"/api/v1/interactions/{a}/read")
    desk.call("bob", "POST", f"/api/v1/interactions/{b}/close")

    def ids(**params: Any) -> set[int]:
        r = desk.call("root", "GET", "/api/v1/interactions", params={**params, "limit": 200})
        assert r.status_code == 200, r.text
        return {i["id"] for i in r.json()["items"]}

    assert a in ids(account="support", unread="false") and b not in ids(unread="false")
    assert b in ids(account="support@example.test", unread="true")
    assert b in ids(status="closed") and a not in ids(status="closed")
    assert not ids(account="billing") & {a, b}


def test_list_of_an_account_not_ones_own_is_404_unknown_is_422(desk: Desk) -> None:
    """account= names an account: another's is 404 (not visible), a made-up one 422."""
    assert_problem(
        desk.call("alice", "GET", "/api/v1/interactions", params={"account": "support"}),
        404,
        "not-your-account",
        "agent alice is not in account support",
    )
    r = desk.call("alice", "GET", "/api/v1/interactions", params={"account": "nowhere"})
    assert_problem(r, 422, "unknown-account")
    assert r.json()["detail"].startswith("unknown account 'nowhere'")


@pytest.mark.parametrize("cursor", ["garbage", "bm90IGpzb24", "WzEsICJub3QgYSBkYXRlIiwgMV0"])
def test_a_cursor_we_did_not_hand_out_is_422(desk: Desk, cursor: str) -> None:
    r = desk.call("alice", "GET", "/api/v1/interactions", params={"cursor": cursor})
    assert_problem(r, 422, "bad-cursor")


def test_gets_change_nothing(desk: Desk) -> None:
    """Listing and showing (even an unread one) leave the store as it was."""
    iid = send(desk, "sales@example.test")
    before = snapshot(desk)
    for path in (f"/api/v1/interactions/{iid}", "/api/v1/interactions", "/api/v1/accounts"):
        assert desk.call("alice", "GET", path).status_code == 200
    assert snapshot(desk) == before
    assert detail(desk, iid)["unread"] is True


def test_report_rows_are_the_agents_accounts(desk: Desk) -> None:
    """GET /reports is `report --json`; an agent gets its own accounts' rows only."""
    send(desk, "billing@example.test")
    params = {"from": "2000-01-01", "to": "2100-01-01"}
    mine = desk.call("carol", "GET", "/api/v1/reports", params=params).json()
    everything = desk.call("root", "GET", "/api/v1/reports", params=params).json()
    code, out, _ = run_cli(
        desk.served.settings, "report", "--from", "2000-01-01", "--to", "2100-01-01", "--json"
    )
    assert code == 0
    assert everything == json.loads(out)
    assert (mine["from"], mine["to"], mine["attributed_to"]) == (
        "2000-01-01T00:00:00+00:00",
        "2100-01-01T00:00:00+00:00",
        "current account",
    )
    assert [row["account"] for row in mine["accounts"]] == ["billing"]
    assert mine["accounts"][0]["interactions"] >= 1


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"from": "2026-02-01", "to": "2026-01-01"}, "bad-period"),
        ({"from": "2026-01-01", "to": "2026-01-01"}, "bad-period"),
        ({"from": "yesterday", "to": "2026-01-01"}, "bad-request"),
        ({"to": "2026-01-01"}, "bad-request"),
    ],
)
def test_bad_report_period_is_422(desk: Desk, params: dict[str, str], code: str) -> None:
    assert_problem(desk.call("alice", "GET", "/api/v1/reports", params=params), 422, code)


# --------------------------------------------------------------------------- operations


def test_read_and_unread_mark_the_interaction(desk: Desk) -> None:
    """POST /read and /unread answer the interaction with its new flag."""
    iid = send(desk, "sales@example.test")
    r = desk.call("alice", "POST", f"/api/v1/interactions/{iid}/read")
    assert (r.status_code, r.json()["unread"]) == (200, False)
    r = desk.call("alice", "POST", f"/api/v1/interactions/{iid}/unread")
    assert (r.status_code, r.json()["unread"], r.json()["id"]) == (200, True, iid)
    assert detail(desk, iid)["unread"] is True


def test_pick_assigns_to_the_caller_repeat_is_harmless(desk: Desk) -> None:
    """POST /pick: 200, assigned to the authenticated agent and read; again: still 200."""
    iid = send(desk, "sales@example.test")
    first = desk.call("alice", "POST", f"/api/v1/interactions/{iid}/pick")
    assert first.status_code == 200
    assert (first.json()["assigned_agent"], first.json()["unread"]) == ("alice", False)
    again = desk.call("alice", "POST", f"/api/v1/interactions/{iid}/pick")
    assert (again.status_code, again.json()) == (200, first.json())


def test_pick_of_an_interaction_another_agent_holds_is_409(desk: Desk) -> None:
    """dave (also sales) cannot take alice's pick: 409 in the CLI's words, nothing changes."""
    iid = send(desk, "sales@example.test")
    assert desk.call("alice", "POST", f"/api/v1/interactions/{iid}/pick").status_code == 200
    before = snapshot(desk)
    r = desk.call("dave", "POST", f"/api/v1/interactions/{iid}/pick")
    assert_problem(r, 409, "already-picked", f"interaction {iid} is already picked by alice")
    assert snapshot(desk) == before


def test_close_closes_it(desk: Desk) -> None:
    iid = send(desk, "support@example.test")
    r = desk.call("bob", "POST", f"/api/v1/interactions/{iid}/close")
    assert (r.status_code, r.json()["status"]) == (200, "closed")


def test_transfer_moves_it_unread_and_records_the_agent(desk: Desk) -> None:
    """sales → support: unread, unassigned, manual there; the notice queued; `by` = alice."""
    iid = send(desk, "sales@example.test")
    desk.call("alice", "POST", f"/api/v1/interactions/{iid}/pick")
    r = desk.call("alice", "POST", f"/api/v1/interactions/{iid}/transfer", json={"to": "support"})
    assert r.status_code == 200, r.text
    body = r.json()
    moved = body["interaction"]
    assert (moved["id"], moved["account"], moved["origin_account"]) == (iid, "support", "sales")
    assert (moved["unread"], moved["assigned_agent"], moved["distribution"]) == (
        True,
        None,
        "manual",
    )
    t = body["transfer"]
    assert (t["interaction_id"], t["from_account"], t["to_account"]) == (iid, "sales", "support")
    assert (t["notification"], t["notice"], t["reason"]) == ("queued", "queued", None)
    [record] = detail(desk, iid)["transfers"]
    assert (record["by"], record["from"], record["to"]) == ("alice", "sales", "support")
    # The notice leaves through the outbox the route woke.
    assert wait_until(
        lambda: any(
            f"<{t['notice_message_id']}>".encode() in m
            for m in pickup_messages(desk.served.settings)
        )
    )
    # alice no longer sees it; bob does, at the top of his unread list.
    assert_problem(desk.call("alice", "GET", f"/api/v1/interactions/{iid}"), 404, "not-found")
    top = desk.call("bob", "GET", "/api/v1/interactions", params={"unread": "true"}).json()
    assert iid in [i["id"] for i in top["items"]]


def test_transfer_notice_off_and_suppressed(desk: Desk) -> None:
    """Out of support (notify off): "off"; an auto-reply from sales: "suppressed: REASON"."""
    quiet = send(desk, "support@example.test")
    r = desk.call("bob", "POST", f"/api/v1/interactions/{quiet}/transfer", json={"to": "billing"})
    assert (r.status_code, r.json()["transfer"]["notice"]) == (200, "off")

    auto = send(desk, "sales@example.test", extra_headers="Auto-Submitted: auto-replied\r\n")
    r = desk.call("alice", "POST", f"/api/v1/interactions/{auto}/transfer", json={"to": "bob"})
    assert_problem(r, 422, "unknown-account")  # accounts, not agents
    r = desk.call("alice", "POST", f"/api/v1/interactions/{auto}/transfer", json={"to": "support"})
    t = r.json()["transfer"]
    assert t["notification"] == "suppressed"
    assert t["notice"] == f"suppressed: {t['reason']}" and "automatic" in t["reason"]


def test_reply_is_queued_202_and_sent(desk: Desk) -> None:
    """POST /reply: 202 with the Message-ID, stored as outbound, sent from the account."""
    iid = send(desk, "support@example.test")
    r = desk.call("bob", "POST", f"/api/v1/interactions/{iid}/reply", json={"body": "Hello!"})
    assert r.status_code == 202, r.text
    message_id = r.json()["message_id"]
    assert message_id.startswith("<") and message_id.endswith(">")
    d = detail(desk, iid)
    [out] = [m for m in d["messages"] if m["direction"] == "outbound"]
    assert (out["message_id"], out["account"]) == (message_id, "support")
    assert (d["assigned_agent"], d["status"]) == ("bob", "open")
    assert wait_until(
        lambda: any(message_id.encode() in m for m in pickup_messages(desk.served.settings))
    )


def test_reply_with_close_closes_in_the_same_step(desk: Desk) -> None:
    iid = send(desk, "support@example.test")
    r = desk.call(
        "bob", "POST", f"/api/v1/interactions/{iid}/reply", json={"body": "Done.", "close": True}
    )
    assert r.status_code == 202
    assert detail(desk, iid)["status"] == "closed"


def test_retried_reply_with_the_same_idempotency_key_sends_once(desk: Desk) -> None:
    """The same Idempotency-Key twice: one reply, the same answer; quoted or not."""
    iid = send(desk, "sales@example.test")
    path = f"/api/v1/interactions/{iid}/reply"
    body = {"body": "Your quote is attached."}
    first = desk.call("alice", "POST", path, json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 202
    before = snapshot(desk)
    for key in ("k-1", '"k-1"'):
        again = desk.call("alice", "POST", path, json=body, headers={"Idempotency-Key": key})
        assert (again.status_code, again.json()) == (202, first.json())
    assert snapshot(desk) == before
    outbound = [m for m in detail(desk, iid)["messages"] if m["direction"] == "outbound"]
    assert len(outbound) == 1
    # Without a key, a second request is a second reply.
    assert desk.call("alice", "POST", path, json=body).status_code == 202
    assert len([m for m in detail(desk, iid)["messages"] if m["direction"] == "outbound"]) == 2


def test_concurrent_tries_with_one_idempotency_key_send_once(desk: Desk) -> None:
    """Five tries of one request at once (a client retrying on a timeout): one reply."""
    iid = send(desk, "support@example.test")
    path = f"/api/v1/interactions/{iid}/reply"

    def attempt(_: int) -> httpx.Response:
        return desk.call(
            "bob", "POST", path, json={"body": "On its way."}, headers={"Idempotency-Key": "k-3"}
        )

    with ThreadPoolExecutor(max_workers=5) as pool:
        answers = list(pool.map(attempt, range(5)))
    assert {r.status_code for r in answers} == {202}
    assert len({r.json()["message_id"] for r in answers}) == 1
    outbound = [m for m in detail(desk, iid)["messages"] if m["direction"] == "outbound"]
    assert len(outbound) == 1


def test_idempotency_key_reused_for_another_request_is_422(desk: Desk) -> None:
    """A key already used for a different body is refused; nothing is sent."""
    iid = send(desk, "sales@example.test")
    path = f"/api/v1/interactions/{iid}/reply"
    headers = {"Idempotency-Key": "k-2"}
    first = desk.call("alice", "POST", path, json={"body": "one"}, headers=headers)
    assert first.status_code == 202
    before = snapshot(desk)
    r = desk.call("alice", "POST", path, json={"body": "two"}, headers=headers)
    assert_problem(
        r,
        422,
        "idempotency-key-reused",
        "idempotency key 'k-2' was already used for a different request",
    )
    assert snapshot(desk) == before
    # Keys are per agent: dave's k-2 is his own.
    assert desk.call("dave", "POST", path, json={"body": "two"}, headers=headers).status_code == 202


# --------------------------------------------------------------------------- refusals


def _refusals(desk: Desk) -> list[tuple[str, str, str, Any, int, str, str]]:
    """(agent, method, path, json, status, code, detail) of each refused request."""
    billing = send(desk, "billing@example.test")
    sales = send(desk, "sales@example.test")
    closed = send(desk, "support@example.test")
    desk.call("bob", "POST", f"/api/v1/interactions/{closed}/close")
    unknown = 10**9
    base = "/api/v1/interactions"
    return [
        (
            "carol",
            "POST",
            f"{base}/{billing}/transfer",
            {"to": "sales"},
            409,
            "transfer-not-enabled",
            "transfer out of account billing is not enabled "
            "(set accounts.billing.transfer.enabled = true)",
        ),
        (
            "alice",
            "POST",
            f"{base}/{sales}/transfer",
            {"to": "sales@example.test"},
            409,
            "same-account",
            f"interaction {sales} already belongs to sales",
        ),
        (
            "bob",
            "POST",
            f"{base}/{closed}/transfer",
            {"to": "sales"},
            409,
            "closed",
            f"interaction {closed} is closed",
        ),
        ("alice", "POST", f"{base}/{unknown}/pick", None, 404, "not-found",
         f"no interaction {unknown}"),
        ("alice", "POST", f"{base}/{sales}/reply", {"body": "  \n"}, 422, "empty-body",
         "the reply body is empty"),
        ("alice", "POST", f"{base}/{sales}/transfer", {}, 422, "bad-request",
         "body.to: Field required"),
        ("alice", "POST", f"{base}/{sales}/transfer", {"to": "support", "by": "mallory"}, 422,
         "bad-request", "body.by: Extra inputs are not permitted"),
        ("alice", "POST", f"{base}/{sales}/reply", {"body": 5}, 422, "bad-request",
         "body.body: Input should be a valid string"),
        ("alice", "POST", f"{base}/0/pick", None, 422, "bad-request",
         "path.interaction_id: Input should be greater than or equal to 1"),
    ]  # fmt: skip


def test_each_refusal_is_a_problem_and_changes_nothing(desk: Desk) -> None:
    """Every refusal: problem+json with the domain's sentence, and the store as before."""
    for agent, method, path, body, status, code, sentence in _refusals(desk):
        before = snapshot(desk)
        r = desk.call(agent, method, path, json=body)
        assert_problem(r, status, code, sentence)
        assert snapshot(desk) == before, (path, body)


def test_malformed_json_is_422(desk: Desk) -> None:
    iid = send(desk, "sales@example.test")
    r = desk.call(
        "alice",
        "POST",
        f"/api/v1/interactions/{iid}/reply",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert_problem(r, 422, "bad-request")


def test_oversized_body_is_413(desk: Desk) -> None:
    iid = send(desk, "sales@example.test")
    r = desk.call(
        "alice", "POST", f"/api/v1/interactions/{iid}/reply", json={"body": "x" * 1_100_000}
    )
    assert_problem(r, 413, "too-large")


# --------------------------------------------------------------------------- access


def test_each_agent_sees_and_acts_only_on_its_accounts(desk: Desk) -> None:
    """Three agents, three accounts: another's interaction is 404 for every endpoint, as if
    it did not exist, and stays untouched; the admin sees all three."""
    owned = {
        "alice": send(desk, "sales@example.test"),
        "bob": send(desk, "support@example.test"),
        "carol": send(desk, "billing@example.test"),
    }
    for agent, mine in owned.items():
        listed = {
            i["id"]
            for i in desk.call(agent, "GET", "/api/v1/interactions", params={"limit": 200}).json()[
                "items"
            ]
        }
        assert mine in listed
        assert desk.call(agent, "GET", f"/api/v1/interactions/{mine}").status_code == 200
        for other_agent, other in owned.items():
            if other_agent == agent:
                continue
            assert other not in listed
            before = snapshot(desk)
            for method, suffix, body in (
                ("GET", "", None),
                ("POST", "/read", None),
                ("POST", "/unread", None),
                ("POST", "/pick", None),
                ("POST", "/close", None),
                ("POST", "/transfer", {"to": "support" if agent != "bob" else "sales"}),
                ("POST", "/reply", {"body": "not yours"}),
            ):
                r = desk.call(agent, method, f"/api/v1/interactions/{other}{suffix}", json=body)
                assert_problem(r, 404, "not-found", f"no interaction {other}")
            assert snapshot(desk) == before
    admin_ids = {
        i["id"]
        for i in desk.call("root", "GET", "/api/v1/interactions", params={"limit": 200}).json()[
            "items"
        ]
    }
    assert set(owned.values()) <= admin_ids
    for iid in owned.values():
        assert desk.call("root", "GET", f"/api/v1/interactions/{iid}").status_code == 200


def test_transfer_may_target_an_account_the_agent_is_not_in(desk: Desk) -> None:
    """alice (sales only) may move a sales interaction to billing; then it is gone for her."""
    iid = send(desk, "sales@example.test")
    r = desk.call("alice", "POST", f"/api/v1/interactions/{iid}/transfer", json={"to": "billing"})
    assert r.status_code == 200
    assert desk.call("carol", "GET", f"/api/v1/interactions/{iid}").status_code == 200
    assert desk.call("alice", "POST", f"/api/v1/interactions/{iid}/pick").status_code == 404


def test_admin_acts_on_any_account_as_itself(desk: Desk) -> None:
    iid = send(desk, "billing@example.test")
    r = desk.call("root", "POST", f"/api/v1/interactions/{iid}/pick")
    assert (r.status_code, r.json()["assigned_agent"]) == (200, "root")


# --------------------------------------------------------------------------- tokens


def test_rotated_token_and_removed_agent_stop_working_at_once(desk: Desk, tmp_path: Path) -> None:
    """While the daemon runs: `agent token` kills the old token, `agent remove` the new."""
    settings = desk.served.settings
    old = run_cli(settings, "agent", "add", "erin", "--account", "support")[1].strip()
    with desk.served.client(old) as c:
        assert c.get("/api/v1/accounts").status_code == 200
        new = run_cli(settings, "agent", "token", "erin")[1].strip()
        assert_problem(c.get("/api/v1/accounts"), 401, "bad-token")
    with desk.served.client(new) as c:
        assert c.get("/api/v1/accounts").status_code == 200
        assert run_cli(settings, "agent", "remove", "erin")[0] == 0
        r = c.get("/api/v1/accounts")
    assert_problem(r, 401, "bad-token")
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
