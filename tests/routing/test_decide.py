"""The routing rule chain: each rule on its own against an in-memory store, then the chain.

Routing is pure behind ``RoutingView``, so most tests need no database: ``FakeView`` is a
few dicts.  The last tests go through the real pipeline and store.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from fake_view import ORDER, FakeView, conversation, mail
from sqlalchemy import select

from helpers import accept, make_settings, pipeline, scenario
from mailrouter.parse import parse
from mailrouter.routing import RULES, Action, Decision, Facts, decide
from mailrouter.routing.decide import (
    CopyForAnotherAccount,
    Duplicate,
    FollowTheOwner,
    Malformed,
    OwnerReceives,
)
from mailrouter.store.models import Message
from mailrouter.transfer import transfer

REPLY = mail("reply@c", in_reply_to="ask@c")


# --------------------------------------------------------------------------- each rule


def test_rules_run_in_the_documented_order() -> None:
    """The chain reads top to bottom: malformed, duplicate, attach, then deliver or route."""
    assert [r.name for r in RULES] == [
        "malformed",
        "duplicate",
        "copy-for-another-account",
        "owner-receives",
        "follow-the-owner",
    ]


def test_every_routing_rule_has_a_one_line_description() -> None:
    """Each rule says what it matches in one line, for the log reader and `explain`."""
    for rule in RULES:
        assert rule.description and "\n" not in rule.description, rule.name


def test_malformed_message_is_held_with_the_parsers_reason() -> None:
    """A message without header fields is held, the problem recorded as the reason."""
    d = Malformed().check(Facts(parse(b"just text\r\n"), ["sales"], FakeView()))
    assert d == Decision(
        Action.HOLD,
        "malformed",
        "sales",
        reason="no header fields (not an RFC 5322 message)",
        step="malformed",
    )


def test_malformed_message_costs_one_store_look_up() -> None:
    """Holding a malformed message asks the store only whether it is held already."""
    view = FakeView()
    assert decide(parse(b""), ["sales"], view).action == Action.HOLD
    assert view.calls == Counter({"existing": 1})


def test_well_formed_message_is_not_malformed() -> None:
    """The malformed rule leaves a parseable message to the rules below."""
    assert Malformed().check(Facts(REPLY, ["sales"], FakeView())) is None


def test_same_message_for_the_same_accounts_again_is_a_duplicate() -> None:
    """A redelivery names the stored copy and its interaction and does nothing else."""
    view = conversation("support")
    view.store(REPLY, 2, "sales", "support")
    d = Duplicate().check(Facts(REPLY, ["support"], view))
    assert d == Decision(
        Action.DUPLICATE,
        "duplicate",
        "support",
        ORDER,
        "support",
        matched_id="reply@c",
        existing_pk=2,
        step="duplicate",
    )


def test_same_message_with_a_new_recipient_is_no_duplicate() -> None:
    """A copy for an account the stored message was not for is left to the attach rule."""
    view = conversation("support")
    view.store(REPLY, 2, "sales")
    assert Duplicate().check(Facts(REPLY, ["sales", "support"], view)) is None


def test_copy_for_another_account_is_attached_without_delivery() -> None:
    """The Cc'd copy joins the stored message's interaction: recorded, delivered to nobody."""
    view = conversation("support")
    view.store(REPLY, 2, "sales")
    d = CopyForAnotherAccount().check(Facts(REPLY, ["support"], view))
    assert d == Decision(
        Action.ATTACH,
        "known-message",  # the thread rule that found the interaction stays the rule
        "support",
        ORDER,
        "support",
        deliver_to=None,
        matched_id="reply@c",
        existing_pk=2,
        step="copy-for-another-account",
    )


def test_new_message_is_no_copy() -> None:
    """Nothing stored with this Message-ID and content: not a copy."""
    assert CopyForAnotherAccount().check(Facts(REPLY, ["sales"], conversation("sales"))) is None


def test_new_interaction_is_delivered_to_the_account_it_was_addressed_to() -> None:
    """Mail that matches nothing opens an interaction owned by its first recipient."""
    d = OwnerReceives().check(Facts(mail("first@c"), ["sales", "support"], FakeView()))
    assert d == Decision(
        Action.DELIVER, "new-interaction", "sales", None, "sales", "sales", step="owner-receives"
    )


def test_reply_to_the_owner_is_delivered_to_the_owner() -> None:
    """A reply addressed to the account that owns the conversation is delivered there."""
    d = OwnerReceives().check(Facts(REPLY, ["sales"], conversation("sales")))
    assert d == Decision(
        Action.DELIVER,
        "in-reply-to",
        "sales",
        ORDER,
        "sales",
        "sales",
        matched_id="ask@c",
        step="owner-receives",
    )


def test_cc_to_the_old_and_the_new_account_reaches_the_owner_directly() -> None:
    """The owner among several recipients gets it as a delivery, not as a routed copy."""
    d = OwnerReceives().check(Facts(REPLY, ["sales", "support"], conversation("support")))
    assert d is not None
    assert (d.action, d.receiving, d.deliver_to) == (Action.DELIVER, "sales", "support")


def test_owner_receives_leaves_mail_only_to_an_old_account() -> None:
    """Without the owner among the recipients, delivery is not this rule's to decide."""
    assert OwnerReceives().check(Facts(REPLY, ["sales"], conversation("support"))) is None


def test_mail_only_to_an_old_account_follows_the_owner() -> None:
    """A reply to sales@ after a transfer to support is routed to support."""
    d = FollowTheOwner().check(Facts(REPLY, ["sales"], conversation("support")))
    assert d == Decision(
        Action.ROUTE,
        "in-reply-to",
        "sales",
        ORDER,
        "support",
        "support",
        matched_id="ask@c",
        step="follow-the-owner",
    )


def test_follow_the_owner_leaves_a_new_interaction() -> None:
    """A conversation nobody owns yet has no owner to follow."""
    assert FollowTheOwner().check(Facts(mail("first@c"), ["sales"], FakeView())) is None


def test_follow_the_owner_leaves_mail_the_owner_receives() -> None:
    """Mail already addressed to the owner is not routed."""
    assert FollowTheOwner().check(Facts(REPLY, ["support"], conversation("support"))) is None


# --------------------------------------------------------------------------- the chain


def test_the_same_unroutable_bytes_again_are_a_duplicate_of_the_held_copy() -> None:
    """A sender retrying a held message gets 250 (duplicate), not a second hold."""
    empty = parse(b"")
    view = FakeView()
    view.copies[empty.message_id, empty.content_hash] = (3, {"sales"})
    d = decide(empty, ["sales"], view)
    assert (d.action, d.rule, d.step, d.existing_pk) == (
        Action.DUPLICATE,
        "duplicate",
        "duplicate",
        3,
    )


def test_a_held_message_for_another_account_records_the_recipient() -> None:
    """The same unroutable bytes for a second account attach to the held copy."""
    empty = parse(b"")
    view = FakeView()
    view.copies[empty.message_id, empty.content_hash] = (3, {"sales"})
    d = decide(empty, ["support"], view)
    assert (d.action, d.rule, d.step, d.existing_pk, d.interaction_id) == (
        Action.ATTACH,
        "malformed",
        "copy-for-another-account",
        3,
        None,
    )


def test_duplicate_is_checked_before_attach() -> None:
    """A copy for accounts all recorded already is a duplicate: nothing to record again."""
    view = conversation("support")
    view.store(REPLY, 2, "sales", "support")
    assert CopyForAnotherAccount().check(Facts(REPLY, ["support"], view)) is not None
    d = decide(REPLY, ["support"], view)
    assert (d.action, d.step) == (Action.DUPLICATE, "duplicate")


def test_attach_is_checked_before_delivery() -> None:
    """A stored message seen for another account is attached, never delivered a second time."""
    view = conversation("support")
    view.store(REPLY, 2, "sales")
    assert OwnerReceives().check(Facts(REPLY, ["support"], view)) is not None
    assert decide(REPLY, ["support"], view).action == Action.ATTACH


def test_decision_names_the_routing_rule_that_decided() -> None:
    """``step`` is the first rule in the chain that returned a decision."""
    view = conversation("support")
    assert decide(REPLY, ["sales"], view).step == "follow-the-owner"
    assert decide(REPLY, ["support"], view).step == "owner-receives"


def test_each_store_look_up_is_made_at_most_once() -> None:
    """Rules share one ``Facts``: the copy check, the thread and the owner are asked once."""
    view = conversation("support")
    decide(REPLY, ["sales"], view)
    assert max(view.calls.values()) == 1, view.calls


# --------------------------------------------------------------------------- actions


def test_actions_are_the_strings_the_store_and_json_show() -> None:
    """Action values stay the stored ``messages.action`` strings and serialise as them."""
    assert [str(a) for a in Action] == ["deliver", "route", "attach", "duplicate", "hold"]
    assert json.dumps({Action.ROUTE: Action.ROUTE}) == '{"route": "route"}'
    assert Action.ROUTE == "route"


def test_every_action_has_a_description() -> None:
    """Each action says in one line what the pipeline does with the message."""
    for action in Action:
        assert action.description and "\n" not in action.description, action


# --------------------------------------------------------------------------- the pipeline


@pytest.mark.usefixtures("backend")  # on SQLite and on the real PostgreSQL
def test_reply_to_an_old_account_is_routed_and_stored_as_route(tmp_path: Path) -> None:
    """Through the real store: after a transfer, a reply to sales@ is routed to support."""
    settings = make_settings(tmp_path)
    chairs = "chairs-quote"
    with pipeline(settings) as p:
        for f in ("01-customer-asks.eml", "02-customer-adds-detail.eml"):
            iid = accept(p, scenario(chairs, f)).interaction_id
        assert iid is not None
        transfer(p, iid, "support", actor="bob")
        r = accept(p, scenario(chairs, "03-customer-replies-to-sales.eml"))
        assert (r.decision.action, r.decision.rule, r.decision.step) == (
            Action.ROUTE,
            "in-reply-to",
            "follow-the-owner",
        )
        assert (r.interaction_id, r.decision.deliver_to) == (iid, "support")
        with p.db.read() as s:
            row = s.scalars(select(Message).where(Message.id == r.message_pk)).one()
        assert (row.action, type(row.action), row.rule) == ("route", str, "in-reply-to")
        assert row.routed_to_account_id == p.accounts.id("support")
