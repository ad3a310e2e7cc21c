"""Reads the TOML config file into :class:`Settings`, with errors that name file, line and key.

Relative paths for state (database, Maildirs, pickup directory, spool) resolve under the
state directory (``MAILROUTER_STATE_DIR``, default ``./var``); the template directory,
being configuration, resolves next to the config file.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mailrouter.config.settings import (
    DEFAULT_STATE_DIR,
    AccountSettings,
    DeliverySettings,
    ImapWatchSettings,
    ListenerSettings,
    OutboundSettings,
    OutboxSettings,
    Secret,
    Settings,
    TransferSettings,
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

    r.check_keys(
        data,
        "",
        {
            "state_dir",
            "hostname",
            "database",
            "templates",
            "accounts",
            "outbound",
            "outbox",
            "smtp",
            "lmtp",
            "log",
            "daemon",
        },
    )
    state_raw = env.get("MAILROUTER_STATE_DIR") or r.get(data, "state_dir", str, DEFAULT_STATE_DIR)
    state_dir = Path(state_raw).expanduser().resolve()

    def state_path(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else state_dir / p

    db = r.table(data, "database")
    r.check_keys(db, "database", {"url", "auto_upgrade"})
    url = r.get(db, "database.url", str, "sqlite:///mailrouter.db")
    url = _resolve_sqlite_url(url, state_dir)
    auto_upgrade = r.get(db, "database.auto_upgrade", bool, True)

    tpl = r.table(data, "templates")
    r.check_keys(tpl, "templates", {"directory", "references_limit"})
    tdir = Path(r.get(tpl, "templates.directory", str, "templates")).expanduser()
    template_dir = tdir if tdir.is_absolute() else config_dir / tdir
    references_limit = r.positive(tpl, "templates.references_limit", int, 20)
    if references_limit < 2:
        raise r.fail("templates.references_limit", "must be at least 2 (first and last id)")

    accounts = _accounts(r, data, env, state_path, template_dir)

    outbound = _outbound(r, r.table(data, "outbound"), env, state_path)
    outbox = _outbox(r, r.table(data, "outbox"))
    smtp = _listener(r, r.table(data, "smtp"), "smtp", env, config_dir, 2525, True)
    lmtp = _listener(r, r.table(data, "lmtp"), "lmtp", env, config_dir, 2424, False)

    log = r.table(data, "log")
    r.check_keys(log, "log", {"format", "level"})
    log_format = r.choice(log, "log.format", ("kv", "json"), "kv")
    log_level = r.choice(log, "log.level", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO")
    daemon = r.table(data, "daemon")
    r.check_keys(daemon, "daemon", {"shutdown_timeout"})
    shutdown_timeout = r.positive(daemon, "daemon.shutdown_timeout", float, 30.0)
    hostname = r.get(data, "hostname", str, "mailrouter.invalid")

    return Settings(
        config_path=Path(file).resolve(),
        state_dir=state_dir,
        database_url=url,
        auto_upgrade=auto_upgrade,
        accounts=accounts,
        template_dir=template_dir,
        references_limit=references_limit,
        outbound=outbound,
        outbox=outbox,
        smtp=smtp,
        lmtp=lmtp,
        log_format=log_format,
        log_level=log_level,
        hostname=hostname,
        shutdown_timeout=shutdown_timeout,
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
    r: _Reader, data: Mapping[str, Any], env: Mapping[str, str], state_path: Any, template_dir: Path
) -> tuple[AccountSettings, ...]:
    raw = r.table(data, "accounts")
    if not raw:
        raise r.fail("accounts", "no accounts configured (add an [accounts.NAME] table)")
    out: list[AccountSettings] = []
    seen: dict[str, str] = {}
    for name, acc in raw.items():
        key = f"accounts.{name}"
        if not isinstance(acc, Mapping):
            raise r.fail(key, f"expected a table, got {_kind(acc)}")
        if not _NAME_RE.match(name):
            raise r.fail(key, "account names use letters, digits, '.', '_' and '-'")
        r.check_keys(acc, key, {"address", "display_name", "transfer", "delivery", "imap"})
        address = r.get(acc, f"{key}.address", str, None)
        if address is None:
            raise r.fail(f"{key}.address", "missing (the account's email address)")
        address = address.strip().lower()
        if not _ADDRESS_RE.match(address):
            raise r.fail(f"{key}.address", f"not an email address: {address!r}")
        for other in (address, name.lower()):
            if other in seen:
                raise r.fail(key, f"{other!r} is already used by account {seen[other]!r}")
        seen[address] = seen[name.lower()] = name
        display = r.get(acc, f"{key}.display_name", str, None)

        t = r.table(acc, f"{key}.transfer")
        r.check_keys(t, f"{key}.transfer", {"enabled", "notify", "template"})
        transfer = TransferSettings(
            enabled=r.get(t, f"{key}.transfer.enabled", bool, False),
            notify=r.get(t, f"{key}.transfer.notify", bool, False),
            template=r.get(t, f"{key}.transfer.template", str, None),
        )
        if transfer.notify:
            if not transfer.template:
                raise r.fail(f"{key}.transfer.template", "notify = true needs a template name")
            body = template_dir / f"{transfer.template}.txt.j2"
            if not body.is_file():
                raise r.fail(
                    f"{key}.transfer.template",
                    f"template {transfer.template!r} not found: {body} does not exist",
                )

        delivery = _delivery(
            r, r.table(acc, f"{key}.delivery"), f"{key}.delivery", name, address, env, state_path
        )
        imap_raw = acc.get("imap")
        imap = None
        if imap_raw is not None:
            imap = _imap_watch(r, r.table(acc, f"{key}.imap"), f"{key}.imap", address, env)
        out.append(AccountSettings(name, address, display, transfer, delivery, imap))
    return tuple(out)


def _delivery(
    r: _Reader,
    d: Mapping[str, Any],
    key: str,
    name: str,
    address: str,
    env: Mapping[str, str],
    state_path: Any,
) -> DeliverySettings:
    r.check_keys(
        d,
        key,
        {
            "type",
            "path",
            "host",
            "port",
            "tls",
            "user",
            "password_file",
            "password_env",
            "password",
            "mailbox",
            "timeout",
            "tls_ca_file",
        },
    )
    typ = r.choice(d, f"{key}.type", ("maildir", "imap", "lmtp"), "maildir")
    if typ == "maildir":
        path = state_path(r.get(d, f"{key}.path", str, f"maildir/{name}"))
        return DeliverySettings(type="maildir", path=path)
    default_port = {"imap": 143, "lmtp": 24}[typ]
    tls = r.choice(d, f"{key}.tls", ("none", "starttls", "tls"), "none")
    user = r.get(d, f"{key}.user", str, address if typ == "lmtp" else None)
    password = r.secret(d, f"{key}.password", env)
    if typ == "imap" and (user is None or password is None):
        raise r.fail(key, "imap delivery needs user and password_file or password_env")
    return DeliverySettings(
        type=typ,
        host=r.get(d, f"{key}.host", str, "127.0.0.1"),
        port=r.port(d, f"{key}.port", default_port),
        tls=tls,
        user=user,
        password=password,
        mailbox=r.get(d, f"{key}.mailbox", str, "INBOX"),
        timeout=r.positive(d, f"{key}.timeout", float, 30.0),
        tls_ca_file=r.ca_file(d, f"{key}.tls_ca_file"),
    )


def _imap_watch(
    r: _Reader, d: Mapping[str, Any], key: str, address: str, env: Mapping[str, str]
) -> ImapWatchSettings:
    r.check_keys(
        d,
        key,
        {
            "host",
            "port",
            "tls",
            "user",
            "password_file",
            "password_env",
            "password",
            "mailbox",
            "routed_folder",
            "poll_interval",
            "idle_timeout",
            "timeout",
            "tls_ca_file",
        },
    )
    password = r.secret(d, f"{key}.password", env)
    if password is None:
        raise r.fail(key, "IMAP watching needs password_file or password_env")
    idle = r.positive(d, f"{key}.idle_timeout", float, 25 * 60.0)
    if idle >= 29 * 60:
        raise r.fail(f"{key}.idle_timeout", "must be below 29 minutes (RFC 2177 server limit)")
    return ImapWatchSettings(
        host=r.get(d, f"{key}.host", str, "127.0.0.1"),
        port=r.port(d, f"{key}.port", 143),
        user=r.get(d, f"{key}.user", str, address),
        password=password,
        tls=r.choice(d, f"{key}.tls", ("none", "starttls", "tls"), "none"),
        mailbox=r.get(d, f"{key}.mailbox", str, "INBOX"),
        routed_folder=r.get(d, f"{key}.routed_folder", str, "Routed"),
        poll_interval=r.positive(d, f"{key}.poll_interval", float, 60.0),
        idle_timeout=idle,
        timeout=r.positive(d, f"{key}.timeout", float, 30.0),
        tls_ca_file=r.ca_file(d, f"{key}.tls_ca_file"),
    )


def _outbound(
    r: _Reader, d: Mapping[str, Any], env: Mapping[str, str], state_path: Any
) -> OutboundSettings:
    r.check_keys(
        d,
        "outbound",
        {
            "type",
            "path",
            "host",
            "port",
            "tls",
            "user",
            "password_file",
            "password_env",
            "password",
            "timeout",
            "helo_name",
            "tls_ca_file",
        },
    )
    typ = r.choice(d, "outbound.type", ("pickup", "smtp"), "pickup")
    if typ == "pickup":
        return OutboundSettings(
            type="pickup", path=state_path(r.get(d, "outbound.path", str, "pickup"))
        )
    host = r.get(d, "outbound.host", str, "127.0.0.1")
    tls = r.choice(d, "outbound.tls", ("none", "starttls", "tls"), "starttls")
    if tls == "none" and not is_loopback(host):
        raise r.fail(
            "outbound.tls", f"a non-loopback smarthost ({host}) needs tls = starttls or tls"
        )
    return OutboundSettings(
        type="smtp",
        host=host,
        port=r.port(d, "outbound.port", 25),
        tls=tls,
        user=r.get(d, "outbound.user", str, None),
        password=r.secret(d, "outbound.password", env),
        timeout=r.positive(d, "outbound.timeout", float, 60.0),
        helo_name=r.get(d, "outbound.helo_name", str, None),
        tls_ca_file=r.ca_file(d, "outbound.tls_ca_file"),
    )


def _outbox(r: _Reader, d: Mapping[str, Any]) -> OutboxSettings:
    r.check_keys(
        d,
        "outbox",
        {"initial_backoff", "max_backoff", "lifetime", "batch", "lease", "poll_interval"},
    )
    return OutboxSettings(
        initial_backoff=r.positive(d, "outbox.initial_backoff", float, 30.0),
        max_backoff=r.positive(d, "outbox.max_backoff", float, 3600.0),
        lifetime=r.positive(d, "outbox.lifetime", float, 5 * 86400.0),
        batch=r.positive(d, "outbox.batch", int, 50),
        lease=r.positive(d, "outbox.lease", float, 300.0),
        poll_interval=r.positive(d, "outbox.poll_interval", float, 5.0),
    )


def _listener(
    r: _Reader,
    d: Mapping[str, Any],
    name: str,
    env: Mapping[str, str],
    config_dir: Path,
    default_port: int,
    default_enabled: bool,
) -> ListenerSettings:
    r.check_keys(
        d,
        name,
        {
            "enabled",
            "host",
            "port",
            "max_message_size",
            "max_connections",
            "tls_cert",
            "tls_key",
            "require_auth",
            "auth_users",
        },
    )
    host = r.get(d, f"{name}.host", str, "127.0.0.1")
    require_auth = r.get(d, f"{name}.require_auth", bool, False)
    users_raw = r.table(d, f"{name}.auth_users")
    users: dict[str, Secret] = {}
    for user, spec in users_raw.items():
        ukey = f"{name}.auth_users.{user}"
        if not isinstance(spec, Mapping):
            raise r.fail(ukey, "expected a table with password_file or password_env")
        r.check_keys(spec, ukey, {"password_file", "password_env", "password"})
        secret = r.secret(spec, f"{ukey}.password", env)
        if secret is None:
            raise r.fail(ukey, "needs password_file or password_env")
        users[user] = secret

    def cfg_path(key: str) -> Path | None:
        v = r.get(d, key, str, None)
        if v is None:
            return None
        p = Path(v).expanduser()
        return p if p.is_absolute() else config_dir / p

    cert, keyf = cfg_path(f"{name}.tls_cert"), cfg_path(f"{name}.tls_key")
    if (cert is None) != (keyf is None):
        raise r.fail(f"{name}.tls_cert", "tls_cert and tls_key go together")
    enabled = r.get(d, f"{name}.enabled", bool, default_enabled)
    if enabled and not is_loopback(host) and not require_auth and name == "smtp":
        # An SMTP listener reachable from other hosts without AUTH is only safe behind a
        # firewall; make the operator say so explicitly rather than default into it.
        raise r.fail(
            f"{name}.host", f"listening on {host} (not loopback) needs require_auth = true"
        )
    if require_auth and not users:
        raise r.fail(f"{name}.auth_users", "require_auth = true needs at least one user")
    return ListenerSettings(
        enabled=enabled,
        host=host,
        port=r.port(d, f"{name}.port", default_port),
        max_message_size=r.positive(d, f"{name}.max_message_size", int, 25 * 1024 * 1024),
        max_connections=r.positive(d, f"{name}.max_connections", int, 100),
        tls_cert=cert,
        tls_key=keyf,
        require_auth=require_auth,
        auth_users=users,
    )
