"""Lenient id parsing (``parse_ids``, ``ParsedMessage.parents``) on real files and inline cases."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mailrouter.ingest.replay import split_mbox
from mailrouter.parse import (
    MAX_REFERENCES,
    SYNTHETIC_DOMAIN,
    ParsedMessage,
    parse,
    parse_ids,
    trim_references,
)

GITLAB_KEY = "59d8df8370b7e95c5a49fbf86aeb2c93"
HYPERKITTY_PARENT = "200704070053.46646.other.person@example.com"


def corpus_message(corpora: Path, path: str, message_id: str | None = None) -> ParsedMessage:
    """A corpus file parsed; for an mbox, the message with ``message_id``."""
    data = (corpora / path).read_bytes()
    if message_id is None:
        return parse(data)
    for raw in split_mbox(data):
        msg = parse(raw)
        if msg.message_id == message_id:
            return msg
    raise AssertionError(f"{path}: no message <{message_id}>")


# ---------------------------------------------------------------------------- GitLab


@pytest.mark.corpora
def test_comma_after_space_separated_references_yield_every_id(corpora: Path) -> None:
    """``<a> <b>,<c>`` (GitLab fixture) gives the three ids in header order."""
    msg = corpus_message(
        corpora,
        "gitlab-incoming-email/"
        "reply_without_subaddressing_and_key_inside_references_with_a_comma.eml",
    )
    assert msg.references == [
        "issue_1@localhost",
        f"reply-{GITLAB_KEY}@localhost",
        "exchange@microsoft.com",
    ]


@pytest.mark.corpora
def test_quoted_comma_separated_references_yield_every_id(corpora: Path) -> None:
    """A References value that is one quoted string ``"<a>,<b>,<c>"`` still gives the ids."""
    msg = corpus_message(corpora, "gitlab-incoming-email/valid_reply_with_references_in_comma.eml")
    assert msg.references == [
        f"reply-{GITLAB_KEY}@localhost",
        "issue_1@localhost",
        "exchange@microsoft.com",
    ]


@pytest.mark.corpora
def test_parents_are_in_reply_to_then_references_nearest_first(corpora: Path) -> None:
    """parents: In-Reply-To first, then References from last to first, without repeats."""
    msg = corpus_message(
        corpora, "gitlab-incoming-email/reply_without_subaddressing_and_key_inside_references.eml"
    )
    assert msg.in_reply_to == ["issue_1@localhost"]
    assert msg.references == [f"reply-{GITLAB_KEY}@localhost", "issue_1@localhost"]
    assert msg.parents == ["issue_1@localhost", f"reply-{GITLAB_KEY}@localhost"]


@pytest.mark.corpora
def test_folded_references_inside_the_received_chain(corpora: Path) -> None:
    """A folded References between two Received lines gives both ids."""
    msg = corpus_message(corpora, "gitlab-incoming-email/service_desk_reference_headers.eml")
    assert msg.references == ["topic/35@some.other.server.example.com", "abc123@discourse-app.mail"]


@pytest.mark.corpora
def test_reply_address_used_as_message_id_is_kept_whole(corpora: Path) -> None:
    """``<reply+KEY@host>`` keeps its ``+`` sub-address as part of the id."""
    msg = corpus_message(corpora, "gitlab-incoming-email/key_in_headers_reply.eml")
    key_id = f"reply+{GITLAB_KEY}@appmail.adventuretime.ooo"
    assert msg.in_reply_to == [key_id]
    assert msg.references == ["issue_1@localhost", key_id]


@pytest.mark.corpora
def test_exchange_message_id_from_a_real_file(corpora: Path) -> None:
    """An Exchange DAG Message-ID (upper-case host with a dash) is read as written."""
    msg = corpus_message(corpora, "gitlab-incoming-email/envelope_to_header.eml")
    assert msg.message_id == "7e2296f83dbf4de388cbf5f56f52c11f@EXDAG29-1.EXCHANGE.INT"
    assert not msg.synthetic_id


# ---------------------------------------------------------------------------- HyperKitty


@pytest.mark.corpora
def test_free_text_in_reply_to_yields_the_id_at_its_end(corpora: Path) -> None:
    """HyperKitty's strange In-Reply-To gives the parent its test expects."""
    msg = corpus_message(corpora, "hyperkitty/strange-in-reply-to-header.txt")
    assert msg.in_reply_to == [HYPERKITTY_PARENT]
    assert msg.parents == [HYPERKITTY_PARENT]


@pytest.mark.corpora
def test_truncated_in_reply_to_yields_no_parent(corpora: Path) -> None:
    """HyperKitty's truncated In-Reply-To (``<…@example``) gives no parent (upstream: None)."""
    msg = corpus_message(corpora, "hyperkitty/wrong-in-reply-to-header.txt")
    assert msg.in_reply_to == []
    assert msg.parents == []


# ---------------------------------------------------------------------------- Mail::Thread


@pytest.mark.corpora
def test_free_text_in_reply_to_without_any_id_yields_nothing(corpora: Path) -> None:
    """``Joanna Farley's message as of Nov 13`` names no id; folded References still count."""
    msg = corpus_message(
        corpora, "perl-mail-thread/testbox-7", "1021113100650.ZM12997@skye.rdg.opengroup.org"
    )
    assert msg.in_reply_to == []
    assert msg.references == [
        "200211120937.JAA28130@xoneweb.opengroup.org",
        "1021112125524.ZM7503@skye.rdg.opengroup.org",
        "3DD221BB.13116D47@sun.com",
    ]


@pytest.mark.corpora
def test_in_reply_to_with_trailing_mutt_attribution(corpora: Path) -> None:
    """``<id>; from abigail@foad.org on Thu, …`` gives the id, not the bare address."""
    msg = corpus_message(
        corpora,
        "perl-mail-thread/testbox-3",
        "20030102115117.A21351@cs839290-a.mtth.phub.net.cable.rogers.com",
    )
    assert msg.in_reply_to == ["20030102152943.D635@hermione.osp.nl"]


@pytest.mark.corpora
def test_outlook_express_ids_with_dollar_signs(corpora: Path) -> None:
    """Outlook Express ids (``000001c2b64c$03af8740$56734151@noos.fr``) are read whole."""
    msg = corpus_message(
        corpora, "perl-mail-thread/testbox", "000001c2b64c$03af8740$56734151@noos.fr"
    )
    assert msg.in_reply_to == ["avefva+gol5@eGroups.com"]


@pytest.mark.corpora
def test_mh_style_in_reply_to_still_reaches_the_parent_through_references(corpora: Path) -> None:
    """testbox-6's ``Message from NAME <addr> of "DATE" <id>`` parent is among the parents."""
    msg = corpus_message(
        corpora, "perl-mail-thread/testbox-6", "E18GPHf-0000zp-00@cloaked.freeserve.co.uk"
    )
    assert "15842.10677.577458.656565@jupiter.akutech-local.de" in msg.parents


@pytest.mark.corpora
@pytest.mark.xfail(
    strict=True,
    reason="In-Reply-To keeps only its first <…> (RFC 5322 3.6.4 copies a single id into "
    "References); in the MH/exmh form the first <…> is the sender's address",
)
def test_mh_style_in_reply_to_names_the_message_not_the_sender(corpora: Path) -> None:
    """``Message from Ralf Fassel <ralf@akutech.de> of "…" <15842…>``: In-Reply-To is 15842…"""
    msg = corpus_message(
        corpora, "perl-mail-thread/testbox-6", "E18GPHf-0000zp-00@cloaked.freeserve.co.uk"
    )
    assert msg.in_reply_to == ["15842.10677.577458.656565@jupiter.akutech-local.de"]


# ---------------------------------------------------------------------------- Discourse


@pytest.mark.corpora
def test_references_that_omit_the_direct_parent(corpora: Path) -> None:
    """Discourse reply 4: In-Reply-To <36>, folded References <34> <35>: nearest first."""
    msg = corpus_message(corpora, "discourse-email-receiver/email_reply_4.eml")
    assert msg.parents == ["36@foo.bar.mail", "35@foo.bar.mail", "34@foo.bar.mail"]


@pytest.mark.corpora
def test_missing_message_id_gets_a_stable_synthetic_id(corpora: Path) -> None:
    """No Message-ID: the synthetic id is the same on every parse and after another Received."""
    raw = (corpora / "discourse-email-receiver/missing_message_id.eml").read_bytes()
    first, second = parse(raw), parse(raw)
    assert first.synthetic_id
    assert first.message_id.endswith(f"@{SYNTHETIC_DOMAIN}")
    assert first.message_id == second.message_id
    relayed = (
        b"Received: from relay.example.net by mx.example.test; Mon, 1 Jan 2024 00:00:00 +0000\n"
    )
    assert parse(relayed + raw).message_id == first.message_id
    assert parse(raw + b"\nanother body\n").message_id != first.message_id


# ---------------------------------------------------------------------------- inline


@pytest.mark.parametrize(
    ("value", "ids"),
    [
        ("a@b c@d", ["a@b", "c@d"]),
        ("a@b,c@d", ["a@b", "c@d"]),
        (
            "faff5b13bff19cf16f0fbf46edb721e3@zohomail.com",
            ["faff5b13bff19cf16f0fbf46edb721e3@zohomail.com"],
        ),
        ("yesterday's message", []),
        ("<a@b>\r\n <c@d>", ["a@b", "c@d"]),
        ("<1234.5678@\r\n example.com>", ["1234.5678@example.com"]),
        ("<a@b> <a@b> <c@d>", ["a@b", "c@d"]),
        ("<a@b> <c@d", ["a@b"]),
        ("", []),
    ],
    ids=[
        "no-brackets-space",
        "no-brackets-comma",
        "no-brackets-single",
        "free-text-no-id",
        "folded-between-ids",
        "folded-inside-id",
        "repeated-id",
        "truncated-last-id",
        "empty",
    ],
)
def test_parse_ids_inline(value: str, ids: list[str]) -> None:
    """Missing brackets, folding, repeats and truncation, one value each."""
    assert parse_ids(value) == ids


@pytest.mark.parametrize(
    "header_id",
    [
        # email.policy.default raises IndexError on these (CPython gh-86650, gh-94306).
        "<[ABCDEF====@microsoft.com]>",
        "<[anu10].1c69fb81.7aec0.5503SMTPIN_ADDED_[au5]@[anu13].EURPRD10.PROD.OUTLOOK.COM>",
        "<AM6PR04MB5639F0C9A2A0B1E0F1B9C3F8D1A79@AM6PR04MB5639.eurprd04.prod.outlook.com>",
    ],
    ids=["one-off-bracketed", "smtpin-added", "outlook-com"],
)
def test_exchange_ids_round_trip_into_a_reply(header_id: str) -> None:
    """An Exchange-style id parses, and a reply naming it yields the very same id."""
    original = parse(f"Message-ID: {header_id}\nSubject: order\n\nbody\n".encode())
    reply = parse(
        f"Message-ID: <r1@customer.example>\nIn-Reply-To: {header_id}\n"
        f"References: {header_id}\n\nthanks\n".encode()
    )
    assert not original.synthetic_id
    assert original.message_id == header_id[1:-1]
    assert reply.parents == [original.message_id]


def test_message_id_without_brackets_or_at_sign_is_not_trusted() -> None:
    """A bare token with no ``@`` cannot be told from free text: a synthetic id is used."""
    msg = parse(b"Message-ID: N77056c0a550a010202b5c\nSubject: x\n\nbody\n")
    assert msg.synthetic_id
    assert msg.message_id.endswith(f"@{SYNTHETIC_DOMAIN}")


def test_repeated_references_headers_are_read_together() -> None:
    """Two References fields (broken clients) are read as one list, in order."""
    msg = parse(b"Message-ID: <x@y>\nReferences: <a@b>\nReferences: <c@d>\n\nbody\n")
    assert msg.references == ["a@b", "c@d"]
    assert msg.parents == ["c@d", "a@b"]


def test_own_id_is_never_its_own_parent() -> None:
    """A message whose References include its own Message-ID does not list itself as parent."""
    msg = parse(b"Message-ID: <x@y>\nIn-Reply-To: <x@y>\nReferences: <a@b> <x@y>\n\nbody\n")
    assert msg.parents == ["a@b"]


# ---------------------------------------------------------------------------- long id lists

HOSTILE = 40_000  # ids in the probe that took 16 s to parse before ids were parsed linearly


def hostile_ids(n: int = HOSTILE) -> list[str]:
    return [f"ancestor-{k:06d}@hostile.example" for k in range(n)]


def folded(name: str, ids: list[str]) -> bytes:
    return (f"{name}: " + "\r\n ".join(f"<{i}>" for i in ids) + "\r\n").encode()


def with_headers(fields: bytes) -> bytes:
    return b"Message-ID: <probe@hostile.example>\r\n" + fields + b"Subject: x\r\n\r\nbody\r\n"


def test_long_references_keep_the_root_and_the_nearest_ancestors() -> None:
    """40,000 References ids: the first (the root) and the last MAX_REFERENCES - 1 are kept."""
    ids = hostile_ids()
    msg = parse(with_headers(folded("References", ids)))
    assert msg.references == [ids[0], *ids[-(MAX_REFERENCES - 1) :]]
    assert msg.parents == msg.references[::-1]
    assert msg.parents[0] == ids[-1]
    assert msg.parents[-1] == ids[0]


def test_references_at_the_cap_are_kept_whole() -> None:
    """Exactly MAX_REFERENCES ids lose none; one more loses the second id."""
    ids = hostile_ids(MAX_REFERENCES + 1)
    assert parse(with_headers(folded("References", ids[:-1]))).references == ids[:-1]
    assert parse(with_headers(folded("References", ids))).references == [ids[0], *ids[2:]]


def test_one_references_field_per_id_is_trimmed_like_one_field() -> None:
    """40,000 ``References:`` fields, one id each, are joined and then trimmed the same way."""
    ids = hostile_ids()
    fields = b"".join(f"References: <{i}>\r\n".encode() for i in ids)
    assert parse(with_headers(fields)).references == [ids[0], *ids[-(MAX_REFERENCES - 1) :]]


def test_long_in_reply_to_keeps_only_its_first_id() -> None:
    """40,000 In-Reply-To ids: the first is the parent, the rest are ignored."""
    ids = hostile_ids()
    msg = parse(with_headers(folded("In-Reply-To", ids)))
    assert msg.in_reply_to == [ids[0]]
    assert msg.parents == [ids[0]]


def test_repeats_are_dropped_before_trimming() -> None:
    """40,000 copies of three ids yield the three, in first-seen order."""
    value = " ".join(["<c@x>", "<a@x>", "<b@x>"] * (HOSTILE // 3))
    assert parse_ids(value) == ["c@x", "a@x", "b@x"]
    assert parse(with_headers(f"References: {value}\r\n".encode())).references == [
        "c@x",
        "a@x",
        "b@x",
    ]


class CountingId(str):
    """An id that counts its equality comparisons (its hash stays str's)."""

    comparisons = 0

    def __eq__(self, other: object) -> bool:
        CountingId.comparisons += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_parents_are_deduplicated_without_comparing_ids_pairwise() -> None:
    """Deduplicating n parents compares ids at most about n times, not n²/2 (a list ``in``)."""
    msg = parse(with_headers(b"References: <a@x>\r\n"))
    ids: list[str] = [CountingId(i) for i in hostile_ids(2_000)]
    CountingId.comparisons = 0
    reparsed = dataclasses.replace(msg, references=ids)
    assert reparsed.parents == ids[::-1]
    assert CountingId.comparisons <= len(ids)


def test_parents_are_computed_once() -> None:
    """``parents`` is a value, not a recomputation on every read."""
    msg = parse(with_headers(folded("References", hostile_ids(3))))
    assert msg.parents is msg.parents


def test_trim_references_keeps_first_and_last() -> None:
    """``trim_references`` is the rule notices use too: first id, then the last limit - 1."""
    assert trim_references(["a", "b", "c", "d", "e"], 3) == ["a", "d", "e"]
    assert trim_references(["a", "b"], 3) == ["a", "b"]
    with pytest.raises(ValueError, match="at least 2"):
        trim_references(["a", "b", "c"], 1)


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_non_ascii_message_ids_are_kept_byte_exact(encoding: str) -> None:
    """Raw 8-bit ids keep every byte: UTF-8 as text, other bytes as \\xNN escapes."""
    ids = {}
    for letter in "üé":
        raw = (
            f"Message-ID: <order-{letter}@shop.test>\nIn-Reply-To: <p-{letter}@shop.test>\n"
            f"References: <r-{letter}@shop.test> <p-{letter}@shop.test>\n\nhi\n"
        ).encode(encoding)
        msg = parse(raw)
        ids[letter] = (msg.message_id, msg.in_reply_to, msg.references)
    assert ids["ü"] != ids["é"]
    for letter in "üé":
        shown = letter if encoding == "utf-8" else f"\\x{ord(letter):02x}"
        assert ids[letter] == (
            f"order-{shown}@shop.test",
            [f"p-{shown}@shop.test"],
            [f"r-{shown}@shop.test", f"p-{shown}@shop.test"],
        )
