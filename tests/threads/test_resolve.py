"""The thread-resolution rule chain, one rule per test, through the real pipeline.

Messages are small inline ones; resolution runs across accounts, so several tests start a
thread at sales@ and answer it at support@.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mailrouter.config import load
from mailrouter.parse import ParsedMessage, parse
from mailrouter.pipeline import Accepted, Pipeline
from mailrouter.runtime import Runtime
from mailrouter.store.models import Interaction
from mailrouter.threads import RULES
from mailrouter.threads.resolve import resolve

SALES = "sales@example.test"
SUPPORT = "support@example.test"


@pytest.fixture
def pipeline(tmp_path: Path, database_url: str) -> Iterator[Pipeline]:
    """Two accounts, on SQLite and on the real PostgreSQL (tests/servers.py)."""
    config = tmp_path / "mailrouter.toml"
    config.write_text(
        f'state_dir = "{tmp_path}"\n'
        f'[database]\nurl = "{database_url}"\n'
        f'[accounts.sales]\naddress = "{SALES}"\n'
        f'[accounts.support]\naddress = "{SUPPORT}"\n',
        encoding="utf-8",
    )
    p = Pipeline(Runtime.open(load(config, env={})))
    yield p
    p.rt.close()


def mail(
    mid: str,
    *,
    to: str = SALES,
    in_reply_to: str | None = None,
    references: Sequence[str] = (),
    body: str = "Where is my order?",
) -> bytes:
    lines = [
        "From: Customer <customer@example.net>",
        f"To: {to}",
        "Subject: Order 7",
        "Date: Tue, 12 Mar 2024 10:00:00 +0000",
        f"Message-ID: <{mid}>",
    ]
    if in_reply_to:
        lines.append(f"In-Reply-To: <{in_reply_to}>")
    if references:
        lines.append("References: " + " ".join(f"<{r}>" for r in references))
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


def accept(p: Pipeline, raw: bytes, account: str = "sales") -> Accepted:
    return p.accept(raw, [p.settings.account(account)], source="test")


def interaction_count(p: Pipeline) -> int:
    with p.db.read() as s:
        return int(s.scalar(select(func.count()).select_from(Interaction)) or 0)


def test_rules_run_in_the_documented_order() -> None:
    """The chain reads top to bottom: a bounce of ours, own id, In-Reply-To, References, the
    subject token, then missing-id links."""
    assert [r.name for r in RULES] == [
        "bounce-of",
        "known-message",
        "in-reply-to",
        "references",
        "subject-token",
        "shared-reference",
        "referenced-by",
    ]
    assert all(r.description for r in RULES)


# ---------------------------------------------------------------------------- one rule each


def test_new_interaction_when_no_id_is_known(pipeline: Pipeline) -> None:
    """A message naming nothing stored opens a new interaction owned by the receiving account."""
    r = accept(pipeline, mail("root@customer.example"))
    assert r.decision.rule == "new-interaction"
    assert r.decision.action == "deliver"
    assert r.interaction_id is not None
    assert r.decision.owner == "sales"


def test_known_message_joins_another_copy_of_a_stored_message(pipeline: Pipeline) -> None:
    """Same Message-ID, different bytes (a list footer): the stored message's interaction."""
    first = accept(pipeline, mail("root@customer.example"))
    copy = accept(pipeline, mail("root@customer.example", body="Where is my order?\n-- list"))
    assert copy.decision.rule == "known-message"
    assert copy.decision.matched_id == "root@customer.example"
    assert copy.interaction_id == first.interaction_id


def test_identical_redelivery_is_a_duplicate(pipeline: Pipeline) -> None:
    """The very same bytes again for the same account: recorded as a duplicate, not stored."""
    first = accept(pipeline, mail("root@customer.example"))
    again = accept(pipeline, mail("root@customer.example"))
    assert again.decision.action == "duplicate"
    assert again.message_pk == first.message_pk


def test_in_reply_to_joins_the_parents_interaction(pipeline: Pipeline) -> None:
    """In-Reply-To naming a stored message resolves to its interaction."""
    root = accept(pipeline, mail("root@customer.example"))
    reply = accept(pipeline, mail("r1@customer.example", in_reply_to="root@customer.example"))
    assert reply.decision.rule == "in-reply-to"
    assert reply.decision.matched_id == "root@customer.example"
    assert reply.interaction_id == root.interaction_id


def test_in_reply_to_is_tried_before_references(pipeline: Pipeline) -> None:
    """When In-Reply-To and References name different stored threads, In-Reply-To decides."""
    a = accept(pipeline, mail("a@customer.example"))
    b = accept(pipeline, mail("b@customer.example"))
    msg = mail(
        "c@customer.example",
        in_reply_to="a@customer.example",
        references=["b@x", "b@customer.example"],
    )
    r = accept(pipeline, msg)
    assert r.decision.rule == "in-reply-to"
    assert r.interaction_id == a.interaction_id != b.interaction_id


def test_references_take_the_nearest_stored_parent_first(pipeline: Pipeline) -> None:
    """References are read last to first: the nearest stored ancestor decides."""
    a = accept(pipeline, mail("a@customer.example"))
    b = accept(pipeline, mail("b@customer.example"))
    r = accept(
        pipeline,
        mail("c@customer.example", references=["a@customer.example", "b@customer.example"]),
    )
    assert r.decision.rule == "references"
    assert r.decision.matched_id == "b@customer.example"
    assert r.interaction_id == b.interaction_id != a.interaction_id


def test_references_skip_ancestors_that_are_not_stored(pipeline: Pipeline) -> None:
    """An unknown nearer id (a missing message) is passed over for a stored older one."""
    a = accept(pipeline, mail("a@customer.example"))
    r = accept(
        pipeline,
        mail(
            "c@customer.example",
            in_reply_to="gone@customer.example",
            references=["a@customer.example", "gone@customer.example"],
        ),
    )
    assert r.decision.rule == "references"
    assert r.decision.matched_id == "a@customer.example"
    assert r.interaction_id == a.interaction_id


def test_shared_reference_joins_siblings_of_a_missing_parent(pipeline: Pipeline) -> None:
    """Two replies to a message we never stored end up together through the missing id."""
    first = accept(pipeline, mail("r1@customer.example", in_reply_to="gone@agent.example"))
    second = accept(pipeline, mail("r2@customer.example", in_reply_to="gone@agent.example"))
    assert first.decision.rule == "new-interaction"
    assert second.decision.rule == "shared-reference"
    assert second.decision.matched_id == "gone@agent.example"
    assert second.interaction_id == first.interaction_id


def test_referenced_by_joins_a_parent_that_arrives_after_its_reply(pipeline: Pipeline) -> None:
    """A reply stored first names the parent; the parent then joins the reply's interaction."""
    reply = accept(pipeline, mail("r1@customer.example", in_reply_to="root@customer.example"))
    root = accept(pipeline, mail("root@customer.example"))
    assert root.decision.rule == "referenced-by"
    assert root.decision.matched_id == "root@customer.example"
    assert root.interaction_id == reply.interaction_id


def test_a_message_linking_two_interactions_joins_one_without_merging(pipeline: Pipeline) -> None:
    """First match wins: the nearest stored parent decides and the two interactions stay apart."""
    a = accept(pipeline, mail("a@customer.example"))
    b = accept(pipeline, mail("b@customer.example"))
    link = accept(
        pipeline,
        mail(
            "c@customer.example",
            in_reply_to="b@customer.example",
            references=["a@customer.example", "b@customer.example"],
        ),
    )
    assert link.interaction_id == b.interaction_id
    assert a.interaction_id != b.interaction_id
    assert interaction_count(pipeline) == 2


# ---------------------------------------------------------------------------- across accounts


def test_reply_to_support_resolves_to_thread_started_at_sales(pipeline: Pipeline) -> None:
    """A reply addressed to support@ joins the sales@ interaction and goes to its owner."""
    root = accept(pipeline, mail("root@customer.example", to=SALES), "sales")
    reply = accept(
        pipeline,
        mail("r1@customer.example", to=SUPPORT, in_reply_to="root@customer.example"),
        "support",
    )
    assert reply.interaction_id == root.interaction_id
    assert reply.decision.rule == "in-reply-to"
    assert reply.decision.receiving == "support"
    assert (reply.decision.action, reply.decision.deliver_to) == ("route", "sales")


def test_references_resolve_across_accounts(pipeline: Pipeline) -> None:
    """References alone (no In-Reply-To) find a thread stored for the other account."""
    root = accept(pipeline, mail("root@customer.example", to=SALES), "sales")
    reply = accept(
        pipeline,
        mail("r1@customer.example", to=SUPPORT, references=["root@customer.example"]),
        "support",
    )
    assert reply.decision.rule == "references"
    assert reply.interaction_id == root.interaction_id


def test_shared_reference_resolves_across_accounts(pipeline: Pipeline) -> None:
    """Siblings of a missing parent join even when sent to different accounts."""
    first = accept(
        pipeline, mail("r1@customer.example", to=SALES, in_reply_to="gone@agent.example"), "sales"
    )
    second = accept(
        pipeline,
        mail("r2@customer.example", to=SUPPORT, in_reply_to="gone@agent.example"),
        "support",
    )
    assert second.decision.rule == "shared-reference"
    assert second.interaction_id == first.interaction_id


def test_referenced_by_resolves_across_accounts(pipeline: Pipeline) -> None:
    """A parent reaching sales@ after its reply reached support@ joins the reply's interaction."""
    reply = accept(
        pipeline,
        mail("r1@customer.example", to=SUPPORT, in_reply_to="root@customer.example"),
        "support",
    )
    root = accept(pipeline, mail("root@customer.example", to=SALES), "sales")
    assert root.decision.rule == "referenced-by"
    assert root.interaction_id == reply.interaction_id
    assert (root.decision.action, root.decision.deliver_to) == ("route", "support")


def test_known_message_across_accounts_is_attached_not_stored_again(pipeline: Pipeline) -> None:
    """One message Cc'd to both accounts: the second copy is attached to the same interaction."""
    raw = mail("root@customer.example", to=f"{SALES}, {SUPPORT}")
    first = accept(pipeline, raw, "sales")
    second = accept(pipeline, raw, "support")
    assert second.decision.action == "attach"
    assert second.decision.rule == "known-message"
    assert second.interaction_id == first.interaction_id
    assert second.message_pk == first.message_pk


# ---------------------------------------------------------------------------- pure function


class FakeIndex:
    """A ThreadIndex from two dicts: stored Message-IDs and ids that stored messages name.

    Every interaction's only participant is ``customer@x``.
    """

    def __init__(
        self, known: dict[str, int], referenced: dict[str, int], sent: frozenset[str] = frozenset()
    ) -> None:
        self.known, self.referenced, self.sent = known, referenced, sent

    def outbound(self, ids: Sequence[str]) -> set[str]:
        return {i for i in ids if i in self.sent}

    def participants(self, interaction_id: int) -> set[str]:
        return {"customer@x"}

    def interactions_of(self, ids: Sequence[str]) -> dict[str, int]:
        return {i: self.known[i] for i in ids if i in self.known}

    def interactions_referencing(self, ids: Sequence[str]) -> dict[str, int]:
        return {i: self.referenced[i] for i in ids if i in self.referenced}


@pytest.mark.parametrize(
    ("known", "referenced", "expected"),
    [
        ({"m@x": 1, "p@x": 2}, {"p@x": 3, "m@x": 4}, (1, "known-message", "m@x")),
        ({"p@x": 2, "r2@x": 5}, {"p@x": 3, "m@x": 4}, (2, "in-reply-to", "p@x")),
        ({"r1@x": 6, "r2@x": 5}, {"p@x": 3, "m@x": 4}, (5, "references", "r2@x")),
        ({}, {"r1@x": 7, "p@x": 3, "m@x": 4}, (3, "shared-reference", "p@x")),
        ({}, {"m@x": 4}, (4, "referenced-by", "m@x")),
        ({}, {}, (None, "new-interaction", None)),
    ],
    ids=["known-message", "in-reply-to", "references", "shared-reference", "referenced-by", "new"],
)
def test_resolve_is_a_pure_function_of_headers_and_index(
    known: dict[str, int], referenced: dict[str, int], expected: tuple[int | None, str, str | None]
) -> None:
    """Each rule wins exactly when every rule above it finds nothing."""
    msg = parse(
        b"From: customer@x\nMessage-ID: <m@x>\nIn-Reply-To: <p@x>\n"
        b"References: <r1@x> <r2@x> <p@x>\n\nhi\n"
    )
    found = resolve(msg, FakeIndex(known, referenced))
    assert (found.interaction_id, found.rule, found.matched_id) == expected


def test_referenced_lookup_is_skipped_when_a_stored_parent_decides() -> None:
    """A reply to a stored message costs one look-up; the second is made only when needed."""

    class CountingIndex(FakeIndex):
        referencing_calls = 0

        def interactions_referencing(self, ids: Sequence[str]) -> dict[str, int]:
            self.referencing_calls += 1
            return super().interactions_referencing(ids)

    reply = parse(b"From: customer@x\nMessage-ID: <m@x>\nIn-Reply-To: <p@x>\n\nhi\n")
    stored_parent = CountingIndex({"p@x": 2}, {})
    assert resolve(reply, stored_parent).rule == "in-reply-to"
    assert stored_parent.referencing_calls == 0
    missing_parent = CountingIndex({}, {"p@x": 3})
    assert resolve(reply, missing_parent).rule == "shared-reference"
    assert missing_parent.referencing_calls == 1


def test_a_stored_parent_we_sent_joins_only_a_known_participant() -> None:
    """In-Reply-To / References naming our own notice: weak, unlike a customer's message."""
    stranger = parse(b"From: mallory@y\nMessage-ID: <m@y>\nIn-Reply-To: <notice@us>\n\nhi\n")
    customer = parse(b"From: customer@x\nMessage-ID: <c@x>\nIn-Reply-To: <notice@us>\n\nhi\n")
    index = FakeIndex({"notice@us": 4}, {}, sent=frozenset({"notice@us"}))
    refused = resolve(stranger, index)
    assert (refused.interaction_id, refused.rule) == (None, "new-interaction")
    assert refused.note == "in-reply-to <notice@us> ignored: sender not a participant of 4"
    joined = resolve(customer, index)
    assert (joined.interaction_id, joined.rule, joined.matched_id) == (
        4,
        "in-reply-to",
        "notice@us",
    )
    by_references = parse(b"From: mallory@y\nMessage-ID: <m2@y>\nReferences: <notice@us>\n\nhi\n")
    assert resolve(by_references, index).rule == "new-interaction"
    # The same id received from a customer (not sent by us) is a strong signal.
    assert resolve(stranger, FakeIndex({"notice@us": 4}, {})).interaction_id == 4


def test_subject_token_joins_only_a_known_participant() -> None:
    """[#4] in the subject is a weak signal, found only with the token configured."""

    def msg(sender: str) -> ParsedMessage:
        return parse(f"From: {sender}\nSubject: Re: Order [#4]\nMessage-ID: <t@z>\n\nhi\n".encode())

    index = FakeIndex({}, {})
    joined = resolve(msg("customer@x"), index, subject_token="[#{id}]")
    assert (joined.interaction_id, joined.rule, joined.note) == (4, "subject-token", "[#4]")
    refused = resolve(msg("mallory@y"), index, subject_token="[#{id}]")
    assert (refused.interaction_id, refused.rule) == (None, "new-interaction")
    assert refused.note == "subject-token [#4] ignored: sender not a participant of 4"
    assert resolve(msg("customer@x"), index).rule == "new-interaction"  # token off
    other = resolve(msg("customer@x"), index, subject_token="[Ticket#{id}]")
    assert other.rule == "new-interaction"  # another shape is not our token
