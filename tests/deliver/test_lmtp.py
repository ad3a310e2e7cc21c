"""LMTP delivery into a real Dovecot: one reply per recipient (RFC 2033), mail read back
over IMAP by an independent client, and failures classified temporary or permanent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from helpers import config_text, flush, pipeline
from mailrouter.config import DeliverySettings, load
from mailrouter.deliver.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailrouter.deliver.lmtp import LOST_REPLY_CODE, data_payload, deliver_lmtp, lmtp_deliver
from mailrouter.pipeline import Pipeline
from servers import Dovecot, free_port

SALES, SUPPORT, BILLING = "sales@example.test", "support@example.test", "billing@example.test"


def message(msgid: str, body: bytes = b"Do you ship chairs to Lyon?\r\n") -> bytes:
    return (
        b"From: Dana Customer <dana@customer.test>\r\n"
        b"To: sales@example.test\r\n"
        b"Subject: Chairs\r\n"
        b"Message-ID: <" + msgid.encode() + b">\r\n"
        b"Date: Tue, 04 Mar 2025 10:00:00 +0000\r\n"
        b"\r\n" + body
    )


def settings(dovecot: Dovecot, user: str | None = SALES, timeout: float = 10) -> DeliverySettings:
    return DeliverySettings(
        type="lmtp", host=dovecot.host, port=dovecot.lmtp_port, user=user, timeout=timeout
    )


# --------------------------------------------------------------------------- pure


def test_data_payload_crlf_normalises_and_dot_stuffs() -> None:
    """Bare LF/CR become CRLF, leading dots double, and the terminator is appended."""
    assert data_payload(b"a\nb\r.c\r\n.\n..d") == b"a\r\nb\r\n..c\r\n..\r\n...d\r\n.\r\n"


def test_data_payload_of_crlf_message_is_unchanged_but_terminated() -> None:
    """A well-formed message is sent byte for byte, then ``.``."""
    raw = message("plain@customer.test")
    assert data_payload(raw) == raw + b".\r\n"


# --------------------------------------------------------------------------- Dovecot


@pytest.mark.dovecot
async def test_three_recipients_get_three_replies_and_three_copies(
    dovecot_clean: Dovecot,
) -> None:
    """Each accepted recipient gets its own DATA reply and its own stored copy."""
    raw = message("three@customer.test")
    results = await lmtp_deliver(
        dovecot_clean.host,
        dovecot_clean.lmtp_port,
        raw,
        mail_from="dana@customer.test",
        recipients=[SALES, SUPPORT, BILLING],
        timeout=10,
    )
    assert set(results) == {SALES, SUPPORT, BILLING}
    for rcpt, (code, text) in results.items():
        assert code == 250, (rcpt, text)
        assert f"<{rcpt}>" in text  # Dovecot names the recipient in its per-recipient reply
    for user in (SALES, SUPPORT, BILLING):
        [stored] = dovecot_clean.fetch_all(user)
        assert stored.endswith(raw)  # Dovecot prepends Return-Path etc.; the rest is intact
        assert b"Return-Path: <dana@customer.test>" in stored


@pytest.mark.dovecot
async def test_unknown_recipient_is_refused_while_the_others_are_delivered(
    dovecot_clean: Dovecot,
) -> None:
    """A 5xx for one recipient does not stop delivery to the others."""
    raw = message("partial@customer.test")
    results = await lmtp_deliver(
        dovecot_clean.host,
        dovecot_clean.lmtp_port,
        raw,
        mail_from="dana@customer.test",
        recipients=[SALES, "nobody@example.test", SUPPORT],
        timeout=10,
    )
    assert results[SALES][0] == 250
    assert results[SUPPORT][0] == 250
    code, text = results["nobody@example.test"]
    assert code == 550 and "5.1.1" in text
    assert len(dovecot_clean.fetch_all(SALES)) == 1
    assert len(dovecot_clean.fetch_all(SUPPORT)) == 1


@pytest.mark.dovecot
async def test_all_recipients_refused_sends_no_data(dovecot_clean: Dovecot) -> None:
    """Every recipient refused at RCPT: their refusals come back and nothing is stored."""
    results = await lmtp_deliver(
        dovecot_clean.host,
        dovecot_clean.lmtp_port,
        message("none@customer.test"),
        mail_from="",
        recipients=["ghost@example.test"],
        timeout=10,
    )
    assert results["ghost@example.test"][0] == 550


@pytest.mark.dovecot
async def test_dot_lines_and_bare_newlines_arrive_intact(dovecot_clean: Dovecot) -> None:
    """Dot-stuffing and CRLF normalisation: a body line ``.`` does not end the message."""
    body = b"line one\n.\n.hidden\nlast line\n"
    raw = message("dots@customer.test", body).replace(b"\r\n", b"\n")
    await deliver_lmtp(settings(dovecot_clean), raw, recipient=SALES)
    [stored] = dovecot_clean.fetch_all(SALES)
    assert stored.endswith(b"\r\n\r\nline one\r\n.\r\n.hidden\r\nlast line\r\n")


@pytest.mark.dovecot
async def test_eight_bit_body_is_delivered(dovecot_clean: Dovecot) -> None:
    """An 8-bit body goes out with BODY=8BITMIME and is stored byte for byte."""
    raw = message("8bit@customer.test", "Grüße aus Köln\r\n".encode())
    await deliver_lmtp(settings(dovecot_clean), raw, recipient=SALES)
    assert dovecot_clean.fetch_all(SALES)[0].endswith(raw)


@pytest.mark.dovecot
async def test_deliver_lmtp_uses_the_configured_user_as_recipient(dovecot_clean: Dovecot) -> None:
    """``settings.user`` (the account's LMTP user) wins over the address passed in."""
    await deliver_lmtp(settings(dovecot_clean, user=BILLING), message("u@c.test"), recipient=SALES)
    assert len(dovecot_clean.fetch_all(BILLING)) == 1
    assert dovecot_clean.fetch_all(SALES) == []


@pytest.mark.dovecot
async def test_deliver_lmtp_unknown_user_is_permanent(dovecot_clean: Dovecot) -> None:
    """Dovecot's 550 for an unknown user is a permanent failure."""
    with pytest.raises(PermanentDeliveryError, match="550"):
        await deliver_lmtp(
            settings(dovecot_clean, user=None), message("x@c.test"), recipient="ghost@example.test"
        )


@pytest.mark.dovecot
async def test_starttls_delivery(dovecot_clean: Dovecot) -> None:
    """tls = starttls upgrades the session (certificate verified) before MAIL FROM."""
    results = await lmtp_deliver(
        dovecot_clean.host,
        dovecot_clean.lmtp_port,
        message("tls@customer.test"),
        mail_from="dana@customer.test",
        recipients=[SALES],
        timeout=10,
        tls="starttls",
        ssl_context=dovecot_clean.tls.client_context(),
    )
    assert results[SALES][0] == 250
    assert len(dovecot_clean.fetch_all(SALES)) == 1


@pytest.mark.dovecot
async def test_starttls_with_untrusted_certificate_is_temporary(dovecot_clean: Dovecot) -> None:
    """A certificate the system does not trust stops delivery (retry later), nothing sent."""
    with pytest.raises(TemporaryDeliveryError, match="CERTIFICATE_VERIFY_FAILED"):
        await deliver_lmtp(
            DeliverySettings(
                type="lmtp",
                host=dovecot_clean.host,
                port=dovecot_clean.lmtp_port,
                user=SALES,
                tls="starttls",
                timeout=10,
            ),
            message("untrusted@customer.test"),
            recipient=SALES,
        )
    assert dovecot_clean.fetch_all(SALES) == []


# --------------------------------------------------------------------------- no server


async def test_deliver_lmtp_closed_port_is_temporary() -> None:
    """Connection refused is temporary: the outbox retries."""
    s = DeliverySettings(type="lmtp", host="127.0.0.1", port=free_port(), user=SALES, timeout=5)
    with pytest.raises(TemporaryDeliveryError, match="cannot connect"):
        await deliver_lmtp(s, message("closed@c.test"), recipient=SALES)


async def test_invalid_address_is_permanent_and_never_sent() -> None:
    """An address that would inject a command is refused before connecting."""
    with pytest.raises(PermanentDeliveryError, match="cannot be sent"):
        await lmtp_deliver(
            "127.0.0.1",
            free_port(),
            b"x",
            mail_from="",
            recipients=["a@b.test>\r\nRSET"],
            timeout=1,
        )


# Scripted peers for the failure modes a healthy Dovecot cannot be made to show: a server
# that never speaks, and one that drops the connection between per-recipient replies.

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Handler], Coroutine[Any, Any, int]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_silent_server_times_out_as_temporary(
    scripted: Callable[[Handler], Coroutine[Any, Any, int]],
) -> None:
    """A server that accepts but never greets costs one timeout, then a temporary failure."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes
        writer.close()

    port = await scripted(silent)
    s = DeliverySettings(type="lmtp", host="127.0.0.1", port=port, user=SALES, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TemporaryDeliveryError, match="timed out"):
        await deliver_lmtp(s, message("silent@c.test"), recipient=SALES)
    assert time.monotonic() - started < 3


async def test_connection_lost_after_data_reports_each_missing_reply(
    scripted: Callable[[Handler], Coroutine[Any, Any, int]],
) -> None:
    """Replies read before the drop stand; only the missing ones are 4xx (retry those)."""

    async def drops_after_first_reply(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 scripted LMTP\r\n")
        while line := await r.readline():
            if line.startswith(b"LHLO"):
                w.write(b"250-scripted\r\n250 8BITMIME\r\n")
            elif line.startswith((b"MAIL", b"RCPT")):
                w.write(b"250 2.1.5 OK\r\n")
            elif line.startswith(b"DATA"):
                w.write(b"354 go ahead\r\n")
                while await r.readline() != b".\r\n":
                    pass
                w.write(b"250 2.0.0 <sales@example.test> Saved\r\n")
                await w.drain()
                break
            await w.drain()
        w.close()

    port = await scripted(drops_after_first_reply)
    results = await lmtp_deliver(
        "127.0.0.1",
        port,
        message("drop@c.test"),
        mail_from="dana@customer.test",
        recipients=[SALES, SUPPORT],
        timeout=5,
    )
    assert results[SALES][0] == 250
    code, text = results[SUPPORT]
    assert code == LOST_REPLY_CODE and "may have been delivered" in text


async def test_421_after_data_is_a_lost_reply_not_a_refusal(
    scripted: Callable[[Handler], Coroutine[Any, Any, int]],
) -> None:
    """A server stopped after it saved the message says "421 … Shutting down" instead of
    250 (Dovecot does): reported as "may have been delivered" and logged, then retried."""

    async def shuts_down_after_data(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 scripted LMTP\r\n")
        while line := await r.readline():
            if line.startswith(b"LHLO"):
                w.write(b"250-scripted\r\n250 8BITMIME\r\n")
            elif line.startswith((b"MAIL", b"RCPT")):
                w.write(b"250 2.1.5 OK\r\n")
            elif line.startswith(b"DATA"):
                w.write(b"354 go ahead\r\n")
                while await r.readline() != b".\r\n":
                    pass
                w.write(b"421 4.3.2 vm Shutting down\r\n")
                await w.drain()
                break
            await w.drain()
        w.close()

    port = await scripted(shuts_down_after_data)
    results = await lmtp_deliver(
        "127.0.0.1",
        port,
        message("closing@c.test"),
        mail_from="dana@customer.test",
        recipients=[SALES],
        timeout=5,
    )
    code, text = results[SALES]
    assert code == LOST_REPLY_CODE
    assert "may have been delivered" in text and "421 4.3.2 vm Shutting down" in text


@pytest.mark.dovecot
def test_the_outbox_gives_dovecot_the_envelope_sender_for_its_return_path(
    tmp_path: Path, dovecot_clean: Dovecot
) -> None:
    """Over LMTP the server is the MDA: MAIL FROM is the stored envelope sender, so
    Dovecot's Return-Path names it, and our copy adds no second Return-Path of its own."""
    text = config_text(tmp_path) + (
        f'\n[accounts.sales.delivery]\ntype = "lmtp"\nhost = "{dovecot_clean.host}"\n'
        f'port = {dovecot_clean.lmtp_port}\nuser = "{SALES}"\n'
    )
    (tmp_path / "mailrouter.toml").write_text(text, "utf-8")
    with pipeline(load(tmp_path / "mailrouter.toml", env={})) as rt:
        sales = [rt.settings.account("sales")]
        raw = b"Return-Path: <forged@elsewhere.test>\r\n" + message("rp@customer.test")
        Pipeline(rt).accept(raw, sales, source="smtp", envelope_sender="dana+rp@customer.test")
        assert flush(rt) == 1
    [got] = dovecot_clean.fetch_all(SALES)
    head = got.split(b"\r\n\r\n", 1)[0].lower()
    assert head.count(b"return-path:") == 1
    assert b"return-path: <dana+rp@customer.test>" in head
