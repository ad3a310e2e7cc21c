"""Reload (SIGHUP): what it applies at once, what it keeps until a restart, what it refuses."""

from __future__ import annotations

import asyncio
import logging
import signal
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from daemon_process import daemon_config, running_daemon, write_config
from helpers import TEMPLATES, accept, maildir_messages
from mailrouter.config import load_from_text
from mailrouter.daemon import Daemon
from mailrouter.reload import NEEDS_RESTART, Change, plan_reload
from mailrouter.transfer import TransferRefused, transfer
from servers import TlsFiles, free_port

RETURNS = '\n[accounts.returns]\naddress = "returns@example.test"\n'
BROKEN_LINE = 'enabled = "yes"'


def message(rcpt: str, n: int = 1) -> bytes:
    return (
        f"From: Carol Customer <carol@customer.test>\r\n"
        f"To: {rcpt}\r\n"
        f"Subject: Question {n}\r\n"
        f"Message-ID: <reload-{n}@customer.test>\r\n"
        f"\r\n"
        f"Hello.\r\n"
    ).encode()


def broken(text: str) -> str:
    """``text`` with support's transfer.enabled set to a string (a type error)."""
    fixed = "[accounts.support.transfer]\nenabled = true\n"
    assert fixed in text
    return text.replace(fixed, f"[accounts.support.transfer]\n{BROKEN_LINE}\n")


def line_of(text: str, needle: str) -> int:
    return next(no for no, line in enumerate(text.splitlines(), 1) if line == needle)


# --------------------------------------------------------------------------- the plan


def _settings(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Any:
    return load_from_text(text, tmp_path / "mailrouter.toml", env=env or {})


def test_plan_names_each_changed_key_as_the_file_spells_it(tmp_path: Path) -> None:
    """log.level, smtp.max_message_size, a transfer flag and a new account, by TOML key."""
    text = daemon_config(tmp_path)
    new = text.replace('format = "json"', 'format = "json"\nlevel = "DEBUG"')
    new = new.replace("[smtp]\n", "[smtp]\nmax_message_size = 1000\n")
    new = new.replace("[accounts.support.transfer]\nenabled = true\n", "")
    plan = plan_reload(_settings(tmp_path, text), _settings(tmp_path, new + RETURNS))
    assert {(c.key, c.kind, c.old, c.new) for c in plan.changes} == {
        ("log.level", "changed", "INFO", "DEBUG"),
        ("smtp.max_message_size", "changed", 25 * 1024 * 1024, 1000),
        ("accounts.support.transfer.enabled", "changed", True, False),
        ("accounts.returns", "added", None, None),
    }
    assert plan.needs_restart == ()
    assert plan.settings.account("returns").address == "returns@example.test"


def test_plan_keeps_listen_address_database_and_log_format_until_restart(
    tmp_path: Path,
) -> None:
    """smtp.port, database.url, log.format: a warning each, the running value kept."""
    text = daemon_config(tmp_path)
    old = _settings(tmp_path, text)
    new_text = (
        text.replace(f"port = {old.smtp.port}", f"port = {old.smtp.port + 1}")
        .replace("sqlite:///mailrouter.db", "sqlite:///other.db")
        .replace('format = "json"', 'format = "kv"')
        .replace("[smtp]\n", "[smtp]\nmax_connections = 7\n")
    )
    plan = plan_reload(old, _settings(tmp_path, new_text))
    assert {c.key for c in plan.needs_restart} == {"smtp.port", "database.url", "log.format"}
    assert {c.key for c in plan.needs_restart} <= set(NEEDS_RESTART)
    s = plan.settings
    assert (s.smtp.port, s.database_url, s.log_format) == (
        old.smtp.port,
        old.database_url,
        old.log_format,
    )
    assert [c.key for c in plan.changes] == ["smtp.max_connections"]  # the rest applies
    assert s.smtp.max_connections == 7


def test_a_rotated_password_is_a_change_but_never_shown(tmp_path: Path) -> None:
    """Same password_env, new value: reported changed, both sides masked."""
    text = daemon_config(tmp_path).replace("[smtp]\n", "[smtp]\nrequire_auth = true\n")
    text += '\n[smtp.auth_users.mta]\npassword_env = "MR_T_PW"\n'
    old = _settings(tmp_path, text, {"MR_T_PW": "first-secret"})
    new = _settings(tmp_path, text, {"MR_T_PW": "second-secret"})
    [change] = plan_reload(old, new).changes
    assert change == Change(
        "smtp.auth_users.mta",
        "changed",
        "******** (from env:MR_T_PW)",
        "******** (from env:MR_T_PW)",
    )
    assert "secret" not in repr(change)


# --------------------------------------------------------------------------- in a daemon


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    d = Daemon(write_config(tmp_path, daemon_config(tmp_path)))
    await d.startup()
    try:
        yield d
    finally:
        d.stop.set()
        await d.shutdown()


def _config(d: Daemon) -> Path:
    return d.settings.config_path


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [
        getattr(r, "mr_fields", {}) for r in caplog.records if getattr(r, "mr_event", None) == name
    ]


def _send(port: int, rcpt: str, data: bytes) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        return c.sendmail("carol@customer.test", [rcpt], data)


async def test_reload_applies_a_smaller_message_size_to_new_sessions(daemon: Daemon) -> None:
    """smtp.max_message_size lowered: the next session is refused 552 over it."""
    path = _config(daemon)
    path.write_text(path.read_text().replace("[smtp]\n", "[smtp]\nmax_message_size = 200\n"))
    assert await daemon.reload()
    big = message("sales@example.test") + b"x" * 400 + b"\r\n"
    # smtplib announces SIZE= in MAIL FROM, so the 552 comes there rather than after DATA.
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        await asyncio.to_thread(_send, daemon.settings.smtp.port, "sales@example.test", big)
    assert refused.value.smtp_code == 552


async def test_reload_applies_transfer_settings(daemon: Daemon) -> None:
    """Transfer turned off for support by a reload: the next transfer out is refused."""
    rt = daemon.runtime
    assert rt is not None
    result = await asyncio.to_thread(accept, rt, message("support@example.test"), "support")
    assert result.interaction_id is not None
    path = _config(daemon)
    path.write_text(path.read_text().replace("[accounts.support.transfer]\nenabled = true\n", ""))
    assert await daemon.reload()
    with pytest.raises(TransferRefused) as refused:
        await asyncio.to_thread(transfer, rt, result.interaction_id, "sales", actor="anna")
    assert refused.value.code == "transfer-not-enabled"


async def test_reload_applies_the_log_level(daemon: Daemon) -> None:
    """log.level = DEBUG in the file: mailrouter's loggers log debug from then on."""
    logger = logging.getLogger("mailrouter")
    before = logger.level
    try:
        path = _config(daemon)
        path.write_text(path.read_text().replace("[log]\n", '[log]\nlevel = "DEBUG"\n'))
        assert await daemon.reload()
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(before)


async def test_reload_with_a_changed_port_warns_and_keeps_listening_where_it_was(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    """smtp.port changed: reload-needs-restart names it; the old port still takes mail."""
    caplog.set_level(logging.INFO, logger="mailrouter")
    port = daemon.settings.smtp.port
    path = _config(daemon)
    path.write_text(path.read_text().replace(f"port = {port}", f"port = {free_port()}"))
    assert await daemon.reload()
    [warning] = _events(caplog, "reload-needs-restart")
    assert (warning["key"], warning["running"]) == ("smtp.port", port)
    assert daemon.settings.smtp.port == port
    assert await asyncio.to_thread(_send, port, "sales@example.test", message("sales")) == {}


async def test_reload_refuses_a_template_that_does_not_render(
    daemon: Daemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in the notice template: refused, naming the key and the template file."""
    caplog.set_level(logging.INFO, logger="mailrouter")
    templates = tmp_path / "templates"
    templates.mkdir()
    for f in TEMPLATES.iterdir():
        (templates / f.name).write_bytes(f.read_bytes())
    (templates / "transfer_notice.txt.j2").write_text("Moved to {{ toAcount }}.\n")
    path = _config(daemon)
    path.write_text(path.read_text().replace(str(TEMPLATES), str(templates)))
    before = daemon.settings
    assert not await daemon.reload()
    assert daemon.settings is before
    [refused] = _events(caplog, "reload-refused")
    assert refused["key"] == "accounts.sales.transfer.template"
    assert "transfer_notice.txt.j2:1" in refused["error"] and "toAcount" in refused["error"]


async def test_reload_with_a_certificate_turns_starttls_on_for_new_sessions(
    daemon: Daemon, tls_files: TlsFiles
) -> None:
    """smtp.tls_cert/tls_key added: the next session is offered (and requires) STARTTLS."""

    def ehlo_offers_starttls() -> bool:
        with smtplib.SMTP("127.0.0.1", daemon.settings.smtp.port, timeout=10) as c:
            c.ehlo()
            return c.has_extn("starttls")

    assert not await asyncio.to_thread(ehlo_offers_starttls)
    path = _config(daemon)
    tls = f'[smtp]\ntls_cert = "{tls_files.cert}"\ntls_key = "{tls_files.key}"\n'
    path.write_text(path.read_text().replace("[smtp]\n", tls))
    assert await daemon.reload()
    assert await asyncio.to_thread(ehlo_offers_starttls)


async def test_reload_refuses_a_certificate_that_does_not_load(
    daemon: Daemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A tls_cert that is not there: refused, naming smtp.tls_cert; plain SMTP goes on."""
    caplog.set_level(logging.INFO, logger="mailrouter")
    path = _config(daemon)
    missing = tmp_path / "missing.pem"
    tls = f'[smtp]\ntls_cert = "{missing}"\ntls_key = "{missing}"\n'
    path.write_text(path.read_text().replace("[smtp]\n", tls))
    assert not await daemon.reload()
    [refused] = _events(caplog, "reload-refused")
    assert refused["key"] == "smtp.tls_cert" and str(missing) in refused["error"]
    assert daemon.settings.smtp.tls_cert is None
    port = daemon.settings.smtp.port
    assert await asyncio.to_thread(_send, port, "sales@example.test", message("sales")) == {}


async def test_reload_starts_and_stops_imap_watchers(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An [accounts.NAME.imap] table added: its watcher runs; removed again: it stops."""
    monkeypatch.setenv("MR_T_IMAP_PW", "pw")
    watchers = daemon.watchers
    assert watchers is not None and watchers.watchers == {}
    path = _config(daemon)
    plain = path.read_text()
    imap = (
        f'\n[accounts.billing.imap]\nport = {free_port()}\npassword_env = "MR_T_IMAP_PW"\n'
        "timeout = 1\n"
    )
    # billing is the last account in the file, so its imap table can follow it.
    path.write_text(plain + imap)
    assert await daemon.reload()
    [watcher] = watchers.watchers.values()
    assert watcher.account.name == "billing"
    path.write_text(plain)
    assert await daemon.reload()
    assert watchers.watchers == {}
    assert watcher.state == "stopped"


# --------------------------------------------------------------------------- `mailrouter run`


def test_sighup_new_account_works_at_once_and_an_open_session_completes(tmp_path: Path) -> None:
    """A session open across SIGHUP gets RCPT 250 for the new account and DATA 250; a new
    session's mail to it lands in its Maildir."""
    text = daemon_config(tmp_path)
    with running_daemon(tmp_path, text) as d:
        port = d.settings.smtp.port
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as open_session:
            open_session.ehlo()
            assert open_session.mail("carol@customer.test")[0] == 250
            assert open_session.rcpt("sales@example.test")[0] == 250
            assert open_session.rcpt("returns@example.test")[0] == 550  # not yet

            write_config(tmp_path, text + RETURNS)
            d.signal(signal.SIGHUP)
            reloaded = d.err.wait_for(lambda e: e["event"] in ("reloaded", "reload-refused"))
            assert reloaded["event"] == "reloaded", reloaded
            changed = d.err.wait_for(lambda e: e["event"] == "config-changed")
            assert (changed["key"], changed["change"]) == ("accounts.returns", "added")

            assert open_session.rcpt("returns@example.test")[0] == 250  # the same session
            code, reply = open_session.data(message("sales@example.test, returns@example.test"))
            assert code == 250, reply

        assert _send(port, "returns@example.test", message("returns@example.test", 2)) == {}
        d.err.wait_for(
            lambda e: (
                e["event"] == "outbox"
                and e.get("account") == "returns@example.test"
                and e["status"] == "sent"
            )
        )
        settings = write_config(tmp_path, text + RETURNS)
        [landed] = maildir_messages(settings, "returns")
        assert b"<reload-2@customer.test>" in landed
        assert d.stop() == 0


def test_sighup_broken_config_is_refused_and_the_old_one_keeps_serving(tmp_path: Path) -> None:
    """A type error in the file: reload-refused names file, line and key; mail still flows."""
    text = daemon_config(tmp_path)
    with running_daemon(tmp_path, text) as d:
        bad = broken(text)
        d.settings.config_path.write_text(bad, "utf-8")
        seen = len(d.systemd.messages)
        d.signal(signal.SIGHUP)
        refused = d.err.wait_for(lambda e: e["event"] in ("reload-refused", "reloaded"))
        assert refused["event"] == "reload-refused", refused
        assert refused["level"] == "error"
        assert (refused["file"], refused["line"], refused["key"]) == (
            str(d.settings.config_path),
            line_of(bad, BROKEN_LINE),
            "accounts.support.transfer.enabled",
        )
        assert refused["error"].startswith(
            f"{d.settings.config_path}:{line_of(bad, BROKEN_LINE)}: "
            "accounts.support.transfer.enabled: expected true or false"
        )
        # systemd still hears READY=1 after RELOADING=1, and the status says what happened.
        ready = d.systemd.wait_for(lambda m: m.fields.get("READY") == "1", after=seen)
        assert "last reload refused" in ready.fields["STATUS"]

        port = d.settings.smtp.port
        assert _send(port, "support@example.test", message("support@example.test")) == {}
        d.err.wait_for(lambda e: e["event"] == "outbox" and e["status"] == "sent")
        assert len(maildir_messages(d.settings, "support")) == 1
        assert d.stop() == 0
