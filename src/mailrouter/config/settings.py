"""The frozen settings objects every stage receives, and the one place their defaults live.

Nothing in mailrouter reads the environment or the config file on its own: the loader
builds a :class:`Settings` once (its keys and defaults come from these fields), tests build
their own.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

__all__ = [
    "DEFAULT_STATE_DIR",
    "PACKAGED_TEMPLATES",
    "AccountSettings",
    "DeliverySettings",
    "HttpSettings",
    "ImapWatchSettings",
    "ListenerSettings",
    "NotifySettings",
    "OutboundSettings",
    "OutboxSettings",
    "Secret",
    "Settings",
    "TransferSettings",
    "client_ssl_context",
    "describe",
    "mask_url",
]

DEFAULT_STATE_DIR = "./var"
# The notice templates shipped inside the package (package data, in the wheel too): what
# a config file that does not set templates.directory gets.
PACKAGED_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

_UNSET: Any = object()


def _in_file(key: str | None = None, *, default: Any = _UNSET) -> dict[str, Any]:
    """Field metadata for the loader, when the dataclass default is not the whole story.

    ``key``: the field's dotted TOML key, if not its name.  ``default``: what a file that
    does not set the field gets, if that is not the dataclass default: the TOML value for a
    path the loader resolves (code must give the resolved one), or the defaults of a table.
    """
    meta: dict[str, Any] = {}
    if key is not None:
        meta["toml_key"] = key
    if default is not _UNSET:
        meta["file_default"] = default
    return meta


_NOT_IN_FILE: dict[str, Any] = {"toml_key": None}


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
    # maildir; in a file it defaults to maildir/NAME (the account's name) under the state dir
    path: Path | None = field(default=None, metadata=_in_file(default="maildir/{name}"))
    host: str = "127.0.0.1"  # imap / lmtp
    port: int = 0  # in a file: DEFAULT_PORTS[type]
    tls: Literal["none", "starttls", "tls"] = "none"
    user: str | None = None  # imap login; lmtp recipient (defaults to the account address)
    password: Secret | None = None
    mailbox: str = "INBOX"
    timeout: float = 30.0
    tls_ca_file: Path | None = None  # trust this CA (a private one) instead of the system's

    DEFAULT_PORTS: ClassVar[Mapping[str, int]] = {"imap": 143, "lmtp": 24}


@dataclass(frozen=True, kw_only=True)
class ImapWatchSettings:
    """Watch an account's IMAP mailbox for customer mail (IDLE, polling fallback)."""

    host: str = "127.0.0.1"
    port: int = 143
    user: str  # in a file: the account's address
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
    name: str = field(metadata=_NOT_IN_FILE)  # the NAME of its [accounts.NAME] table
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
    # Sessions one client address may hold (Postfix: smtpd_client_connection_count_limit),
    # so one host cannot take every slot; beyond it, 421 4.7.0.
    max_connections_per_client: int = 50
    # Seconds a session may stay silent (awaiting a command, or in the middle of DATA)
    # before it is closed.  RFC 5321 §4.5.3.2.7 asks 5 minutes of an internet server; our
    # client is the site's own MTA, which never pauses that long (Postfix keeps an idle
    # cached connection for 2 s), so one minute frees idle slots five times sooner.
    idle_timeout: float = 60.0
    # Recipients per message; more get 452 4.5.3 (RFC 5321 §4.5.3.1.8: at least 100).
    max_recipients: int = 100
    # Refusals in one session before 421 4.7.0 and a hang-up (Postfix smtpd_hard_error_limit).
    hard_error_limit: int = 20
    # Bind with SO_REUSEPORT, so several ``mailrouter run`` processes on one host share the
    # port and the kernel spreads connections across them (more than one core serves SMTP).
    # They must share a PostgreSQL database: SQLite instances would each have their own store.
    reuse_port: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_auth: bool = False
    auth_users: Mapping[str, Secret] = field(default_factory=dict)


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP server in the daemon's loop: the JSON API (``/api/v1``) and ``/healthz``.

    Off unless a file turns it on.  Agents' tokens and passwords travel in its requests, so
    a bind that is not loopback needs TLS here (``tls_cert`` + ``tls_key``) or a reverse
    proxy that terminates it (``behind_proxy``); only then, and only from
    ``trusted_proxies``, are ``X-Forwarded-For`` and ``X-Forwarded-Proto`` believed.
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8025
    tls_cert: Path | None = None
    tls_key: Path | None = None
    behind_proxy: bool = False
    trusted_proxies: tuple[str, ...] = ()  # addresses or networks (CIDR) of the proxies

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None


@dataclass(frozen=True)
class OutboundSettings:
    """How mailrouter's own mail (notices, agent replies) leaves: a pickup dir or SMTP."""

    type: Literal["pickup", "smtp"] = "pickup"
    # pickup; in a file it defaults to pickup/ under the state directory
    path: Path | None = field(default=None, metadata=_in_file(default="pickup"))
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
    # A running instance beats this often; one silent for dead_after seconds is taken for
    # dead and its claims come back (a restart takes its own back at once).
    heartbeat: float = 2.0
    dead_after: float = 10.0


@dataclass(frozen=True)
class NotifySettings:
    """What mailrouter sends on its own: the bounds of a notice, loop limits, the subject token.

    ``[notify]`` in the file; docs/templates.md explains each key.
    """

    # Appended to notice and reply subjects so a reply from a client that drops References
    # still threads (a weak signal: it joins only for a known participant).  "" turns it off.
    subject_token: str = "[#{id}]"
    # Automatic mails (notices) one customer address gets in 24 hours, like Znuny's 40/day;
    # beyond it notices are suppressed with a reason.
    max_auto_per_customer_per_day: int = 10
    # A template render runs in a child process that is killed after this many seconds.
    render_timeout: float = 5.0
    # Characters a render may produce, all parts together (subject, text, HTML).
    max_render_size: int = 100_000
    # Memory the render process may grow by, in MiB (a string bomb fails, not the host).
    render_memory_mb: int = 256
    # A customer subject (and display name) is cut to this many characters in notices,
    # replies and template variables: a 210 KB Subject made a 541 KB notice.
    max_subject_length: int = 200

    TOKEN_FIELD: ClassVar[str] = "{id}"


@dataclass(frozen=True)
class Settings:
    """Everything the daemon and the commands need, read once.

    The first fields are required when code builds Settings (a test must say where its
    state lives); the ``file_default`` beside each is what a config file that does not set
    it gets, before the loader resolves relative paths.
    """

    config_path: Path = field(metadata=_NOT_IN_FILE)
    state_dir: Path = field(metadata=_in_file(default=DEFAULT_STATE_DIR))
    database_url: str = field(metadata=_in_file("database.url", default="sqlite:///mailrouter.db"))
    auto_upgrade: bool = field(metadata=_in_file("database.auto_upgrade", default=True))
    accounts: tuple[AccountSettings, ...]
    # In a file: relative to the file's directory; not set, PACKAGED_TEMPLATES.
    template_dir: Path = field(metadata=_in_file("templates.directory", default=None))
    references_limit: int = field(default=20, metadata=_in_file("templates.references_limit"))
    # SQLite: how long a writer waits for another connection's lock before the store
    # counts as unavailable (SMTP 451, the outbox retries).
    database_busy_timeout: float = field(default=30.0, metadata=_in_file("database.busy_timeout"))
    outbound: OutboundSettings = OutboundSettings()
    outbox: OutboxSettings = OutboxSettings()
    notify: NotifySettings = NotifySettings()
    # Built in code, Settings listens nowhere; a config file gets an SMTP listener on 2525
    # unless it says otherwise, and an LMTP one on 2424 once it enables it.
    smtp: ListenerSettings = field(
        default=ListenerSettings(),
        metadata=_in_file(default=ListenerSettings(enabled=True, port=2525)),
    )
    lmtp: ListenerSettings = field(
        default=ListenerSettings(), metadata=_in_file(default=ListenerSettings(port=2424))
    )
    http: HttpSettings = HttpSettings()
    log_format: Literal["kv", "json"] = field(default="kv", metadata=_in_file("log.format"))
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = field(
        default="INFO", metadata=_in_file("log.level")
    )
    hostname: str = "mailrouter.invalid"
    shutdown_timeout: float = field(default=30.0, metadata=_in_file("daemon.shutdown_timeout"))
    # Names this daemon's claims across restarts; default "<host>:<state dir>".
    instance_name: str | None = field(default=None, metadata=_in_file("daemon.instance_name"))

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


# --------------------------------------------------------------------------- the file's view
# The loader asks these questions of the dataclasses instead of repeating keys and defaults.


def toml_fields(cls: type) -> dict[str, Field[Any]]:
    """The fields of ``cls`` by dotted TOML key (a field's name unless its metadata says
    otherwise), leaving out those a file does not set."""
    out: dict[str, Field[Any]] = {}
    for f in fields(cls):
        key = f.metadata.get("toml_key", f.name)
        if key is not None:
            out[key] = f
    return out


def toml_keys(cls: type, table: str = "") -> set[str]:
    """The keys allowed in ``table`` of ``cls`` (``""``: the table ``cls`` itself reads).

    ``Settings.database_url`` is keyed ``database.url``, so ``database`` is allowed at the
    top and ``url`` in ``[database]``.  A Secret field ``password`` allows ``password_file``
    and ``password_env``, and ``password`` itself so that an inline one is refused with a
    hint rather than as an unknown key.
    """
    prefix = f"{table}." if table else ""
    keys: set[str] = set()
    for key, f in toml_fields(cls).items():
        if key.startswith(prefix):
            name = key[len(prefix) :].partition(".")[0]
            secret = _hints(cls)[f.name] in (Secret, Secret | None)
            keys |= secret_keys(name) if secret else {name}
    return keys


def secret_keys(name: str) -> set[str]:
    """The keys a secret ``name`` may be given with (``name`` itself only to refuse it)."""
    return {name, f"{name}_file", f"{name}_env"}


def file_default(f: Field[Any]) -> Any:
    """What a config file that does not set ``f`` gets: its ``file_default``, else its default."""
    if "file_default" in f.metadata:
        return f.metadata["file_default"]
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise LookupError(f"{f.name} has no default; the loader must give one")


def choices(cls: type, f: Field[Any]) -> tuple[str, ...]:
    """The values a ``Literal[...]`` field accepts, in the order the type lists them."""
    hint = _hints(cls)[f.name]
    if get_origin(hint) is not Literal:
        raise TypeError(f"{cls.__name__}.{f.name} is not a Literal")
    return get_args(hint)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


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
    out["database_url"] = mask_url(settings.database_url)
    return dict(out)


def mask_url(url: str) -> str:
    """``url`` with its password masked, wherever it is: in the authority (which may itself
    contain unencoded ``@`` and ``:``) or as a ``password=`` style query parameter."""
    scheme, sep, rest = url.partition("://")
    if sep:
        path_at = rest.find("/")
        head, tail = (rest, "") if path_at < 0 else (rest[:path_at], rest[path_at:])
        auth, at, host = head.rpartition("@")
        if at and ":" in auth:
            head = auth.partition(":")[0] + ":********@" + host
        elif not at and "@" in tail.partition("?")[0]:
            # user:p/ss@host: the password held a "/"; mask up to the last "@".
            auth, _, after = rest.rpartition("@")
            head, tail = auth.partition(":")[0] + ":********@" + after, ""
        url = f"{scheme}{sep}{head}{tail}"
    return re.sub(r"([?&][^=&]*(?:pass|secret|token)[^=&]*=)[^&]*", r"\1********", url, flags=re.I)
