"""The sign-in limiter on its own, with a clock the test moves: free tries, growing waits,
forgetting, and bounded memory."""

from __future__ import annotations

import pytest

from mailrouter.http.desk.limits import SignInLimiter, SignInLimits, client_key, retry_after


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_five_failures_are_free_then_each_wait_doubles_up_to_the_cap() -> None:
    """No wait for the first five failures; then 1 s, 2 s, 4 s … never above max_delay."""
    clock = Clock()
    limiter = SignInLimiter(free=5, base_delay=1.0, max_delay=8.0, clock=clock)
    waits = []
    for _ in range(9):
        waits.append(limiter.wait("agent:alice"))
        limiter.failed("agent:alice")
    assert waits == [0, 0, 0, 0, 0, 1, 2, 4, 8]
    assert limiter.wait("agent:alice") == 8  # capped
    clock.now += 3
    assert limiter.wait("agent:alice") == 5  # the wait runs from the last failure


def test_a_wait_passes_and_a_success_clears_the_count() -> None:
    """After its wait a key may try again; a success starts it from zero."""
    clock = Clock()
    limiter = SignInLimiter(free=1, clock=clock)
    limiter.failed("agent:bob")
    assert limiter.wait("agent:bob") == 1
    clock.now += 1
    assert limiter.wait("agent:bob") == 0
    limiter.succeeded("agent:bob")
    limiter.failed("agent:bob")
    assert limiter.wait("agent:bob") == 1  # one failure again, not three


def test_failures_are_forgotten_after_a_quiet_hour() -> None:
    """A key whose last failure is forget_after old starts again with its free tries."""
    clock = Clock()
    limiter = SignInLimiter(free=2, forget_after=3600, clock=clock)
    for _ in range(4):
        limiter.failed("client:192.0.2.1")
    assert limiter.wait("client:192.0.2.1") > 0
    clock.now += 3600
    assert limiter.wait("client:192.0.2.1") == 0
    limiter.failed("client:192.0.2.1")
    assert limiter.wait("client:192.0.2.1") == 0  # one failure, within the free two


def test_memory_is_bounded_by_forgetting_the_oldest_keys() -> None:
    """A million guessed names cannot grow the table past max_keys."""
    limiter = SignInLimiter(free=1, max_keys=100, clock=Clock())
    for n in range(1000):
        limiter.failed(f"agent:guess{n}")
    assert len(limiter._counts) == 100
    assert limiter.wait("agent:guess999") > 0 and limiter.wait("agent:guess0") == 0


def test_an_address_has_more_free_tries_than_a_name_and_success_clears_only_the_name() -> None:
    """An office behind one NAT address shares 20 tries; a name has 5; signing in clears
    the name's count and leaves the address's."""
    limits = SignInLimits(
        names=SignInLimiter(free=5, clock=Clock()), clients=SignInLimiter(free=20, clock=Clock())
    )
    for n in range(5):
        limits.failed("alice", "192.0.2.7")
        assert limits.wait(f"other{n}", "192.0.2.7") == 0
    assert limits.wait("alice", "198.51.100.1") > 0  # the name waits, from anywhere
    limits.succeeded("alice")
    assert limits.wait("alice", "198.51.100.1") == 0
    for n in range(15):
        limits.failed(f"other{n}", "192.0.2.7")
    assert limits.wait("carol", "192.0.2.7") > 0  # 20 from one address: everyone there waits
    assert limits.wait("carol", "192.0.2.8") == 0


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "client:192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "client:2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "client:2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "client:192.0.2.7"),
        (None, "client:unknown"),
    ],
)
def test_an_ipv6_client_counts_by_its_64(host: str | None, key: str) -> None:
    """One machine usually has a whole IPv6 /64: it counts as one address."""
    assert client_key(host) == key


def test_retry_after_is_whole_seconds_and_never_zero() -> None:
    assert [retry_after(x) for x in (0.01, 1.0, 1.2, 59.9)] == [1, 1, 2, 60]
