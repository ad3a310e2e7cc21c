"""Which interaction a message belongs to, from its id headers and what the store knows.

Resolution spans every account (scoping it to one mailbox is the classic helpdesk bug:
after a move, replies to the old mailbox would open new conversations).  The rules run
top to bottom; the first that finds an interaction decides and is named in the log.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Protocol

from mailrouter.parse import ParsedMessage

__all__ = ["RULES", "Resolution", "ThreadIndex", "resolve", "token_pattern"]


class ThreadIndex(Protocol):
    """Read access to what the store knows about message ids."""

    def interactions_of(self, ids: Sequence[str]) -> dict[str, int]:
        """Stored messages with these Message-IDs → their interaction (earliest wins)."""

    def interactions_referencing(self, ids: Sequence[str]) -> dict[str, int]:
        """Ids that some stored message points at (In-Reply-To/References) → its interaction."""

    def outbound(self, ids: Sequence[str]) -> set[str]:
        """Those of ``ids`` whose stored message (the one :meth:`interactions_of` names) is
        one we sent: a notice or an agent's reply."""

    def participants(self, interaction_id: int) -> set[str]:
        """Lower-case addresses known in the interaction: its customer, every sender of
        inbound mail in it and everyone that mail was addressed to."""


@dataclass(frozen=True)
class Resolution:
    interaction_id: int | None
    rule: str
    matched_id: str | None = None
    # Why a weak signal was not followed (a stranger), for the routing log.
    note: str | None = None


@cache
def token_pattern(token: str) -> re.Pattern[str]:
    """The regular expression that finds subject tokens of the shape ``token``
    (``[#{id}]`` → ``[#42]``); the interaction id is its one group."""
    head, _field, tail = token.partition("{id}")
    return re.compile(re.escape(head) + r"([0-9]{1,18})" + re.escape(tail))


class Facts:
    """The look-ups every rule may use, each done at most once per message (indexed queries).

    ``referenced`` is only read by the last two rules.  Most mail is a reply whose parent is
    stored, decided by the first three rules, so that second query is made on first use.
    """

    def __init__(
        self,
        msg: ParsedMessage,
        index: ThreadIndex,
        *,
        identical: bool = False,
        subject_token: str | None = None,
    ) -> None:
        self.msg = msg
        self._index = index
        # An identical copy of this very message is stored (same id and content hash).
        self.identical = identical
        self.token = token_pattern(subject_token) if subject_token else None
        self.known = index.interactions_of([msg.message_id, *msg.parents])
        # From only: Reply-To is whatever the sender wants answers to go to, so naming a
        # customer there must not make a stranger a participant.
        self.sender = {msg.from_email.lower()} if msg.from_email else set()
        self.refused: list[str] = []
        self._participant: dict[int, bool] = {}

    def lookup(self, ids: Sequence[str]) -> dict[str, int]:
        """Stored messages with these Message-IDs → their interaction (one more query)."""
        return self._index.interactions_of(ids)

    @cached_property
    def referenced(self) -> dict[str, int]:
        return self._index.interactions_referencing([*self.msg.parents, self.msg.message_id])

    @cached_property
    def outbound(self) -> set[str]:
        """Which of the known ids are messages we sent (asked only once a parent matched)."""
        return self._index.outbound(list(self.known))

    def parent(self, rule: str, mid: str) -> Resolution | None:
        """Follow a stored parent: strong for mail we received, weak for mail we sent.

        The Message-ID of one of our notices or replies is in the customer's mailbox, and
        in any mailbox it was forwarded to: someone who answers it is not for that alone
        a party to the conversation (reliability issue, "Thread hijack").
        """
        if mid in self.outbound:
            return self.weak(rule, self.known[mid], mid)
        return Resolution(self.known[mid], rule, mid)

    def weak(
        self, rule: str, interaction_id: int, mid: str | None, *, signal: str | None = None
    ) -> Resolution | None:
        """Follow a weak signal only for a known participant of that interaction.

        Message-IDs can be guessed or copied: a stranger who reuses a customer's
        Message-ID, or answers the same newsletter, must not land in (and then receive
        the agent's reply to) someone else's conversation.  Refusals are remembered so
        the routing log can say why the message opened a new interaction instead.
        """
        ok = self._participant.get(interaction_id)
        if ok is None:
            ok = bool(self.sender & self._index.participants(interaction_id))
            self._participant[interaction_id] = ok
        if ok:
            return Resolution(interaction_id, rule, mid, note=signal)
        shown = signal or f"<{mid}>"
        self.refused.append(f"{rule} {shown} ignored: sender not a participant of {interaction_id}")
        return None


class ThreadRule(Protocol):
    name: str
    description: str

    def check(self, facts: Facts) -> Resolution | None: ...


class BounceOf:
    name = "bounce-of"
    description = "a bounce (DSN) of a stored message, one of our notices or replies"

    def check(self, facts: Facts) -> Resolution | None:
        bounce = facts.msg.bounce
        if bounce is None or bounce.original_message_id is None:
            return None
        mid = bounce.original_message_id
        # Our own outbound Message-IDs are random, so a report naming one was sent by
        # whoever received that message: a strong signal, though it comes from a robot.
        found = facts.lookup([mid]).get(mid)
        return Resolution(found, self.name, mid) if found is not None else None


class KnownMessage:
    name = "known-message"
    description = "its own Message-ID is already stored (a copy, a redelivery, a Cc)"

    def check(self, facts: Facts) -> Resolution | None:
        mid = facts.msg.message_id
        if mid not in facts.known:
            return None
        if facts.identical:
            return Resolution(facts.known[mid], self.name, mid)
        # Same id, other content: the same message only if a participant sent it.
        return facts.weak(self.name, facts.known[mid], mid)


class InReplyTo:
    name = "in-reply-to"
    description = (
        "its In-Reply-To names a stored message (one we sent: only for a known participant)"
    )

    def check(self, facts: Facts) -> Resolution | None:
        for mid in facts.msg.in_reply_to:
            if mid in facts.known:
                found = facts.parent(self.name, mid)
                if found is not None:
                    return found
        return None


class References:
    name = "references"
    description = (
        "its References name a stored message, nearest parent first "
        "(one we sent: only for a known participant)"
    )

    def check(self, facts: Facts) -> Resolution | None:
        for mid in reversed(facts.msg.references):
            if mid in facts.known and mid != facts.msg.message_id:
                found = facts.parent(self.name, mid)
                if found is not None:
                    return found
        return None


class SubjectToken:
    name = "subject-token"
    description = (
        "its subject carries an interaction's token ([#42]) and a known participant sent it"
    )

    def check(self, facts: Facts) -> Resolution | None:
        if facts.token is None:
            return None
        # A client that drops References (some webmail, a forward by hand) still keeps the
        # subject.  The token is a weak signal: interaction ids are small numbers.
        for match in facts.token.finditer(facts.msg.subject[:1000]):
            found = facts.weak(self.name, int(match.group(1)), None, signal=match.group(0))
            if found is not None:
                return found
        return None


class SharedReference:
    name = "shared-reference"
    description = "it points at a missing ancestor that a stored message also points at"

    def check(self, facts: Facts) -> Resolution | None:
        for mid in facts.msg.parents:
            if mid in facts.referenced:
                found = facts.weak(self.name, facts.referenced[mid], mid)
                if found is not None:
                    return found
        return None


class ReferencedBy:
    name = "referenced-by"
    description = "a stored reply already points at it (the reply arrived first)"

    def check(self, facts: Facts) -> Resolution | None:
        mid = facts.msg.message_id
        if mid in facts.referenced:
            return facts.weak(self.name, facts.referenced[mid], mid)
        return None


RULES: tuple[ThreadRule, ...] = (
    BounceOf(),
    KnownMessage(),
    InReplyTo(),
    References(),
    SubjectToken(),
    SharedReference(),
    ReferencedBy(),
)
NEW_INTERACTION = "new-interaction"


def resolve(
    msg: ParsedMessage,
    index: ThreadIndex,
    *,
    identical: bool = False,
    subject_token: str | None = None,
) -> Resolution:
    """Run the rule chain; no match means the message opens a new interaction.

    ``identical``: an identical copy of ``msg`` is already stored (a Cc to a second
    account, a redelivery), so its own Message-ID is a strong signal.  ``subject_token``:
    the configured token shape (``notify.subject_token``, ``[#{id}]``), or None for none.
    """
    facts = Facts(msg, index, identical=identical, subject_token=subject_token)
    for rule in RULES:
        found = rule.check(facts)
        if found is not None:
            return found
    return Resolution(None, NEW_INTERACTION, note="; ".join(facts.refused) or None)
