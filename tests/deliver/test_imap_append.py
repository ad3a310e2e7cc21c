"""IMAP APPEND into a real Dovecot: headers intact, at most one copy per Message-ID, missing
mailboxes created, TLS, and failures classified temporary or permanent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from helpers import config_text, flush, pipeline
from mailrouter.config import DeliverySettings, Secret, load
from mailrouter.deliver.errors import TemporaryDeliveryError
from mailrouter.deliver.imap_append import deliver_imap
from mailrouter.imapclient import encode_mailbox, imap_connect, imap_disconnect
from mailrouter.pipeline import Pipeline
from servers import Dovecot, free_port

SALES = "sales@example.test"


def message(msgid: str, subject: str = "Chairs") -> bytes:
    return (
        b"From: Dana Customer <dana@customer.test>\r\n"
        b"To: sales@example.test\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Message-ID: <" + msgid.encode() + b">\r\n"
        b"References: <older-1@customer.test>\r\n"
        b"\t<older-2@customer.test>\r\n"
        b"X-Mailrouter-Interaction: 42\r\n"
        b"\r\n"
        b"Do you ship chairs to Lyon?\r\n"
    )


def settings(
    dovecot: Dovecot,
    *,
    mailbox: str = "INBOX",
    password: str = "secret",
    port: int | None = None,
    tls: str = "none",
    timeout: float = 10,
    tls_ca_file: Path | None = None,
) -> DeliverySettings:
    return DeliverySettings(
        type="imap",
        host=dovecot.host,
        port=port or dovecot.imap_port,
        tls=tls,  # type: ignore[arg-type]
        user=SALES,
        password=Secret("inline", password),
        mailbox=mailbox,
        timeout=timeout,
        tls_ca_file=tls_ca_file,
    )


def flags_of(dovecot: Dovecot, user: str, mailbox: str = "INBOX") -> list[bytes]:
    with dovecot.imap(user) as client:
        client.select(f'"{mailbox}"', readonly=True)
        typ, data = client.fetch("1:*", "(FLAGS)")
        assert typ == "OK", data
        return [d for d in data if isinstance(d, bytes)]


def test_encode_mailbox_modified_utf7() -> None:
    """Non-ASCII names use modified UTF-7 (RFC 3501 §5.1.3's own examples), ``&`` is ``&-``."""
    assert encode_mailbox("~peter/mail/台北/日本語") == "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
    assert encode_mailbox("Entwürfe") == "Entw&APw-rfe"
    assert encode_mailbox("R&D") == "R&-D"
    assert encode_mailbox("INBOX") == "INBOX"


@pytest.mark.dovecot
async def test_append_lands_with_headers_intact(dovecot_clean: Dovecot) -> None:
    """The stored message is byte for byte what was appended; unread by default."""
    raw = message("append-1@customer.test")
    await deliver_imap(settings(dovecot_clean), raw, message_id="<append-1@customer.test>")
    assert dovecot_clean.fetch_all(SALES) == [raw]
    [flags] = flags_of(dovecot_clean, SALES)
    assert b"\\Seen" not in flags


@pytest.mark.dovecot
async def test_bare_newlines_are_stored_as_crlf(dovecot_clean: Dovecot) -> None:
    """A message with LF line ends (as read from a file) is appended as CRLF."""
    raw = message("lf@customer.test")
    await deliver_imap(
        settings(dovecot_clean), raw.replace(b"\r\n", b"\n"), message_id="<lf@customer.test>"
    )
    assert dovecot_clean.fetch_all(SALES) == [raw]


@pytest.mark.dovecot
async def test_append_twice_with_same_message_id_stores_one_copy(dovecot_clean: Dovecot) -> None:
    """A retry after a crash between APPEND and bookkeeping does not duplicate."""
    raw = message("twice@customer.test")
    for _ in range(2):
        await deliver_imap(settings(dovecot_clean), raw, message_id="<twice@customer.test>")
    assert dovecot_clean.fetch_all(SALES) == [raw]


@pytest.mark.dovecot
async def test_similar_message_id_is_not_taken_for_a_duplicate(dovecot_clean: Dovecot) -> None:
    """SEARCH matches substrings case-insensitively; delivery still compares ids exactly."""
    first = message("ABC@customer.test.example")
    second = message("abc@customer.test")
    await deliver_imap(settings(dovecot_clean), first, message_id="<ABC@customer.test.example>")
    await deliver_imap(settings(dovecot_clean), second, message_id="abc@customer.test")
    assert dovecot_clean.fetch_all(SALES) == [first, second]


@pytest.mark.dovecot
async def test_missing_mailbox_is_created(dovecot_clean: Dovecot) -> None:
    """Delivery into a folder that does not exist yet creates it first."""
    raw = message("routed@customer.test")
    await deliver_imap(
        settings(dovecot_clean, mailbox="Routed"), raw, message_id="<routed@customer.test>"
    )
    assert "Routed" in dovecot_clean.mailboxes(SALES)
    assert dovecot_clean.fetch_all(SALES, "Routed") == [raw]
    assert dovecot_clean.fetch_all(SALES) == []


@pytest.mark.dovecot
async def test_non_ascii_mailbox_name_is_encoded(dovecot_clean: Dovecot) -> None:
    """A mailbox configured as ``Équipe Süd`` exists on the server under its mUTF-7 name."""
    raw = message("utf7@customer.test")
    await deliver_imap(
        settings(dovecot_clean, mailbox="Équipe Süd"), raw, message_id="<utf7@customer.test>"
    )
    assert dovecot_clean.fetch_all(SALES, "&AMk-quipe S&APw-d") == [raw]


@pytest.mark.dovecot
async def test_flags_are_set_on_append(dovecot_clean: Dovecot) -> None:
    """``flags`` is passed through to APPEND."""
    await deliver_imap(
        settings(dovecot_clean),
        message("seen@customer.test"),
        message_id="<seen@customer.test>",
        flags="\\Seen \\Flagged",
    )
    [flags] = flags_of(dovecot_clean, SALES)
    assert b"\\Seen" in flags and b"\\Flagged" in flags


@pytest.mark.dovecot
async def test_wrong_password_is_temporary(
    dovecot_clean: Dovecot, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused LOGIN waits for ops to fix the password (temporary) and is logged as ERROR."""
    with pytest.raises(TemporaryDeliveryError, match="AUTHENTICATIONFAILED"):
        await deliver_imap(
            settings(dovecot_clean, password="wrong"),
            message("pw@customer.test"),
            message_id="<pw@customer.test>",
        )
    assert any(
        r.levelname == "ERROR" and "imap-login-failed" in r.getMessage() for r in caplog.records
    )
    assert dovecot_clean.fetch_all(SALES) == []


@pytest.mark.dovecot
async def test_unusable_mailbox_is_temporary(dovecot_clean: Dovecot) -> None:
    """An invalid mailbox name is the account's setup to fix: temporary, nothing stored."""
    with pytest.raises(TemporaryDeliveryError, match="CANNOT"):
        await deliver_imap(
            settings(dovecot_clean, mailbox="Bad/"),
            message("bad@customer.test"),
            message_id="<bad@customer.test>",
        )


@pytest.mark.dovecot
async def test_deliver_imap_over_starttls(dovecot_clean: Dovecot) -> None:
    """tls = starttls through the settings, trusting a private CA via tls_ca_file."""
    raw = message("starttls@customer.test")
    await deliver_imap(
        settings(dovecot_clean, tls="starttls", tls_ca_file=dovecot_clean.tls.cert),
        raw,
        message_id="<starttls@customer.test>",
    )
    assert dovecot_clean.fetch_all(SALES) == [raw]


@pytest.mark.dovecot
@pytest.mark.parametrize("tls", ["starttls", "tls"])
async def test_imap_connect_encrypts_before_login(dovecot_clean: Dovecot, tls: str) -> None:
    """imap_connect over STARTTLS (which aioimaplib lacks) and IMAPS: logged in, over TLS."""
    port = dovecot_clean.imap_port if tls == "starttls" else dovecot_clean.imaps_port
    client = await imap_connect(
        dovecot_clean.host,
        port,
        tls,  # type: ignore[arg-type]
        SALES,
        "secret",
        10,
        ssl_context=dovecot_clean.tls.client_context(),
    )
    try:
        assert client.get_state() == "AUTH"
        assert client.protocol.transport.get_extra_info("ssl_object") is not None
        # Capabilities were asked again over TLS: Dovecot no longer offers STARTTLS.
        assert "STARTTLS" not in client.protocol.capabilities
    finally:
        await imap_disconnect(client, 10)
    assert client.protocol.transport.is_closing()


@pytest.mark.dovecot
async def test_untrusted_certificate_is_temporary(dovecot_clean: Dovecot) -> None:
    """The test certificate is not in the system trust store: no login, retry later."""
    with pytest.raises(TemporaryDeliveryError, match="CERTIFICATE_VERIFY_FAILED"):
        await deliver_imap(
            settings(dovecot_clean, tls="tls", port=dovecot_clean.imaps_port),
            message("untrusted@customer.test"),
            message_id="<untrusted@customer.test>",
        )


async def test_closed_port_is_temporary() -> None:
    """Connection refused is temporary."""
    s = DeliverySettings(
        type="imap",
        port=free_port(),
        user=SALES,
        password=Secret("inline", "secret"),
        timeout=5,
    )
    with pytest.raises(TemporaryDeliveryError, match="connect"):
        await deliver_imap(s, message("closed@c.test"), message_id="<closed@c.test>")


# Scripted peers for what a healthy Dovecot does not do: stay silent, or drop the
# connection while a command is pending (aioimaplib would wait on that command forever).


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


@pytest.fixture
async def dropping_server() -> AsyncIterator[Callable[[str], Awaitable[int]]]:
    """Start a server that plays along until it receives command ``at``, then vanishes."""
    servers: list[asyncio.Server] = []

    async def start(at: str) -> int:
        async def drops(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"* OK scripted IMAP ready\r\n")
            while line := await reader.readline():
                tag, command = line.split()[:2]
                if command.upper() == at.encode():
                    break  # like a crashed server: no reply, connection gone
                if command.upper() == b"CAPABILITY":
                    writer.write(b"* CAPABILITY IMAP4rev1\r\n" + tag + b" OK done\r\n")
                else:
                    writer.write(tag + b" OK done\r\n")
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(drops, "127.0.0.1", 0)
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_silent_server_times_out_as_temporary(silent_port: int) -> None:
    """No greeting within ``settings.timeout``: temporary, after about one timeout."""
    s = DeliverySettings(
        type="imap", port=silent_port, user=SALES, password=Secret("inline", "x"), timeout=0.5
    )
    started = time.monotonic()
    with pytest.raises(TemporaryDeliveryError, match="timed out"):
        await deliver_imap(s, message("silent@c.test"), message_id="<silent@c.test>")
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(("at", "during"), [("CAPABILITY", "connect"), ("SELECT", "SELECT")])
async def test_connection_lost_mid_command_fails_at_once(
    dropping_server: Callable[[str], Awaitable[int]], at: str, during: str
) -> None:
    """A dropped connection fails the pending command now, not after the 30 s timeout.

    Dropping during the greeting's CAPABILITY is the nastiest case: aioimaplib's welcome
    task then holds its state lock for ever, and even cancelling the wait for it hangs.
    """
    s = DeliverySettings(
        type="imap",
        port=await dropping_server(at),
        user=SALES,
        password=Secret("inline", "x"),
        timeout=30,
    )
    started = time.monotonic()
    with pytest.raises(TemporaryDeliveryError, match=f"connection lost during {during}"):
        await deliver_imap(s, message("lost@c.test"), message_id="<lost@c.test>")
    assert time.monotonic() - started < 5


@pytest.mark.dovecot
def test_the_outbox_appends_with_the_envelope_an_mda_would_write(
    tmp_path: Path, dovecot_clean: Dovecot
) -> None:
    """APPEND has no MDA behind it: the copy carries our Return-Path and Delivered-To."""
    secret = tmp_path / "imap-password"
    secret.write_text(dovecot_clean.password + "\n")
    text = config_text(tmp_path) + (
        f'\n[accounts.sales.delivery]\ntype = "imap"\nhost = "{dovecot_clean.host}"\n'
        f'port = {dovecot_clean.imap_port}\nuser = "{SALES}"\npassword_file = "{secret}"\n'
    )
    (tmp_path / "mailrouter.toml").write_text(text, "utf-8")
    with pipeline(load(tmp_path / "mailrouter.toml", env={})) as rt:
        raw = b"Return-Path: <forged@elsewhere.test>\r\n" + message("env@customer.test")
        Pipeline(rt).accept(
            raw, [rt.settings.account("sales")], source="smtp", envelope_sender="dana@customer.test"
        )
        assert flush(rt) == 1
    [got] = dovecot_clean.fetch_all(SALES)
    assert got.startswith(
        b"Return-Path: <dana@customer.test>\r\nDelivered-To: sales@example.test\r\n"
    )
    assert b"forged@elsewhere.test" not in got
