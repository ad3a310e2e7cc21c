"""Outbound SMTP through a capture smarthost (aiosmtpd): envelope and content as sent,
STARTTLS + AUTH, and replies classified — 4xx retry, 5xx give up, partial refusal reported."""

from __future__ import annotations

import time

import pytest

from mailrouter.config import OutboundSettings, Secret
from mailrouter.deliver.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailrouter.deliver.smtp import send_smtp
from servers import CaptureSmarthost, Stage, TlsFiles, free_port

CUSTOMER, OTHER = "dana@customer.test", "lee@customer.test"
NOTICE = (
    b"From: Support <support@example.test>\r\n"
    b"To: dana@customer.test\r\n"
    b"Subject: Re: Chairs\r\n"
    b"Message-ID: <notice-1@example.test>\r\n"
    b"In-Reply-To: <chairs-1@customer.test>\r\n"
    b"Auto-Submitted: auto-generated\r\n"
    b"\r\n"
    b"Your request moved from sales@example.test to support@example.test.\r\n"
)


def settings(host: CaptureSmarthost, **changes: object) -> OutboundSettings:
    base: dict[str, object] = {
        "type": "smtp",
        "host": host.host,
        "port": host.port,
        "tls": "none",
        "timeout": 10.0,
        "helo_name": "mailrouter.test",
    }
    return OutboundSettings(**(base | changes))  # type: ignore[arg-type]


async def send(
    host: CaptureSmarthost, *rcpts: str, **changes: object
) -> dict[str, tuple[int, str]]:
    return await send_smtp(
        settings(host, **changes),
        NOTICE,
        envelope_from="support@example.test",
        envelope_to=list(rcpts or (CUSTOMER,)),
    )


async def test_message_is_sent_with_its_envelope_and_content(
    capture_smarthost: CaptureSmarthost,
) -> None:
    """250: the smarthost has exactly our envelope and bytes; nothing is reported refused."""
    assert await send(capture_smarthost) == {}
    [got] = capture_smarthost.messages
    assert got.mail_from == "support@example.test"
    assert got.rcpt_tos == (CUSTOMER,)
    assert got.content == NOTICE
    assert not got.tls and got.auth_user is None


async def test_null_sender_is_sent_as_empty_reverse_path(
    capture_smarthost: CaptureSmarthost,
) -> None:
    """envelope_from = "" becomes MAIL FROM:<> (what auto-generated mail may use)."""
    await send_smtp(settings(capture_smarthost), NOTICE, envelope_from="", envelope_to=[CUSTOMER])
    [got] = capture_smarthost.messages
    assert got.mail_from == "<>"  # aiosmtpd's spelling of the null reverse-path


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data"])
async def test_4xx_is_temporary_and_a_retry_goes_through(
    capture_smarthost: CaptureSmarthost, stage: Stage
) -> None:
    """451 at MAIL, RCPT or end of DATA: retry later; the next attempt is accepted."""
    capture_smarthost.fail_next(451, "4.7.1 greylisted, try again", at=stage)
    with pytest.raises(TemporaryDeliveryError, match="451"):
        await send(capture_smarthost)
    assert capture_smarthost.messages == []
    assert await send(capture_smarthost) == {}
    assert len(capture_smarthost.messages) == 1


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data"])
async def test_5xx_is_permanent(capture_smarthost: CaptureSmarthost, stage: Stage) -> None:
    """550 at MAIL, RCPT (the only recipient) or end of DATA: give up."""
    capture_smarthost.fail_next(550, "5.7.1 rejected by policy", at=stage)
    with pytest.raises(PermanentDeliveryError, match="550"):
        await send(capture_smarthost)
    assert capture_smarthost.messages == []


async def test_one_refused_recipient_is_reported_and_the_other_gets_the_message(
    capture_smarthost: CaptureSmarthost,
) -> None:
    """Partial refusal: delivered to the accepted recipient, the refused one returned."""
    capture_smarthost.refuse(OTHER, 550, "5.1.1 no such user")
    refused = await send(capture_smarthost, CUSTOMER, OTHER)
    assert refused == {OTHER: (550, "5.1.1 no such user")}
    [got] = capture_smarthost.messages
    assert got.rcpt_tos == (CUSTOMER,)


async def test_all_refused_with_one_temporary_is_temporary(
    capture_smarthost: CaptureSmarthost,
) -> None:
    """Every recipient refused, one only with 4xx: a retry can still reach that one."""
    capture_smarthost.refuse(CUSTOMER, 550, "5.1.1 no such user")
    capture_smarthost.refuse(OTHER, 452, "4.2.2 mailbox full")
    with pytest.raises(TemporaryDeliveryError, match="452"):
        await send(capture_smarthost, CUSTOMER, OTHER)


async def test_all_refused_permanently_names_every_recipient(
    capture_smarthost: CaptureSmarthost,
) -> None:
    """Every recipient refused with 5xx: permanent, and the error names each of them."""
    capture_smarthost.refuse(CUSTOMER)
    capture_smarthost.refuse(OTHER)
    with pytest.raises(PermanentDeliveryError) as info:
        await send(capture_smarthost, CUSTOMER, OTHER)
    assert CUSTOMER in str(info.value) and OTHER in str(info.value)


async def test_starttls_and_auth(capture_smarthost: CaptureSmarthost) -> None:
    """tls = starttls with a user: encrypted (verified against tls_ca_file), AUTH, sent."""
    await send(
        capture_smarthost,
        tls="starttls",
        tls_ca_file=capture_smarthost.tls.cert,
        user=capture_smarthost.user,
        password=Secret("inline", capture_smarthost.password),
    )
    [got] = capture_smarthost.messages
    assert got.tls and got.auth_user == capture_smarthost.user


async def test_wrong_smtp_password_is_temporary(capture_smarthost: CaptureSmarthost) -> None:
    """AUTH refused (535) is our setup to fix: temporary, so the notice waits for the fix."""
    with pytest.raises(TemporaryDeliveryError, match="535"):
        await send(
            capture_smarthost,
            tls="starttls",
            tls_ca_file=capture_smarthost.tls.cert,
            user=capture_smarthost.user,
            password=Secret("inline", "wrong"),
        )
    assert capture_smarthost.messages == []


async def test_untrusted_certificate_is_temporary(capture_smarthost: CaptureSmarthost) -> None:
    """A smarthost certificate the system does not trust: nothing sent, retry later."""
    with pytest.raises(TemporaryDeliveryError):
        await send(capture_smarthost, tls="starttls")
    assert capture_smarthost.messages == []


async def test_starttls_not_offered_is_temporary_and_nothing_goes_in_clear(
    tls_files: TlsFiles,
) -> None:
    """Configured for STARTTLS, the smarthost cannot: our setup to fix, never cleartext."""
    host = CaptureSmarthost(tls=tls_files, starttls=False)
    host.start()
    try:
        with pytest.raises(TemporaryDeliveryError, match="STARTTLS"):
            await send(host, tls="starttls")
    finally:
        host.stop()
    assert host.messages == []


async def test_closed_port_is_temporary() -> None:
    """Connection refused is temporary."""
    s = OutboundSettings(type="smtp", host="127.0.0.1", port=free_port(), tls="none", timeout=5)
    started = time.monotonic()
    with pytest.raises(TemporaryDeliveryError):
        await send_smtp(s, NOTICE, envelope_from="", envelope_to=[CUSTOMER])
    assert time.monotonic() - started < 5
