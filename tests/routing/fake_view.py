"""An in-memory ``RoutingView`` and small messages, for routing tests that need no store."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from mailrouter.parse import ParsedMessage, parse

ORDER = 7  # the interaction the stored conversation is in


@dataclass
class FakeView:
    """What the store knows, as dicts; ``calls`` counts each look-up a decision made."""

    by_id: dict[str, int] = field(default_factory=dict)  # stored Message-ID → interaction
    pointed_at: dict[str, int] = field(default_factory=dict)  # id a stored message cites
    owners: dict[int, str] = field(default_factory=dict)
    copies: dict[tuple[str, str], tuple[int, set[str]]] = field(default_factory=dict)
    sent: set[str] = field(default_factory=set)  # stored Message-IDs of mail we sent
    calls: Counter[str] = field(default_factory=Counter)

    def interactions_of(self, ids: Sequence[str]) -> dict[str, int]:
        self.calls["interactions_of"] += 1
        return {i: self.by_id[i] for i in ids if i in self.by_id}

    def interactions_referencing(self, ids: Sequence[str]) -> dict[str, int]:
        self.calls["interactions_referencing"] += 1
        return {i: self.pointed_at[i] for i in ids if i in self.pointed_at}

    def outbound(self, ids: Sequence[str]) -> set[str]:
        self.calls["outbound"] += 1
        return {i for i in ids if i in self.sent}

    def participants(self, interaction_id: int) -> set[str]:
        """Every conversation's only participant is the customer :func:`mail` writes as."""
        self.calls["participants"] += 1
        return {"customer@example.net"}

    def owner_of(self, interaction_id: int) -> str:
        self.calls["owner_of"] += 1
        return self.owners[interaction_id]

    def existing(self, message_id: str, content_hash: str) -> tuple[int, set[str]] | None:
        self.calls["existing"] += 1
        return self.copies.get((message_id, content_hash))

    def store(self, msg: ParsedMessage, pk: int, *accounts: str) -> None:
        """Record ``msg`` as stored for ``accounts`` in the conversation."""
        self.by_id[msg.message_id] = ORDER
        self.copies[msg.message_id, msg.content_hash] = (pk, set(accounts))


def mail(
    mid: str, *, in_reply_to: str | None = None, references: Sequence[str] = ()
) -> ParsedMessage:
    """A small well-formed customer mail to sales@."""
    lines = [
        "From: Customer <customer@example.net>",
        "To: sales@example.test",
        "Subject: Order 7",
        f"Message-ID: <{mid}>",
    ]
    if in_reply_to:
        lines.append(f"In-Reply-To: <{in_reply_to}>")
    if references:
        lines.append("References: " + " ".join(f"<{r}>" for r in references))
    return parse(("\r\n".join(lines) + "\r\n\r\nWhere is my order?\r\n").encode())


def conversation(owner: str) -> FakeView:
    """A store holding the customer's first mail <ask@c>, in an interaction ``owner`` owns."""
    view = FakeView(owners={ORDER: owner})
    view.store(mail("ask@c"), 1, "sales")
    return view
