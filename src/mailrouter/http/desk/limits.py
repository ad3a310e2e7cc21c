"""Failed sign-ins are rate-limited, per agent name and per client address.

After ``free`` failures a name (or an address) must wait before its next attempt: one
second at first, twice as long after each further failure, up to ``max_delay``.  While
it waits, an attempt is refused *without* checking the password, so guessing cannot go
faster than the delay.  Unknown names are counted like known ones (the answer never
tells them apart).  A name gets 5 free failures; an address 20, because a whole office
may sign in from behind one NAT address; an IPv6 client counts by its /64, which is what
one machine usually has.  A success clears its name's count, not its address's: an
address that knows one password does not get new tries at the other names.  A count is
forgotten ``forget_after`` its last failure.

The counts live in the daemon's memory, bounded by ``max_keys``: a restart forgets
them, and several instances behind one name each count their own.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["SignInLimiter", "SignInLimits", "client_key", "name_key", "retry_after"]


def name_key(name: str) -> str:
    return "agent:" + name.strip().lower()


def client_key(host: str | None) -> str:
    """``client:ADDRESS``, an IPv6 address reduced to its /64."""
    if not host:
        return "client:unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"client:{host}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:192.0.2.7 is 192.0.2.7
            return f"client:{ip.ipv4_mapped}"
        return f"client:{ipaddress.IPv6Network((ip, 64), strict=False)}"
    return f"client:{ip}"


@dataclass
class _Count:
    failures: int
    last: float


@dataclass
class SignInLimiter:
    free: int = 5
    base_delay: float = 1.0
    max_delay: float = 15 * 60.0
    forget_after: float = 60 * 60.0
    max_keys: int = 10_000
    clock: Callable[[], float] = time.monotonic
    _counts: OrderedDict[str, _Count] = field(default_factory=OrderedDict, repr=False)

    def _current(self, key: str, now: float) -> _Count | None:
        count = self._counts.get(key)
        if count is not None and now - count.last >= self.forget_after:
            del self._counts[key]
            return None
        return count

    def wait(self, key: str) -> float:
        """Seconds until the next attempt for ``key`` is allowed (0: now)."""
        now = self.clock()
        count = self._current(key, now)
        if count is None or count.failures < self.free:
            return 0.0
        delay = min(self.base_delay * 2.0 ** (count.failures - self.free), self.max_delay)
        return max(0.0, count.last + delay - now)

    def failed(self, key: str) -> None:
        now = self.clock()
        count = self._current(key, now)
        if count is None:
            count = self._counts[key] = _Count(0, now)
        count.failures += 1
        count.last = now
        self._counts.move_to_end(key)
        while len(self._counts) > self.max_keys:
            # The key least recently failed goes first: memory stays bounded even when
            # someone tries a million names.
            self._counts.popitem(last=False)

    def succeeded(self, key: str) -> None:
        self._counts.pop(key, None)


@dataclass
class SignInLimits:
    """The two counts a sign-in is held to: its agent name's and its client's."""

    names: SignInLimiter = field(default_factory=lambda: SignInLimiter(free=5))
    clients: SignInLimiter = field(default_factory=lambda: SignInLimiter(free=20))

    def wait(self, name: str, client: str | None) -> float:
        """Seconds until this name may be tried from this client (0: now)."""
        return max(self.names.wait(name_key(name)), self.clients.wait(client_key(client)))

    def failed(self, name: str, client: str | None) -> None:
        self.names.failed(name_key(name))
        self.clients.failed(client_key(client))

    def succeeded(self, name: str) -> None:
        self.names.succeeded(name_key(name))


def retry_after(seconds: float) -> int:
    """Whole seconds for a Retry-After header and the sentence (never 0)."""
    return max(1, math.ceil(seconds))
