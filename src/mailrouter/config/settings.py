"""The frozen settings objects every stage receives, and the one place their defaults live.

Nothing in mailrouter reads the environment or the config file on its own: the loader
builds a :class:`Settings` once, tests build their own.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "DEFAULT_STATE_DIR",
    "AccountSettings",
    "DeliverySettings",
    "ImapWatchSettings",
    "ListenerSettings",
    "OutboundSettings",
    "OutboxSettings",
    "Secret",
    "Settings",
    "TransferSettings",
    "client_ssl_context",
    "describe",
]

DEFAULT_STATE_DIR = "./var"


@dataclass(frozen=True)
class Secret:
    """A password that comes from a file or the environment; never printed."""

    source: str  # "file:/path", "env:NAME" or "inline"
    _value: str = field(repr=False)

    def get(self) -> str:
        return self._value

    def __str__(self) -> str:
        return f"******** (from {self.source})"


@dataclass(frozen=True)
class TransferSettings:
    enabled: bool = False
    notify: bool = False
    template: str | None = None


@dataclass(frozen=True)
class DeliverySettings:
    """Where mail owned by an account is put: a Maildir, an IMAP mailbox, or LMTP."""

    type: Literal["maildir", "imap", "lmtp"] = "maildir"
    path: Path | None = None  # maildir
    host: str = "127.0.0.1"  # imap / lmtp
    port: int = 0
    tls: Literal["none", "starttls", "tls"] = "none"
    user: str | None = None  # imap login; lmtp recipient (defaults to the account address)
    password: Secret | None = None
    mailbox: str = "INBOX"
    timeout: float = 30.0
    tls_ca_file: Path | None = None  # trust this CA (a private one) instead of the system's


@dataclass(frozen=True)
class ImapWatchSettings:
    """Watch an account's IMAP mailbox for customer mail (IDLE, polling fallback)."""

    host: str
    port: int
    user: str
    password: Secret | None
    tls: Literal["none", "starttls", "tls"] = "none"
    mailbox: str = "INBOX"
    routed_folder: str = "Routed"
    poll_interval: float = 60.0
    idle_timeout: float = 25 * 60.0  # re-IDLE before the 29-minute server limit
    timeout: float = 30.0
    tls_ca_file: Path | None = None


@dataclass(frozen=True)
class AccountSettings:
    name: str
    address: str
    display_name: str | None = None
    transfer: TransferSettings = TransferSettings()
    delivery: DeliverySettings = DeliverySettings()
    imap: ImapWatchSettings | None = None

    @property
    def from_header(self) -> str:
        from email.utils import formataddr

        return formataddr((self.display_name or "", self.address))


@dataclass(frozen=True)
class ListenerSettings:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 0
    max_message_size: int = 25 * 1024 * 1024
    max_connections: int = 100  # beyond this, new clients get 421 (memory stays bounded)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_auth: bool = False
    auth_users: Mapping[str, Secret] = field(default_factory=dict)


@dataclass(frozen=True)
class OutboundSettings:
    """How mailrouter's own mail (notices, agent replies) leaves: a pickup dir or SMTP."""

    type: Literal["pickup", "smtp"] = "pickup"
    path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 25
    # A smarthost is reached over the network: encrypt unless told otherwise (the loader
    # refuses "none" for a host that is not loopback).
    tls: Literal["none", "starttls", "tls"] = "starttls"
    user: str | None = None
    password: Secret | None = None
    timeout: float = 60.0
    helo_name: str | None = None
    tls_ca_file: Path | None = None


@dataclass(frozen=True)
class OutboxSettings:
    """Retry policy of the durable outbox (like Postfix's deferred queue)."""

    initial_backoff: float = 30.0
    max_backoff: float = 3600.0
    lifetime: float = 5 * 86400.0  # give up (permanent failure) after this long
    batch: int = 50
    lease: float = 300.0  # a claimed row not finished within this is claimable again
    poll_interval: float = 5.0


@dataclass(frozen=True)
class Settings:
    config_path: Path
    state_dir: Path
    database_url: str
    auto_upgrade: bool
    accounts: tuple[AccountSettings, ...]
    template_dir: Path
    references_limit: int = 20
    outbound: OutboundSettings = OutboundSettings()
    outbox: OutboxSettings = OutboxSettings()
    smtp: ListenerSettings = ListenerSettings()
    lmtp: ListenerSettings = ListenerSettings()
    log_format: Literal["kv", "json"] = "kv"
    log_level: str = "INFO"
    hostname: str = "mailrouter.invalid"
    shutdown_timeout: float = 30.0

    def account(self, name_or_address: str) -> AccountSettings:
        """The account named ``name_or_address`` (its name or its address), or KeyError."""
        key = name_or_address.strip().lower()
        for acc in self.accounts:
            if acc.name.lower() == key or acc.address == key:
                return acc
        known = ", ".join(a.name for a in self.accounts)
        raise KeyError(f"unknown account {name_or_address!r} (configured: {known})")

    def account_for_address(self, address: str) -> AccountSettings | None:
        """The account whose address is ``address`` (case-insensitive), or None."""
        addr = address.strip().lower()
        for acc in self.accounts:
            if acc.address == addr:
                return acc
        return None

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields replaced (tests build variations this way)."""
        return replace(self, **changes)


def client_ssl_context(ca_file: Path | None) -> ssl.SSLContext | None:
    """Verification context for a configured private CA; None means the system's trust."""
    return ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None


def describe(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data for ``check-config`` (secrets masked)."""

    def conv(value: Any) -> Any:
        if isinstance(value, Secret):
            return str(value)
        if isinstance(value, Path):
            return str(value)
        if is_dataclass(value) and not isinstance(value, type):
            return {f.name: conv(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, Mapping):
            return {k: conv(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [conv(v) for v in value]
        return value

    out = conv(settings)
    out["database_url"] = _mask_url(settings.database_url)
    return dict(out)


def _mask_url(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1********@", url)
