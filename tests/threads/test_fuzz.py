"""Property-based fuzzing of header parsing and thread resolution (reliability issue,
item 8): ``parse()`` never raises on any header block (encoded-words, folding, odd bytes,
bare CR, NUL) and hands back one-line text and clean ids; ``resolve()`` against a fake
index never raises, only names interactions it was told about, and follows a weak signal
only for a participant.  Bounded and deterministic (derandomize, no database)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailrouter.parse import MAX_REFERENCES, ParsedMessage, parse
from mailrouter.threads import RULES, resolve

FUZZ = settings(
    max_examples=200,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

NAMES = st.one_of(
    st.sampled_from(
        [
            "From",
            "from",
            "To",
            "Cc",
            "Reply-To",
            "Subject",
            "SUBJECT",
            "Message-ID",
            "Message-Id",
            "In-Reply-To",
            "References",
            "Content-Type",
            "Auto-Submitted",
            "Precedence",
            "List-Id",
            "Return-Path",
            "Date",
            "X-Mailrouter-Loop",
            "X-Apple-Action",
        ]
    ),
    st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,12}", fullmatch=True),
)
IDS = st.sampled_from(["a@x", "b@x", "c@y", "ü@x", "order-é@shop", "n@us", "d@x"]).map(
    lambda i: f"<{i}>"
)
PIECES = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=10),
    IDS,
    st.sampled_from(
        [
            "=?utf-8?q?Zo=C3=AB?=",
            "=?utf-8?b?w7w=?=",
            "=?utf-8?q?=0D=0ABcc:_x@evil.test?=",
            "=?iso-8859-1?q?caf=E9?=",
            "=?bogus?q?x?=",
            "=?utf-8?q?unterminated",
            "\r\n ",
            "\r\n\t",
            "\n ",
            "\r",
            "\x00",
            "\x1b[2J",
            "\u2028",
            ", ",
            "<",
            ">",
            '"',
            "(comment)",
            "[#7]",
            "Re: ",
            "multipart/report; report-type=delivery-status",
            "auto-replied",
            "bulk",
        ]
    ),
)


@st.composite
def raw_message(draw: st.DrawFn) -> bytes:
    """A header block of hostile fields (in some encoding, some line ending), a body."""
    fields = draw(st.lists(st.tuples(NAMES, st.lists(PIECES, max_size=6)), max_size=12))
    eol = draw(st.sampled_from(["\r\n", "\n", "\r"]))
    encoding = draw(st.sampled_from(["utf-8", "latin-1"]))
    head = "".join(f"{name}: {''.join(value)}{eol}" for name, value in fields)
    raw = (head + eol + "body" + eol).encode(encoding, "replace")
    if draw(st.booleans()):
        raw = draw(st.binary(max_size=20)) + raw  # odd bytes before everything
    return raw


_ID_RE = re.compile(r"^[^\s<>]+$")


def check_parsed(msg: ParsedMessage) -> None:
    assert msg.message_id and _ID_RE.match(msg.message_id), msg.message_id
    for mid in (*msg.in_reply_to, *msg.references, *msg.parents):
        assert _ID_RE.match(mid), mid
    assert len(msg.in_reply_to) <= 1
    assert len(msg.references) <= MAX_REFERENCES
    assert msg.message_id not in msg.parents
    assert len(msg.parents) == len(set(msg.parents))
    for text in (msg.subject, msg.from_name):
        assert "\r" not in text and "\n" not in text
    for addr in (msg.from_email, msg.reply_to_email, *msg.recipients):
        assert addr == addr.lower()
    assert len(msg.recipients) == len(set(msg.recipients))
    assert re.fullmatch(r"[0-9a-f]{64}", msg.content_hash)
    assert msg.automatic is None or isinstance(msg.automatic, str)


@FUZZ
@given(raw=raw_message())
def test_parse_never_raises_and_returns_clean_facts(raw: bytes) -> None:
    """Any header block parses: one-line text, ids without whitespace, bounded lists."""
    msg = parse(raw)
    check_parsed(msg)
    again = parse(raw)
    assert (again.message_id, again.parents, again.automatic) == (
        msg.message_id,
        msg.parents,
        msg.automatic,
    )


@dataclass
class Store:
    """A fake ThreadIndex: stored ids with interaction and direction, cited ids, people."""

    stored: dict[str, tuple[int, str]] = field(default_factory=dict)
    cited: dict[str, int] = field(default_factory=dict)
    people: dict[int, set[str]] = field(default_factory=dict)

    def interactions_of(self, ids: Sequence[str]) -> dict[str, int]:
        return {i: self.stored[i][0] for i in ids if i in self.stored}

    def interactions_referencing(self, ids: Sequence[str]) -> dict[str, int]:
        return {i: self.cited[i] for i in ids if i in self.cited}

    def outbound(self, ids: Sequence[str]) -> set[str]:
        return {i for i in ids if i in self.stored and self.stored[i][1] == "outbound"}

    def participants(self, interaction_id: int) -> set[str]:
        return self.people.get(interaction_id, set())


ID_POOL = ["a@x", "b@x", "c@y", "n@us", "d@x", "e@z"]
SENDERS = ["ann@cust.test", "bob@cust.test", "mallory@evil.test", ""]


@st.composite
def store(draw: st.DrawFn) -> Store:
    iids = st.integers(1, 4)
    return Store(
        stored=draw(
            st.dictionaries(
                st.sampled_from(ID_POOL),
                st.tuples(iids, st.sampled_from(["inbound", "outbound"])),
                max_size=4,
            )
        ),
        cited=draw(st.dictionaries(st.sampled_from(ID_POOL), iids, max_size=3)),
        people=draw(
            st.dictionaries(
                iids, st.sets(st.sampled_from(SENDERS[:3]), min_size=1, max_size=2), max_size=4
            )
        ),
    )


@st.composite
def reply(draw: st.DrawFn) -> bytes:
    sender = draw(st.sampled_from(SENDERS))
    ids = st.sampled_from(ID_POOL).map(lambda i: f"<{i}>")
    lines = [f"From: {sender}"] if sender else []
    lines.append(f"Message-ID: {draw(ids)}")
    if draw(st.booleans()):
        lines.append(f"In-Reply-To: {draw(ids)}")
    if draw(st.booleans()):
        lines.append("References: " + " ".join(draw(st.lists(ids, max_size=4))))
    token = draw(st.sampled_from(["", " [#1]", " [#2]", " [#9]", " [#1] [#3]"]))
    lines.append(f"Subject: Re: chairs{token}")
    return ("\r\n".join(lines) + "\r\n\r\nhi\r\n").encode()


WEAK_ALWAYS = {"subject-token", "shared-reference", "referenced-by"}


@FUZZ
@given(index=store(), raw=reply(), identical=st.booleans(), token=st.booleans())
def test_resolution_names_only_known_interactions_and_weak_joins_need_a_participant(
    index: Store, raw: bytes, identical: bool, token: bool
) -> None:
    """resolve() on any message and store: a rule of the chain or new-interaction; an
    interaction the store (or the token) named; a weak signal only for a participant."""
    msg = parse(raw)
    found = resolve(msg, index, identical=identical, subject_token="[#{id}]" if token else None)
    assert found.rule in {r.name for r in RULES} | {"new-interaction"}
    event(found.rule)
    if found.interaction_id is None:
        assert found.rule == "new-interaction"
        return
    known = {iid for iid, _ in index.stored.values()} | set(index.cited.values())
    assert found.interaction_id in known or found.rule == "subject-token"
    weak = found.rule in WEAK_ALWAYS
    if found.rule == "known-message":
        weak = not identical
    if found.rule in ("in-reply-to", "references"):
        assert found.matched_id is not None
        assert index.stored[found.matched_id][0] == found.interaction_id
        weak = index.stored[found.matched_id][1] == "outbound"
    if weak:
        assert msg.from_email in index.participants(found.interaction_id)
