"""Leases on SQLite and PostgreSQL: one holder at a time, taken over once expired."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from helpers import make_settings, pipeline
from mailrouter.runtime import Runtime
from mailrouter.store import leases
from mailrouter.store.models import utcnow


@pytest.fixture
def rt(tmp_path: Path, database_url: str) -> Iterator[Runtime]:
    with pipeline(make_settings(tmp_path).with_(database_url=database_url)) as runtime:
        yield runtime


def test_a_held_lease_is_refused_to_others_and_renewed_by_its_holder(rt: Runtime) -> None:
    """Only the holder renews; another instance is refused until it expires."""
    now = utcnow()
    with rt.db.write() as s:
        assert leases.acquire(s, "imap:sales:INBOX", "a", now, 10)
        assert not leases.acquire(s, "imap:sales:INBOX", "b", now, 10)
        assert leases.acquire(s, "imap:sales:INBOX", "a", now, 10)  # its own again
        assert leases.renew(s, "imap:sales:INBOX", "a", now, 10)
        assert not leases.renew(s, "imap:sales:INBOX", "b", now, 10)
        assert leases.holder_of(s, "imap:sales:INBOX", now) == "a"


def test_an_expired_lease_goes_to_the_next_instance_and_the_old_holder_loses_it(
    rt: Runtime,
) -> None:
    """The holder died (stopped renewing): after the TTL another takes it; the old holder
    finds out on its next renewal."""
    now = utcnow()
    with rt.db.write() as s:
        assert leases.acquire(s, "imap:sales:INBOX", "a", now, 10)
    later = now + timedelta(seconds=11)
    with rt.db.write() as s:
        assert leases.acquire(s, "imap:sales:INBOX", "b", later, 10)
        assert not leases.renew(s, "imap:sales:INBOX", "a", later, 10)
        leases.release(s, "imap:sales:INBOX", "a")  # not its own: changes nothing
        assert leases.holder_of(s, "imap:sales:INBOX", later) == "b"
        leases.release(s, "imap:sales:INBOX", "b")
        assert leases.holder_of(s, "imap:sales:INBOX", later) is None


def test_a_restart_frees_the_leases_of_its_dead_predecessor_at_once(rt: Runtime) -> None:
    """SIGKILLed while watching: the restarted incarnation of the same name registers,
    which retires the dead one and frees its lease — no wait for the TTL."""
    from mailrouter.store.instances import register

    now = utcnow()
    with rt.db.write() as s:
        dead = register(s, "host-a:/var/lib/mailrouter", now)
        assert leases.acquire(s, "imap:sales:INBOX", dead, now, 3600)
    with rt.db.write() as s:
        restarted = register(s, "host-a:/var/lib/mailrouter", now)
        assert leases.holder_of(s, "imap:sales:INBOX", now) is None
        assert leases.acquire(s, "imap:sales:INBOX", restarted, now, 3600)
        other = register(s, "host-b:/var/lib/mailrouter", now)  # another name: no effect
        assert leases.holder_of(s, "imap:sales:INBOX", now) == restarted
        assert other != restarted
