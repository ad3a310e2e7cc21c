"""The test servers themselves: a throwaway PostgreSQL database that works, a Dovecot that
keeps its mail and ports across a restart."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from mailrouter.deliver.lmtp import lmtp_deliver
from servers import Dovecot


@pytest.mark.postgres
def test_postgres_url_is_a_fresh_usable_database(postgres_url: str) -> None:
    """SELECT 1 works, and the database is the session's own, not the server's default."""
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
            name = conn.execute(text("SELECT current_database()")).scalar()
    finally:
        engine.dispose()
    assert name == make_url(postgres_url).database and str(name).startswith("mailrouter_test_")


@pytest.mark.dovecot
async def test_dovecot_restart_keeps_ports_and_mail(dovecot_clean: Dovecot) -> None:
    """restart() comes back on the same ports with the same mailboxes."""
    raw = b"Subject: kept\r\nMessage-ID: <kept@customer.test>\r\n\r\nstill here\r\n"
    ports = (dovecot_clean.imap_port, dovecot_clean.lmtp_port)
    results = await lmtp_deliver(
        dovecot_clean.host,
        dovecot_clean.lmtp_port,
        raw,
        mail_from="",
        recipients=["sales@example.test"],
        timeout=10,
    )
    assert results["sales@example.test"][0] == 250
    dovecot_clean.restart()
    assert (dovecot_clean.imap_port, dovecot_clean.lmtp_port) == ports
    [stored] = dovecot_clean.fetch_all("sales@example.test")
    assert stored.endswith(raw)


@pytest.mark.dovecot
def test_dovecot_clean_empties_every_mailbox(dovecot_clean: Dovecot) -> None:
    """After clean() INBOX is empty and extra folders are gone."""
    with dovecot_clean.imap("support@example.test") as client:
        client.create('"Routed"')
        client.append("INBOX", None, None, b"Subject: x\r\n\r\nx\r\n")
    assert dovecot_clean.fetch_all("support@example.test") != []
    dovecot_clean.clean()
    assert dovecot_clean.fetch_all("support@example.test") == []
    assert dovecot_clean.mailboxes("support@example.test") == ["INBOX"]
