"""The SMTP listener's STARTTLS + AUTH mode (what a non-loopback bind requires)."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailrouter.config import ConfigError, load_from_text
from mailrouter.daemon import Daemon
from servers import TlsFiles, free_port

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = (
    b"From: agent-tool@example.test\r\nTo: sales@example.test\r\nSubject: via submission\r\n"
    b"Message-ID: <auth-1@example.test>\r\n\r\nhello\r\n"
)


def auth_config(tmp_path: Path, tls: TlsFiles, host: str = "127.0.0.1") -> str:
    return f"""
state_dir = "{tmp_path / "state"}"
[templates]
directory = "{ROOT / "config" / "templates"}"
[smtp]
host = "{host}"
port = {free_port()}
tls_cert = "{tls.cert}"
tls_key = "{tls.key}"
require_auth = true
  [smtp.auth_users.mta]
  password_env = "MR_TEST_SMTP_PASSWORD"
[accounts.sales]
address = "sales@example.test"
"""


@pytest.fixture
async def daemon(tmp_path: Path, tls_files: TlsFiles) -> AsyncIterator[Daemon]:
    text = auth_config(tmp_path, tls_files)
    path = tmp_path / "mailrouter.toml"
    path.write_text(text)
    d = Daemon(load_from_text(text, path, env={"MR_TEST_SMTP_PASSWORD": "s3cret"}))
    await d.startup()
    try:
        yield d
    finally:
        d.stop.set()
        await d.shutdown()


def _session(port: int, tls: TlsFiles, *, starttls: bool, password: str | None) -> object:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.ehlo()
        if starttls:
            c.starttls(context=tls.client_context())
            c.ehlo()
        if password is not None:
            c.login("mta", password)
        return c.sendmail("agent-tool@example.test", ["sales@example.test"], MESSAGE)


async def test_mail_without_starttls_is_refused(daemon: Daemon, tls_files: TlsFiles) -> None:
    """With a certificate configured, nothing is accepted before STARTTLS."""
    with pytest.raises(smtplib.SMTPException) as exc:
        await asyncio.to_thread(
            _session, daemon.settings.smtp.port, tls_files, starttls=False, password=None
        )
    assert "530" in str(exc.value) or "STARTTLS" in str(exc.value)


async def test_mail_without_auth_is_refused(daemon: Daemon, tls_files: TlsFiles) -> None:
    """require_auth: after STARTTLS, MAIL without AUTH gets 530 5.7.0."""
    with pytest.raises(smtplib.SMTPSenderRefused) as exc:
        await asyncio.to_thread(
            _session, daemon.settings.smtp.port, tls_files, starttls=True, password=None
        )
    assert exc.value.smtp_code == 530


async def test_wrong_password_is_refused(daemon: Daemon, tls_files: TlsFiles) -> None:
    """A wrong password gets 535 and no mail is taken."""
    with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
        await asyncio.to_thread(
            _session, daemon.settings.smtp.port, tls_files, starttls=True, password="wrong"
        )
    assert exc.value.smtp_code == 535


async def test_starttls_and_auth_then_mail_is_accepted(daemon: Daemon, tls_files: TlsFiles) -> None:
    """STARTTLS, AUTH with the configured secret, then the message is accepted."""
    refused = await asyncio.to_thread(
        _session, daemon.settings.smtp.port, tls_files, starttls=True, password="s3cret"
    )
    assert refused == {}


async def test_auth_is_offered_after_starttls_when_users_exist(
    daemon: Daemon, tls_files: TlsFiles
) -> None:
    """With auth_users configured, EHLO lists AUTH once the session is encrypted."""

    def ehlo_lines() -> tuple[bool, bool]:
        with smtplib.SMTP("127.0.0.1", daemon.settings.smtp.port, timeout=10) as c:
            c.ehlo()
            before = c.has_extn("auth")
            c.starttls(context=tls_files.client_context())
            c.ehlo()
            return before, c.has_extn("auth") and "PLAIN" in c.esmtp_features["auth"]

    assert await asyncio.to_thread(ehlo_lines) == (False, True)


def test_non_loopback_bind_without_auth_is_a_config_error(tmp_path: Path) -> None:
    """An SMTP listener on a public address without AUTH would be an open door: refused."""
    text = f"""
state_dir = "{tmp_path}"
[smtp]
host = "0.0.0.0"
[accounts.sales]
address = "sales@example.test"
"""
    with pytest.raises(ConfigError) as exc:
        load_from_text(text, tmp_path / "m.toml", env={})
    assert "smtp.host" in str(exc.value) and "require_auth" in str(exc.value)
    assert ":4:" in str(exc.value)  # points at the line of host = "0.0.0.0"
