"""The whole story over real wires: smtplib → mailrouter SMTP → Dovecot LMTP, notices through
a capture smarthost, mailboxes read back over IMAP with an independent client (imaplib)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import smtplib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from mailrouter.config import Settings, load_from_text
from mailrouter.daemon import Daemon
from mailrouter.transfer import transfer
from servers import CaptureSmarthost, Dovecot, free_port

pytestmark = pytest.mark.dovecot
ROOT = Path(__file__).resolve().parents[2]

FIRST = b"""From: Dana Customer <dana@customer.test>\r
To: sales@example.test\r
Subject: Broken hinge on order 5512\r
Date: Wed, 25 Nov 2026 10:00:00 +0000\r
Message-ID: <hinge-1@customer.test>\r
\r
The hinge broke after two days.\r
"""
REPLY = b"""From: Dana Customer <dana@customer.test>\r
To: sales@example.test\r
Subject: Re: Broken hinge on order 5512\r
Date: Thu, 26 Nov 2026 08:30:00 +0000\r
Message-ID: <hinge-2@customer.test>\r
In-Reply-To: <hinge-1@customer.test>\r
References: <hinge-1@customer.test>\r
\r
Photos attached next time. Any update?\r
"""


def wire_settings(tmp_path: Path, dovecot: Dovecot, smarthost: CaptureSmarthost) -> Settings:
    def lmtp(user: str) -> str:
        return (
            f'type = "lmtp"\n  host = "{dovecot.host}"\n  port = {dovecot.lmtp_port}\n'
            f'  user = "{user}"'
        )

    text = f"""
state_dir = "{tmp_path / "state"}"
[templates]
directory = "{ROOT / "config" / "templates"}"
[smtp]
port = {free_port()}
[outbound]
type = "smtp"
host = "{smarthost.host}"
port = {smarthost.port}
tls = "none"
[outbox]
poll_interval = 0.2
initial_backoff = 0.2
[accounts.sales]
address = "sales@example.test"
display_name = "Example Sales"
  [accounts.sales.transfer]
  enabled = true
  notify = true
  template = "transfer_notice"
  [accounts.sales.delivery]
  {lmtp("sales@example.test")}
[accounts.support]
address = "support@example.test"
display_name = "Example Support"
  [accounts.support.delivery]
  {lmtp("support@example.test")}
"""
    path = tmp_path / "mailrouter.toml"
    path.write_text(text)
    return load_from_text(text, path, env={})


@pytest.fixture
async def daemon(
    tmp_path: Path, dovecot_clean: Dovecot, capture_smarthost: CaptureSmarthost
) -> AsyncIterator[Daemon]:
    d = Daemon(wire_settings(tmp_path, dovecot_clean, capture_smarthost))
    await d.startup()
    try:
        yield d
    finally:
        d.stop.set()
        await d.shutdown()


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``check`` (bounded) until it holds; fail with a clear message otherwise."""
    for _ in range(int(within / 0.1)):
        if await asyncio.to_thread(check):
            return
        await asyncio.sleep(0.1)
    assert await asyncio.to_thread(check), f"not true within {within}s"


def send(port: int, data: bytes, rcpt: str = "sales@example.test") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        assert c.sendmail("dana@customer.test", [rcpt], data) == {}


async def test_customer_mail_over_smtp_lands_in_dovecot_inbox(
    daemon: Daemon, dovecot_clean: Dovecot
) -> None:
    """smtplib → mailrouter SMTP → Dovecot LMTP: the message is in sales' INBOX, intact."""
    await asyncio.to_thread(send, daemon.settings.smtp.port, FIRST)
    await eventually(lambda: len(dovecot_clean.fetch_all("sales@example.test")) == 1)
    got = dovecot_clean.fetch_all("sales@example.test")[0]
    assert b"Message-ID: <hinge-1@customer.test>" in got
    assert b"X-Mailrouter-Interaction: 1" in got
    assert b"X-Mailrouter-Routed-From" not in got
    assert dovecot_clean.fetch_all("support@example.test") == []


async def test_transfer_then_reply_to_old_address_reaches_new_account_over_the_wire(
    daemon: Daemon, dovecot_clean: Dovecot, capture_smarthost: CaptureSmarthost
) -> None:
    """After sales→support, a reply sent to sales@ arrives in support's Dovecot INBOX, and the
    notice reaches the smarthost threaded to the customer's message."""
    s = daemon.settings
    await asyncio.to_thread(send, s.smtp.port, FIRST)
    await eventually(lambda: len(dovecot_clean.fetch_all("sales@example.test")) == 1)

    assert daemon.pipeline is not None and daemon.worker is not None
    result = await asyncio.to_thread(transfer, daemon.pipeline.rt, 1, "support", actor="bob")
    assert result.notification == "queued"
    daemon.worker.wake()
    await eventually(lambda: len(capture_smarthost.messages) == 1)
    notice = capture_smarthost.messages[0]
    assert notice.rcpt_tos == ("dana@customer.test",)
    assert notice.mail_from == "support@example.test"
    parsed = email.message_from_bytes(notice.content, policy=email.policy.default)
    assert parsed["In-Reply-To"] == "<hinge-1@customer.test>"
    assert parsed["References"] == "<hinge-1@customer.test>"
    assert parsed["Subject"] == "Re: Broken hinge on order 5512 [#1]"
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert "support@example.test" in parsed["From"]

    await asyncio.to_thread(send, s.smtp.port, REPLY)  # to the OLD address
    await eventually(lambda: len(dovecot_clean.fetch_all("support@example.test")) == 1)
    routed = dovecot_clean.fetch_all("support@example.test")[0]
    headers, _, body = routed.replace(b"\r\n", b"\n").partition(b"\n\n")
    assert b"X-Mailrouter-Routed-From: sales@example.test" in headers
    assert b"X-Mailrouter-Interaction: 1" in headers
    # Original address headers untouched: still To sales@, from the customer.
    assert b"\nTo: sales@example.test" in headers
    assert b"\nFrom: Dana Customer <dana@customer.test>" in headers
    assert body == b"Photos attached next time. Any update?\n"
    assert len(dovecot_clean.fetch_all("sales@example.test")) == 1  # nothing new at sales


async def test_lmtp_delivery_failure_is_retried_until_dovecot_is_back(
    daemon: Daemon, dovecot_clean: Dovecot
) -> None:
    """Dovecot down: the message waits in the outbox (sender got 250) and lands once it is up."""
    dovecot_clean.stop()
    try:
        await asyncio.to_thread(send, daemon.settings.smtp.port, FIRST)
        assert daemon.pipeline is not None
        from mailrouter.views import queue_rows

        def pending_with_error() -> bool:
            assert daemon.pipeline is not None
            with daemon.pipeline.db.read() as session:
                rows = queue_rows(session)
            return bool(rows) and rows[0]["attempts"] >= 1 and rows[0]["last_error"] is not None

        await eventually(pending_with_error)
    finally:
        dovecot_clean.start()
    await eventually(lambda: len(dovecot_clean.fetch_all("sales@example.test")) == 1, within=10)


async def test_agent_reply_command_sends_from_current_account_threaded(
    daemon: Daemon, capture_smarthost: CaptureSmarthost, tmp_path: Path
) -> None:
    """`mailrouter reply` after a transfer sends From the new account, threaded, and records it."""
    from mailrouter.cli import main

    s = daemon.settings
    await asyncio.to_thread(send, s.smtp.port, FIRST)
    assert daemon.pipeline is not None
    await asyncio.to_thread(transfer, daemon.pipeline.rt, 1, "support", actor="bob")
    body = tmp_path / "reply.txt"
    body.write_text("We are sending a replacement hinge today.\n")
    rc = await asyncio.to_thread(
        main, ["-c", str(s.config_path), "reply", "1", "--body-file", str(body), "--agent", "eve"]
    )
    assert rc == 0
    await eventually(lambda: len(capture_smarthost.messages) == 2)  # the notice, then the reply
    sent = [
        email.message_from_bytes(m.content, policy=email.policy.default)
        for m in capture_smarthost.messages
    ]
    agent_reply = next(m for m in sent if m["Auto-Submitted"] is None)
    assert "support@example.test" in agent_reply["From"]
    assert agent_reply["In-Reply-To"] == "<hinge-1@customer.test>"
    assert agent_reply.get_content().startswith("We are sending a replacement hinge today.")
    # Recorded: the customer's answer to the reply resolves to the same interaction.
    answer = REPLY.replace(
        b"In-Reply-To: <hinge-1@customer.test>",
        b"In-Reply-To: " + agent_reply["Message-ID"].encode(),
    )
    accepted = await daemon.pipeline.accept_async(answer, [s.account("sales")], source="test")
    assert (accepted.interaction_id, accepted.decision.rule) == (1, "in-reply-to")
    assert accepted.decision.deliver_to == "support"
