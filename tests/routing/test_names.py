"""The registry of rule names: every name a decision carries has one description."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_view import ORDER, FakeView, conversation, mail

import mailrouter.pipeline
from helpers import accept, make_settings, pipeline, scenario
from mailrouter.parse import parse
from mailrouter.routing import (
    ALL_RULES,
    INTERNAL_ERROR,
    RULES,
    Action,
    Decision,
    decide,
    describe_action,
    describe_rule,
)
from mailrouter.threads import RULES as THREAD_RULES


def every_kind_of_decision() -> list[Decision]:
    """One decision down each path of the chain, each thread rule included."""
    reply = mail("reply@c", in_reply_to="ask@c")
    copied = conversation("support")
    copied.store(reply, 2, "sales")
    # <lost@c> was never stored, but a stored message cites it and so does the new one.
    shares = FakeView(owners={ORDER: "sales"}, pointed_at={"lost@c": ORDER})
    # A stored reply already cites <early@c>, which arrives only now.
    cited = FakeView(owners={ORDER: "sales"}, pointed_at={"early@c": ORDER})
    return [
        decide(parse(b""), ["sales"], FakeView()),
        decide(reply, ["sales"], copied),
        decide(reply, ["support"], copied),
        decide(reply, ["sales"], conversation("sales")),
        decide(reply, ["sales"], conversation("support")),
        decide(mail("ref@c", references=["ask@c"]), ["sales"], conversation("sales")),
        decide(mail("late@c", in_reply_to="lost@c"), ["sales"], shares),
        decide(mail("early@c"), ["sales"], cited),
        decide(mail("first@c"), ["sales"], FakeView()),
        decide(parse(BOUNCE_OF_ASK), ["sales"], conversation("sales")),
        decide(
            parse(
                b"From: Customer <customer@example.net>\r\nTo: sales@example.test\r\n"
                b"Subject: Re: Order 7 [#7]\r\nMessage-ID: <token@c>\r\n\r\nhi\r\n"
            ),
            ["sales"],
            FakeView(owners={ORDER: "sales"}),
            subject_token="[#{id}]",
        ),
    ]


# A delivery status notification returning the headers of the stored <ask@c>.
BOUNCE_OF_ASK = (
    b"From: MAILER-DAEMON@mx.test\r\nTo: sales@example.test\r\nMessage-ID: <dsn@mx.test>\r\n"
    b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.test\r\n"
    b"\r\nFinal-Recipient: rfc822; customer@example.net\r\nAction: failed\r\n"
    b"Status: 5.1.1\r\n\r\n--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    b"Message-ID: <ask@c>\r\n\r\n--b--\r\n"
)


@pytest.mark.usefixtures("backend")  # on SQLite and on the real PostgreSQL
def test_every_rule_name_in_a_decision_has_a_description(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each ``rule`` and ``step`` a decision can carry is described in the registry."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated routing bug")

    decisions = every_kind_of_decision()
    with pipeline(make_settings(tmp_path)) as p:
        monkeypatch.setattr(mailrouter.pipeline, "decide", broken)
        decisions.append(accept(p, scenario("chairs-quote", "01-customer-asks.eml")).decision)

    rules = {d.rule for d in decisions}
    steps = {d.step for d in decisions if d.step is not None}
    assert rules == {r.name for r in THREAD_RULES} | {
        "new-interaction",
        "malformed",
        "duplicate",
        "internal-error",
    }
    assert steps == {r.name for r in RULES} | {"internal-error"}
    for name in rules | steps:
        assert describe_rule(name) != name, name


def test_thread_rules_are_described_by_their_own_description() -> None:
    """`explain`'s "why" for a thread rule is the sentence written beside the rule."""
    for rule in THREAD_RULES:
        assert describe_rule(rule.name) == rule.description


def test_a_routing_crash_is_named_internal_error() -> None:
    """The pipeline's hold after a crash is a registered name, not a bare string."""
    assert INTERNAL_ERROR.name == "internal-error"
    assert describe_rule("internal-error") == INTERNAL_ERROR.description


def test_rule_names_are_unique_across_stages() -> None:
    """No thread rule, routing rule or outcome shares a name: the log stays unambiguous."""
    names = [r.name for r in ALL_RULES]
    assert len(names) == len(set(names))


def test_unknown_rule_describes_itself() -> None:
    """A name from an older version's stored rows still prints as something readable."""
    assert describe_rule("no-such-rule") == "no-such-rule"


def test_action_is_described_by_its_enum_member() -> None:
    """`explain`'s "action_means" reads the description written on the Action."""
    assert describe_action("route") == Action.ROUTE.description
    assert describe_action(Action.HOLD) == Action.HOLD.description
    assert describe_action("no-such-action") == "no-such-action"
