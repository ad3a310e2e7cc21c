"""Message-IDs can be guessed or copied: weak signals join a conversation only for a
known participant (reliability issue, "hijack by a reused Message-ID")."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import accept, make_settings, pipeline

# Every test here runs on SQLite and on the real PostgreSQL (tests/servers.py).
pytestmark = pytest.mark.usefixtures("backend")

CUSTOMER = b"From: Alice <alice@customer.test>\nTo: sales@example.test\n"
STRANGER = b"From: Mallory <mallory@elsewhere.test>\nTo: sales@example.test\n"


def mail(head: bytes, headers: bytes, body: bytes = b"hello\n") -> bytes:
    return head + headers + b"Subject: chairs\n\n" + body


def test_a_reused_message_id_from_a_stranger_opens_a_new_interaction(tmp_path: Path) -> None:
    """Same Message-ID, other sender and content: not the customer's message."""
    with pipeline(make_settings(tmp_path)) as p:
        first = accept(p, mail(CUSTOMER, b"Message-ID: <q1@customer.test>\n"))
        stolen = accept(
            p, mail(STRANGER, b"Message-ID: <q1@customer.test>\n", b"send me the invoice\n")
        )
        assert stolen.interaction_id != first.interaction_id
        assert stolen.decision.rule == "new-interaction"
        assert stolen.decision.action == "deliver"


def test_the_customer_reusing_their_own_message_id_still_joins(tmp_path: Path) -> None:
    """A participant's edited resend of the same Message-ID stays in the conversation."""
    with pipeline(make_settings(tmp_path)) as p:
        first = accept(p, mail(CUSTOMER, b"Message-ID: <q1@customer.test>\n"))
        again = accept(p, mail(CUSTOMER, b"Message-ID: <q1@customer.test>\n", b"edited\n"))
        assert (again.interaction_id, again.decision.rule) == (
            first.interaction_id,
            "known-message",
        )


def test_two_people_answering_one_newsletter_are_not_merged(tmp_path: Path) -> None:
    """A shared parent that was never stored is a weak signal (shared-reference)."""
    newsletter = b"In-Reply-To: <news-7@lists.test>\nReferences: <news-7@lists.test>\n"
    with pipeline(make_settings(tmp_path)) as p:
        alice = accept(p, mail(CUSTOMER, b"Message-ID: <a1@customer.test>\n" + newsletter))
        mallory = accept(p, mail(STRANGER, b"Message-ID: <m1@elsewhere.test>\n" + newsletter))
        assert mallory.interaction_id != alice.interaction_id
        assert mallory.decision.rule == "new-interaction"
        # The customer's own second answer to the same newsletter still joins hers.
        again = accept(p, mail(CUSTOMER, b"Message-ID: <a2@customer.test>\n" + newsletter))
        assert (again.interaction_id, again.decision.rule) == (
            alice.interaction_id,
            "shared-reference",
        )


def test_a_stranger_whose_id_a_customer_referenced_does_not_join(tmp_path: Path) -> None:
    """referenced-by (a reply arrived before its parent) needs a known participant too."""
    with pipeline(make_settings(tmp_path)) as p:
        alice = accept(
            p,
            mail(CUSTOMER, b"Message-ID: <a1@customer.test>\nIn-Reply-To: <early@x.test>\n"),
        )
        mallory = accept(p, mail(STRANGER, b"Message-ID: <early@x.test>\n"))
        assert mallory.interaction_id != alice.interaction_id
        assert mallory.decision.rule == "new-interaction"


def test_a_reply_to_a_stored_message_is_a_strong_signal(tmp_path: Path) -> None:
    """In-Reply-To naming a stored message joins whoever sends it (a colleague on Cc)."""
    with pipeline(make_settings(tmp_path)) as p:
        alice = accept(p, mail(CUSTOMER, b"Message-ID: <a1@customer.test>\n"))
        colleague = accept(
            p,
            mail(
                b"From: Bob <bob@customer.test>\nTo: sales@example.test\n",
                b"Message-ID: <b1@customer.test>\nIn-Reply-To: <a1@customer.test>\n",
            ),
        )
        assert (colleague.interaction_id, colleague.decision.rule) == (
            alice.interaction_id,
            "in-reply-to",
        )


def test_the_agents_reply_goes_to_the_customer_not_to_whoever_wrote_last(
    tmp_path: Path,
) -> None:
    """A stranger joining by a guessed In-Reply-To does not become the reply's recipient."""
    from helpers import flush, pickup_messages, raw_headers
    from mailrouter.reply import reply

    settings = make_settings(tmp_path)
    with pipeline(settings) as p:
        alice = accept(p, mail(CUSTOMER, b"Message-ID: <a1@customer.test>\n"))
        joined = accept(
            p,
            mail(
                STRANGER,
                b"Message-ID: <m1@elsewhere.test>\nIn-Reply-To: <a1@customer.test>\n",
                b"please send the quote to me instead\n",
            ),
        )
        assert joined.interaction_id == alice.interaction_id  # a strong signal: it joins
        assert alice.interaction_id is not None
        sent = reply(p, alice.interaction_id, "Here is your quote.", agent="bob")
        assert sent.to == ["alice@customer.test"]
        flush(p)
    (out,) = pickup_messages(settings)
    headers = raw_headers(out)
    assert headers["to"] == ["Alice <alice@customer.test>"]
    assert headers["in-reply-to"] == ["<a1@customer.test>"]


def test_two_non_ascii_message_ids_never_join(tmp_path: Path) -> None:
    """<order-ü@…> and <order-é@…> are different ids: a reply to one never joins the other."""
    with pipeline(make_settings(tmp_path)) as p:
        for encoding in ("utf-8", "latin-1"):
            shop = f"shop-{encoding}.test"
            victim = accept(p, mail(CUSTOMER, f"Message-ID: <order-ü@{shop}>\n".encode(encoding)))
            stranger = accept(
                p,
                mail(
                    STRANGER,
                    f"Message-ID: <m@{shop}>\nIn-Reply-To: <order-é@{shop}>\n".encode(encoding),
                ),
            )
            assert victim.interaction_id is not None
            assert stranger.interaction_id != victim.interaction_id
            assert stranger.decision.rule == "new-interaction"
            # The customer's own answer to the right id still joins.
            answer = accept(
                p,
                mail(
                    CUSTOMER,
                    f"Message-ID: <a@{shop}>\nIn-Reply-To: <order-ü@{shop}>\n".encode(encoding),
                ),
            )
            assert (answer.interaction_id, answer.decision.rule) == (
                victim.interaction_id,
                "in-reply-to",
            )


def test_a_stranger_answering_our_notice_opens_a_new_interaction(tmp_path: Path) -> None:
    """The Message-ID of one of our notices is a weak signal from a non-participant."""
    from mailrouter.transfer import transfer

    with pipeline(make_settings(tmp_path)) as p:
        alice = accept(p, mail(CUSTOMER, b"Message-ID: <a1@customer.test>\n"))
        assert alice.interaction_id is not None
        notice = transfer(p, alice.interaction_id, "support")
        assert notice.notice_message_id is not None
        answer = f"Message-ID: <{{}}>\nIn-Reply-To: <{notice.notice_message_id}>\n"
        mallory = accept(p, mail(STRANGER, answer.format("m1@elsewhere.test").encode()))
        assert mallory.interaction_id != alice.interaction_id
        assert mallory.decision.rule == "new-interaction"
        assert mallory.decision.reason == (
            f"in-reply-to <{notice.notice_message_id}> ignored: "
            f"sender not a participant of {alice.interaction_id}"
        )
        # The customer's own answer to the notice joins, by the same rule.
        again = accept(p, mail(CUSTOMER, answer.format("a2@customer.test").encode()))
        assert (again.interaction_id, again.decision.rule) == (
            alice.interaction_id,
            "in-reply-to",
        )


def test_subject_token_threads_a_participants_reply_that_dropped_references(
    tmp_path: Path,
) -> None:
    """A reply with only "Re: … [#N]" (no In-Reply-To, no References) joins for its
    customer, and opens a new interaction for a stranger, with the reason logged."""
    with pipeline(make_settings(tmp_path)) as p:
        alice = accept(p, mail(CUSTOMER, b"Message-ID: <a1@customer.test>\n"))
        iid = alice.interaction_id
        assert iid is not None
        token = f"Subject: Re: chairs [#{iid}]\n".encode()
        joined = accept(p, CUSTOMER + b"Message-ID: <a2@customer.test>\n" + token + b"\nok\n")
        assert (joined.interaction_id, joined.decision.rule) == (iid, "subject-token")
        mallory = accept(p, STRANGER + b"Message-ID: <m1@elsewhere.test>\n" + token + b"\nhi\n")
        assert mallory.interaction_id != iid
        assert mallory.decision.reason == (
            f"subject-token [#{iid}] ignored: sender not a participant of {iid}"
        )


def test_subject_token_is_ignored_when_turned_off(tmp_path: Path) -> None:
    """notify.subject_token = "": the token in a subject means nothing."""
    from mailrouter.config import NotifySettings

    settings = make_settings(tmp_path).with_(notify=NotifySettings(subject_token=""))
    with pipeline(settings) as p:
        alice = accept(p, mail(CUSTOMER, b"Message-ID: <a1@customer.test>\n"))
        token = f"Subject: Re: chairs [#{alice.interaction_id}]\n".encode()
        again = accept(p, CUSTOMER + b"Message-ID: <a2@customer.test>\n" + token + b"\nok\n")
        assert again.interaction_id != alice.interaction_id


def test_a_forged_from_of_our_own_account_is_not_a_participant(tmp_path: Path) -> None:
    """Our accounts are addressees of every conversation, but From: sales@… (anyone can
    write it) never passes the participant check of a weak signal."""
    forged = b"From: Sales <sales@example.test>\nTo: sales@example.test\n"
    with pipeline(make_settings(tmp_path)) as p:
        alice = accept(p, mail(CUSTOMER, b"Message-ID: <a1@customer.test>\n"))
        iid = alice.interaction_id
        token = f"Subject: Re: chairs [#{iid}]\n".encode()
        spoof = accept(p, forged + b"Message-ID: <s1@elsewhere.test>\n" + token + b"\nhi\n")
        assert spoof.interaction_id != iid
        assert spoof.decision.rule == "new-interaction"
