"""Reads the TOML config file into :class:`Settings`, with errors that name file, line and key.

The keys each table accepts and the value of a key the file leaves out come from the
settings dataclasses; this module adds the checks and the defaults that depend on other
settings (a Maildir named after its account, a port that depends on the delivery type).
Relative paths for state (database, Maildirs, pickup directory, spool) resolve under the
state directory (``MAILROUTER_STATE_DIR``, default ``./var``); the template directory,
being configuration, resolves next to the config file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import Field
from pathlib import Path
from typing import Any

from mailrouter.config.settings import (
    PACKAGED_TEMPLATES,
    AccountSettings,
    DeliverySettings,
    HttpSettings,
    ImapWatchSettings,
    ListenerSettings,
    NotifySettings,
    OutboundSettings,
    OutboxSettings,
    Secret,
    Settings,
    TransferSettings,
    choices,
    file_default,
    secret_keys,
    toml_fields,
    toml_keys,
)
from mailrouter.net import is_loopback

__all__ = ["ConfigError", "load", "load_from_text"]

_ADDRESS_RE = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+\.[^@\s<>\"]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator: ``file:line: key: problem``."""

    def __init__(self, file: str, key: str, problem: str, line: int | None = None) -> None:
        self.file, self.key, self.problem, self.line = file, key, problem, line
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")


# --------------------------------------------------------------------------- reading


class _Reader:
    """Walks the parsed TOML, converting values and remembering where each key was."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.lines = _key_lines(text)

    def fail(self, key: str, problem: str) -> ConfigError:
        line = self.lines.get(key)
        if line is None:  # point at the table the key belongs in, if it is there
            parent = key.rpartition(".")[0]
            while parent and line is None:
                line = self.lines.get(parent)
                parent = parent.rpartition(".")[0]
        return ConfigError(self.file, key, problem, line)

    def table(self, data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = data.get(key.rpartition(".")[2], {})
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected a table, got {_kind(value)}")
        return value

    def check_keys(self, data: Mapping[str, Any], prefix: str, allowed: set[str]) -> None:
        for k in data:
            if k not in allowed:
                full = f"{prefix}.{k}" if prefix else k
                hint = ", ".join(sorted(allowed))
                raise self.fail(full, f"unknown key (expected one of: {hint})")

    def get(self, data: Mapping[str, Any], key: str, typ: type, default: Any) -> Any:
        short = key.rpartition(".")[2]
        if short not in data:
            return default
        value = data[short]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if typ is int and isinstance(value, bool):
            raise self.fail(key, f"expected an integer, got {_kind(value)}")
        if not isinstance(value, typ):
            raise self.fail(
                key, f"expected {_TYPE_NAMES.get(typ, typ.__name__)}, got {_kind(value)}"
            )
        return value

    def choice(
        self, data: Mapping[str, Any], key: str, choices: tuple[str, ...], default: str
    ) -> Any:
        value = self.get(data, key, str, default)
        if value not in choices:
            raise self.fail(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def positive(self, data: Mapping[str, Any], key: str, typ: type, default: Any) -> Any:
        value = self.get(data, key, typ, default)
        if value <= 0:
            raise self.fail(key, f"must be greater than 0, got {value}")
        return value

    def port(self, data: Mapping[str, Any], key: str, default: int) -> int:
        value: int = self.get(data, key, int, default)
        if not 0 < value < 65536:
            raise self.fail(key, f"expected a TCP port (1-65535), got {value}")
        return value

    def ca_file(self, data: Mapping[str, Any], key: str) -> Path | None:
        """A CA bundle path (relative to the config file) that must exist."""
        value = self.get(data, key, str, None)
        if value is None:
            return None
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = Path(self.file).resolve().parent / path
        if not path.is_file():
            raise self.fail(key, f"{path} does not exist")
        return path

    def secret(self, data: Mapping[str, Any], key: str, env: Mapping[str, str]) -> Secret | None:
        """``<key>_file`` (first line of a file) or ``<key>_env`` (an environment variable)."""
        short = key.rpartition(".")[2]
        if short in data:
            raise self.fail(
                key, f"inline secrets are not accepted; use {short}_file or {short}_env"
            )
        fkey, ekey = f"{key}_file", f"{key}_env"
        fname = self.get(data, fkey, str, None)
        ename = self.get(data, ekey, str, None)
        if fname and ename:
            raise self.fail(fkey, f"give {short}_file or {short}_env, not both")
        if fname:
            path = Path(fname).expanduser()
            if not path.is_absolute():
                path = Path(self.file).resolve().parent / path
            try:
                value = path.read_text(encoding="utf-8").splitlines()[0:1]
            except OSError as exc:
                raise self.fail(fkey, f"cannot read {path}: {exc.strerror}") from None
            if not value or not value[0]:
                raise self.fail(fkey, f"{path} is empty")
            return Secret(f"file:{path}", value[0])
        if ename:
            if not env.get(ename):
                raise self.fail(ekey, f"environment variable {ename} is not set or empty")
            return Secret(f"env:{ename}", env[ename])
        return None


_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", float: "a number"}


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, Mapping):
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", list: "an array"}.get(
        type(value), type(value).__name__
    )


_HEADER_RE = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_.\"' -]+?)\s*=")


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted keys and table names to the line that defines them (first wins)."""
    out: dict[str, int] = {}
    table = ""
    for no, raw in enumerate(text.splitlines(), start=1):
        m = _HEADER_RE.match(raw)
        if m:
            table = _dotted(m.group(1))
            out.setdefault(table, no)
            continue
        m = _KEY_RE.match(raw)
        if m:
            key = _dotted(m.group(1))
            out.setdefault(f"{table}.{key}" if table else key, no)
    return out


def _dotted(key: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in key.split("."))


_FROM_FIELD: Any = object()


class _Table:
    """One TOML table read as a settings dataclass, or as part of one.

    Opening a table refuses keys its dataclass has no field for.  A key the file leaves out
    gets the field's default (see :func:`file_default`) unless the caller passes one that
    depends on other settings.  ``prefix`` places a table among its class's dotted keys: ""
    for ``[outbox]`` (all of an OutboxSettings), "database" for ``[database]`` (part of
    Settings).  ``defaults``, if given, is an instance whose values replace the fields'
    defaults (``[smtp]`` and ``[lmtp]`` are both ListenerSettings with different ones).
    """

    def __init__(
        self,
        r: _Reader,
        data: Mapping[str, Any],
        key: str,
        cls: type,
        *,
        prefix: str = "",
        defaults: object | None = None,
    ) -> None:
        self.r, self.data, self.key, self.cls = r, data, key, cls
        self.prefix, self.defaults = prefix, defaults
        r.check_keys(data, key, toml_keys(cls, prefix))

    def full(self, name: str) -> str:
        """The dotted key of ``name`` in the file (``""``: this table's own key)."""
        return _join(self.key, name)

    def fail(self, name: str, problem: str) -> ConfigError:
        return self.r.fail(self.full(name), problem)

    def sub(self, name: str, cls: type | None = None, defaults: object | None = None) -> _Table:
        """The table ``name`` in this one: a ``cls`` of its own, or more of this table's class."""
        data = self.r.table(self.data, self.full(name))
        if cls is None:
            return _Table(self.r, data, self.full(name), self.cls, prefix=_join(self.prefix, name))
        return _Table(self.r, data, self.full(name), cls, defaults=defaults)

    def table(self, name: str) -> Mapping[str, Any]:
        """The table ``name`` as plain data (a map of names to tables, like ``accounts``)."""
        return self.r.table(self.data, self.full(name))

    def field(self, name: str) -> Field[Any]:
        return toml_fields(self.cls)[_join(self.prefix, name)]

    def default(self, name: str) -> Any:
        f = self.field(name)
        return file_default(f) if self.defaults is None else getattr(self.defaults, f.name)

    def _or_default(self, name: str, default: Any) -> Any:
        return self.default(name) if default is _FROM_FIELD else default

    def get(self, name: str, typ: type, default: Any = _FROM_FIELD) -> Any:
        return self.r.get(self.data, self.full(name), typ, self._or_default(name, default))

    def choice(self, name: str) -> Any:
        """One of the values the field's ``Literal[...]`` type lists."""
        allowed = choices(self.cls, self.field(name))
        return self.r.choice(self.data, self.full(name), allowed, self.default(name))

    def positive(self, name: str, typ: type) -> Any:
        return self.r.positive(self.data, self.full(name), typ, self.default(name))

    def port(self, name: str, default: Any = _FROM_FIELD) -> int:
        return self.r.port(self.data, self.full(name), self._or_default(name, default))

    def ca_file(self, name: str) -> Path | None:
        return self.r.ca_file(self.data, self.full(name))

    def secret(self, name: str, env: Mapping[str, str]) -> Secret | None:
        return self.r.secret(self.data, self.full(name), env)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate ``path``; raises :class:`ConfigError` with file, line and key."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            str(p), "", "no such file (give -c PATH or set MAILROUTER_CONFIG)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), "", f"cannot read: {exc}") from None
    return load_from_text(text, p, env)


def load_from_text(
    text: str, path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> Settings:
    env = os.environ if env is None else env
    file = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"at line (\d+)", str(exc))
        raise ConfigError(
            file, "", f"not valid TOML: {exc}", int(m.group(1)) if m else None
        ) from None
    r = _Reader(file, text)
    config_dir = Path(file).resolve().parent

    top = _Table(r, data, "", Settings)
    state_raw = env.get("MAILROUTER_STATE_DIR") or top.get("state_dir", str)
    state_dir = Path(state_raw).expanduser().resolve()

    def state_path(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else state_dir / p

    db = top.sub("database")
    url = _resolve_sqlite_url(db.get("url", str), state_dir)
    auto_upgrade = db.get("auto_upgrade", bool)
    busy_timeout = db.positive("busy_timeout", float)

    tpl = top.sub("templates")
    tdir_raw = tpl.get("directory", str)
    if tdir_raw is None:
        template_dir = PACKAGED_TEMPLATES
    else:
        tdir = Path(tdir_raw).expanduser()
        template_dir = tdir if tdir.is_absolute() else config_dir / tdir
    references_limit = tpl.positive("references_limit", int)
    if references_limit < 2:
        raise tpl.fail("references_limit", "must be at least 2 (first and last id)")

    accounts = _accounts(top, env, state_path, template_dir)

    outbound = _outbound(top.sub("outbound", OutboundSettings), env, state_path)
    outbox = _outbox(top.sub("outbox", OutboxSettings))
    notify = _notify(top.sub("notify", NotifySettings))
    smtp = _listener(top, "smtp", env, config_dir)
    lmtp = _listener(top, "lmtp", env, config_dir)
    http = _http(top.sub("http", HttpSettings), config_dir)

    log = top.sub("log")
    log_format = log.choice("format")
    log_level = log.choice("level")
    daemon = top.sub("daemon")
    shutdown_timeout = daemon.positive("shutdown_timeout", float)
    instance_name = daemon.get("instance_name", str)
    hostname = top.get("hostname", str)

    return Settings(
        config_path=Path(file).resolve(),
        state_dir=state_dir,
        database_url=url,
        auto_upgrade=auto_upgrade,
        database_busy_timeout=busy_timeout,
        accounts=accounts,
        template_dir=template_dir,
        references_limit=references_limit,
        outbound=outbound,
        outbox=outbox,
        notify=notify,
        smtp=smtp,
        lmtp=lmtp,
        http=http,
        log_format=log_format,
        log_level=log_level,
        hostname=hostname,
        shutdown_timeout=shutdown_timeout,
        instance_name=instance_name,
    )


def _resolve_sqlite_url(url: str, state_dir: Path) -> str:
    """``sqlite:///relative.db`` means relative to the state directory, not the CWD."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        rest = url[len(prefix) :]
        if rest and not rest.startswith(":"):
            return prefix + str(state_dir / rest)
    return url


def _accounts(
    top: _Table, env: Mapping[str, str], state_path: Any, template_dir: Path
) -> tuple[AccountSettings, ...]:
    r = top.r
    raw = top.table("accounts")
    if not raw:
        raise top.fail("accounts", "no accounts configured (add an [accounts.NAME] table)")
    out: list[AccountSettings] = []
    seen: dict[str, str] = {}
    for name, acc in raw.items():
        key = f"accounts.{name}"
        if not isinstance(acc, Mapping):
            raise r.fail(key, f"expected a table, got {_kind(acc)}")
        if not _NAME_RE.match(name):
            raise r.fail(key, "account names use letters, digits, '.', '_' and '-'")
        a = _Table(r, acc, key, AccountSettings)
        address = a.get("address", str, None)
        if address is None:
            raise a.fail("address", "missing (the account's email address)")
        address = address.strip().lower()
        if not _ADDRESS_RE.match(address):
            raise a.fail("address", f"not an email address: {address!r}")
        for other in (address, name.lower()):
            if other in seen:
                raise a.fail("", f"{other!r} is already used by account {seen[other]!r}")
        seen[address] = seen[name.lower()] = name
        display = a.get("display_name", str)

        t = a.sub("transfer", TransferSettings)
        transfer = TransferSettings(
            enabled=t.get("enabled", bool),
            notify=t.get("notify", bool),
            template=t.get("template", str),
        )
        if transfer.notify:
            if not transfer.template:
                raise t.fail("template", "notify = true needs a template name")
            body = template_dir / f"{transfer.template}.txt.j2"
            if not body.is_file():
                raise t.fail(
                    "template",
                    f"template {transfer.template!r} not found: {body} does not exist",
                )

        delivery = _delivery(a.sub("delivery", DeliverySettings), name, address, env, state_path)
        imap = None
        if acc.get("imap") is not None:
            imap = _imap_watch(a.sub("imap", ImapWatchSettings), address, env)
        out.append(AccountSettings(name, address, display, transfer, delivery, imap))
    return tuple(out)


def _delivery(
    d: _Table, name: str, address: str, env: Mapping[str, str], state_path: Any
) -> DeliverySettings:
    typ = d.choice("type")
    if typ == "maildir":
        path = state_path(d.get("path", str, d.default("path").format(name=name)))
        return DeliverySettings(type="maildir", path=path)
    tls = d.choice("tls")
    # An LMTP recipient defaults to the account's address; an IMAP login has no default.
    user = d.get("user", str, address) if typ == "lmtp" else d.get("user", str)
    password = d.secret("password", env)
    if typ == "imap" and (user is None or password is None):
        raise d.fail("", "imap delivery needs user and password_file or password_env")
    return DeliverySettings(
        type=typ,
        host=d.get("host", str),
        port=d.port("port", DeliverySettings.DEFAULT_PORTS[typ]),
        tls=tls,
        user=user,
        password=password,
        mailbox=d.get("mailbox", str),
        timeout=d.positive("timeout", float),
        tls_ca_file=d.ca_file("tls_ca_file"),
    )


def _imap_watch(d: _Table, address: str, env: Mapping[str, str]) -> ImapWatchSettings:
    password = d.secret("password", env)
    if password is None:
        raise d.fail("", "IMAP watching needs password_file or password_env")
    idle = d.positive("idle_timeout", float)
    if idle >= 29 * 60:
        raise d.fail("idle_timeout", "must be below 29 minutes (RFC 2177 server limit)")
    return ImapWatchSettings(
        host=d.get("host", str),
        port=d.port("port"),
        user=d.get("user", str, address),
        password=password,
        tls=d.choice("tls"),
        mailbox=d.get("mailbox", str),
        routed_folder=d.get("routed_folder", str),
        poll_interval=d.positive("poll_interval", float),
        idle_timeout=idle,
        timeout=d.positive("timeout", float),
        tls_ca_file=d.ca_file("tls_ca_file"),
    )


def _outbound(d: _Table, env: Mapping[str, str], state_path: Any) -> OutboundSettings:
    typ = d.choice("type")
    if typ == "pickup":
        return OutboundSettings(type="pickup", path=state_path(d.get("path", str)))
    host = d.get("host", str)
    tls = d.choice("tls")
    if tls == "none" and not is_loopback(host):
        raise d.fail("tls", f"a non-loopback smarthost ({host}) needs tls = starttls or tls")
    return OutboundSettings(
        type="smtp",
        host=host,
        port=d.port("port"),
        tls=tls,
        user=d.get("user", str),
        password=d.secret("password", env),
        timeout=d.positive("timeout", float),
        helo_name=d.get("helo_name", str),
        tls_ca_file=d.ca_file("tls_ca_file"),
    )


def _outbox(d: _Table) -> OutboxSettings:
    out = OutboxSettings(
        initial_backoff=d.positive("initial_backoff", float),
        max_backoff=d.positive("max_backoff", float),
        lifetime=d.positive("lifetime", float),
        batch=d.positive("batch", int),
        lease=d.positive("lease", float),
        poll_interval=d.positive("poll_interval", float),
        heartbeat=d.positive("heartbeat", float),
        dead_after=d.positive("dead_after", float),
    )
    if out.dead_after < 2 * out.heartbeat:
        # One late beat must not make a live instance look dead (its claims would be
        # taken and delivered twice).
        raise d.fail("dead_after", "must be at least twice outbox.heartbeat")
    return out


def _listener(top: _Table, name: str, env: Mapping[str, str], config_dir: Path) -> ListenerSettings:
    # [smtp] and [lmtp] differ only in their defaults, which Settings gives.
    d = top.sub(name, ListenerSettings, defaults=top.default(name))
    r = d.r
    host = d.get("host", str)
    require_auth = d.get("require_auth", bool)
    users: dict[str, Secret] = {}
    for user, spec in d.table("auth_users").items():
        ukey = d.full(f"auth_users.{user}")
        if not isinstance(spec, Mapping):
            raise r.fail(ukey, "expected a table with password_file or password_env")
        r.check_keys(spec, ukey, secret_keys("password"))
        secret = r.secret(spec, f"{ukey}.password", env)
        if secret is None:
            raise r.fail(ukey, "needs password_file or password_env")
        users[user] = secret

    def cfg_path(key: str) -> Path | None:
        v = d.get(key, str)
        if v is None:
            return None
        p = Path(v).expanduser()
        return p if p.is_absolute() else config_dir / p

    cert, keyf = cfg_path("tls_cert"), cfg_path("tls_key")
    if (cert is None) != (keyf is None):
        raise d.fail("tls_cert", "tls_cert and tls_key go together")
    enabled = d.get("enabled", bool)
    if enabled and not is_loopback(host) and not require_auth and name == "smtp":
        # An SMTP listener reachable from other hosts without AUTH is only safe behind a
        # firewall; make the operator say so explicitly rather than default into it.
        raise d.fail("host", f"listening on {host} (not loopback) needs require_auth = true")
    if require_auth and not users:
        raise d.fail("auth_users", "require_auth = true needs at least one user")
    return ListenerSettings(
        enabled=enabled,
        host=host,
        port=d.port("port"),
        max_message_size=d.positive("max_message_size", int),
        max_connections=d.positive("max_connections", int),
        max_connections_per_client=d.positive("max_connections_per_client", int),
        idle_timeout=d.positive("idle_timeout", float),
        max_recipients=d.positive("max_recipients", int),
        hard_error_limit=d.positive("hard_error_limit", int),
        reuse_port=d.get("reuse_port", bool),
        tls_cert=cert,
        tls_key=keyf,
        require_auth=require_auth,
        auth_users=users,
    )


def _http(d: _Table, config_dir: Path) -> HttpSettings:
    host = d.get("host", str)

    def tls_file(name: str) -> Path | None:
        v = d.get(name, str)
        if v is None:
            return None
        p = Path(v).expanduser()
        p = p if p.is_absolute() else config_dir / p
        if not p.is_file():
            raise d.fail(name, f"{p} does not exist")
        return p

    cert, key = tls_file("tls_cert"), tls_file("tls_key")
    if (cert is None) != (key is None):
        raise d.fail("tls_cert" if cert is None else "tls_key", "tls_cert and tls_key go together")
    behind_proxy = d.get("behind_proxy", bool)
    raw = d.get("trusted_proxies", list)
    proxies: list[str] = []
    for item in raw:
        try:
            if not isinstance(item, str):
                raise ValueError(item)
            # uvicorn compares networks strictly and would take "10.0.0.1/8" for a name:
            # hand it the normalised form.
            net = ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            raise d.fail("trusted_proxies", f"not an IP address or network: {item!r}") from None
        proxies.append(str(net.network_address) if net.num_addresses == 1 else str(net))
    if proxies and not behind_proxy:
        raise d.fail("trusted_proxies", "only used with behind_proxy = true")
    if behind_proxy and not proxies:
        raise d.fail(
            "behind_proxy",
            "behind_proxy = true needs trusted_proxies (the proxy's address): "
            "X-Forwarded-* is believed from those only",
        )
    enabled = d.get("enabled", bool)
    if enabled and not is_loopback(host) and cert is None and not behind_proxy:
        # Bearer tokens and desk passwords would cross the network in clear text.
        raise d.fail(
            "host",
            f"listening on {host} (not loopback) needs tls_cert and tls_key, "
            "or behind_proxy = true with trusted_proxies",
        )
    return HttpSettings(
        enabled=enabled,
        host=host,
        port=d.port("port"),
        tls_cert=cert,
        tls_key=key,
        behind_proxy=behind_proxy,
        trusted_proxies=tuple(proxies),
    )


_TOKEN_RE = re.compile(r"^[!-~]+(?: [!-~]+)*$")


def _notify(d: _Table) -> NotifySettings:
    token = d.get("subject_token", str)
    if token:
        field = NotifySettings.TOKEN_FIELD
        if token.count(field) != 1 or len(token) > 40 or not _TOKEN_RE.match(token):
            raise d.fail(
                "subject_token",
                f"expected printable ASCII of at most 40 characters with {field} once "
                f'(e.g. "[#{field}]"), or "" for none; got {token!r}',
            )
    return NotifySettings(
        subject_token=token,
        max_auto_per_customer_per_day=d.positive("max_auto_per_customer_per_day", int),
        render_timeout=d.positive("render_timeout", float),
        max_render_size=d.positive("max_render_size", int),
        render_memory_mb=d.positive("render_memory_mb", int),
        max_subject_length=d.positive("max_subject_length", int),
    )
