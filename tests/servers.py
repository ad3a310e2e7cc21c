"""Real servers the integration tests talk to: a standalone Dovecot, a throwaway PostgreSQL
database and an aiosmtpd capture smarthost — started and stopped by pytest fixtures.

``tests/conftest.py`` re-exports the fixtures (``from servers import *``); test modules import
the classes (``from servers import Dovecot``) for type hints and helpers.
"""

from __future__ import annotations

import contextlib
import grp
import imaplib
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

__all__ = [
    "backend",
    "capture_smarthost",
    "database_url",
    "dovecot",
    "dovecot_clean",
    "module_database_url",
    "postgres_url",
    "tls_files",
]

REQUIRE_SERVERS = os.environ.get("MAILROUTER_REQUIRE_SERVERS") == "1"
HOST = "127.0.0.1"
USERS = ("sales@example.test", "support@example.test", "billing@example.test")
PASSWORD = "secret"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
# helpers' default store: a file in the state dir (relative URLs resolve there).
SQLITE_URL = "sqlite:///mailrouter.db"
# Where Debian (and most distributions) keep Dovecot's service binaries.
_DOVECOT_LIBEXEC = (Path("/usr/lib/dovecot"), Path("/usr/libexec/dovecot"))


def _need(condition: bool, reason: str) -> None:
    """Same rule as ``conftest.need``: skip on a laptop, fail when CI demands the servers.

    Re-implemented rather than imported because conftest imports this module; importing
    it back would be circular.
    """
    if condition:
        return
    if REQUIRE_SERVERS:
        pytest.fail(f"required in CI (MAILROUTER_REQUIRE_SERVERS=1): {reason}")
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    """A self-signed certificate for 127.0.0.1/localhost, used by every test server."""

    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts exactly this certificate (hostname checked)."""
        return ssl.create_default_context(cafile=str(self.cert))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway self-signed certificate (openssl CLI) valid for 127.0.0.1 and localhost."""
    _need(shutil.which("openssl") is not None, "openssl not installed (needed for test TLS)")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    request = "req -x509 -nodes -days 2 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1"
    subprocess.run(
        ["openssl", *request.split(), "-subj", "/CN=localhost", "-keyout", str(key),
         "-out", str(cert), "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    # Dovecot reads the files as root before dropping privileges; 0644 keeps the other
    # servers (running as us) happy too.  The key is throwaway.
    cert.chmod(0o644)
    key.chmod(0o644)
    return TlsFiles(cert, key)


# --------------------------------------------------------------------------- Dovecot


_DOVECOT_CONF = """\
# standalone test instance started by tests/servers.py -- does not read /etc/dovecot
base_dir = {base}/run
state_dir = {base}/state
instance_name = mailrouter-test-{imap_port}
log_path = {base}/dovecot.log
protocols = imap lmtp
listen = {host}
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = no
auth_mechanisms = plain login
# A wrong password is answered at once instead of after 2 s (see also service anvil).
auth_failure_delay = 0
default_login_user = {login_user}
default_internal_user = {internal_user}
default_internal_group = {internal_group}
first_valid_uid = {mail_uid}
first_valid_gid = {mail_gid}
mail_location = maildir:{mail_root}/%u
mail_fsync = never
namespace inbox {{
  inbox = yes
  separator = /
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {base}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {base}/users
  default_fields = uid={mail_uid} gid={mail_gid} home={mail_root}/%u
}}
service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {imap_port}
  }}
  inet_listener imaps {{
    address = {host}
    port = {imaps_port}
    ssl = yes
  }}
  chroot =
}}
service anvil {{
  chroot =
  # No brute-force penalty (2, 4, 8 ... 15 s per wrong password from 127.0.0.1): tests
  # try wrong passwords on purpose and check the classification, not the brake.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = {host}
    port = {lmtp_port}
  }}
}}
"""

_LIST_RE = re.compile(rb'^\((?P<flags>[^)]*)\) (?:"[^"]*"|NIL) (?P<name>"(?:[^"\\]|\\.)*"|\S+)$')


@dataclass
class Dovecot:
    """A running standalone Dovecot 2.3: IMAP (plain + STARTTLS), IMAPS and LMTP on loopback."""

    base_dir: Path
    mail_root: Path
    tls: TlsFiles
    host: str = HOST
    imap_port: int = field(default_factory=free_port)
    imaps_port: int = field(default_factory=free_port)
    lmtp_port: int = field(default_factory=free_port)
    users: tuple[str, ...] = USERS
    password: str = PASSWORD
    _proc: subprocess.Popen[bytes] | None = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def conf(self) -> Path:
        return self.base_dir / "dovecot.conf"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def write_config(self) -> None:
        if os.geteuid() == 0:
            # Dovecot refuses to access mail as uid 0 (first_valid_uid); mail belongs to
            # an unprivileged user, logins run as the users the Debian package creates.
            mail_user, login_user, internal_user, internal_group = (
                "nobody",
                "dovenull",
                "dovecot",
                "dovecot",
            )
        else:  # not root: every process runs as us
            mail_user = login_user = internal_user = pwd.getpwuid(os.getuid()).pw_name
            internal_group = grp.getgrgid(os.getgid()).gr_name
        pw = pwd.getpwnam(mail_user)
        self.mail_root.mkdir(parents=True, exist_ok=True)
        (self.base_dir / "run").mkdir(exist_ok=True)
        (self.base_dir / "state").mkdir(exist_ok=True)
        os.chown(self.mail_root, pw.pw_uid, pw.pw_gid)
        # The login and auth processes (dovenull, dovecot) must traverse the base dir and
        # read the users file.
        self.base_dir.chmod(0o755)
        users = self.base_dir / "users"
        users.write_text("".join(f"{u}:{{PLAIN}}{self.password}::::::\n" for u in self.users))
        users.chmod(0o644)
        self.conf.write_text(
            _DOVECOT_CONF.format(
                base=self.base_dir,
                host=self.host,
                imap_port=self.imap_port,
                imaps_port=self.imaps_port,
                lmtp_port=self.lmtp_port,
                mail_root=self.mail_root,
                cert=self.tls.cert,
                key=self.tls.key,
                login_user=login_user,
                internal_user=internal_user,
                internal_group=internal_group,
                mail_uid=pw.pw_uid,
                mail_gid=pw.pw_gid,
            )
        )

    def start(self, timeout: float = 15.0) -> None:
        """Start Dovecot in the foreground (so we own the process) and wait for its ports."""
        if self.running:
            return
        with open(self.base_dir / "dovecot.stderr", "ab") as err:
            self._proc = subprocess.Popen(
                ["dovecot", "-F", "-c", str(self.conf)], stdout=err, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        ports = (self.imap_port, self.imaps_port, self.lmtp_port)
        # Polling is fine here: Dovecot tells us nothing when it is ready, and this is
        # test set-up, not the daemon.
        while not all(_port_open(p) for p in ports):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"dovecot did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM the master (it stops its children) and wait for it to go."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Started with -F, Dovecot 2.3 leaves its imap processes serving their sessions
        # when the master gets SIGTERM; end them too, so a "restart" drops every client
        # (each says "* BYE Server shutting down.") as a real one does under systemd.
        self._end_leftover_processes()
        # The children close the listening sockets a moment after the master exits.
        deadline = time.monotonic() + 10
        while any(_port_open(p) for p in (self.imap_port, self.lmtp_port)):
            if time.monotonic() > deadline:
                raise RuntimeError("dovecot ports still open 10 s after stop")
            time.sleep(0.05)

    def _end_leftover_processes(self) -> None:
        title = f"mailrouter-test-{self.imap_port}/".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if title in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGTERM)
            except (OSError, ProcessLookupError):
                continue  # gone already, or not ours to read

    def restart(self) -> None:
        """Stop and start again: same ports, same mail (clients see their connection drop)."""
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for name in ("dovecot.log", "dovecot.stderr"):
            p = self.base_dir / name
            if p.exists():
                out += p.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(out)

    # ---------------------------------------------------------------- reading mail back

    @contextlib.contextmanager
    def imap(self, user: str) -> Iterator[imaplib.IMAP4]:
        """An independent client (the standard library's imaplib), logged in as ``user``."""
        with imaplib.IMAP4(self.host, self.imap_port, timeout=10) as client:
            client.login(user, self.password)
            yield client

    def fetch_all(self, user: str, mailbox: str = "INBOX") -> list[bytes]:
        """Every message in ``mailbox`` of ``user``, oldest first; [] if there is no mailbox."""
        with self.imap(user) as client:
            typ, _ = client.select(_quote(mailbox), readonly=True)
            if typ != "OK":
                return []
            typ, data = client.uid("SEARCH", "ALL")
            assert typ == "OK", data
            out: list[bytes] = []
            for uid in (data[0] or b"").split():
                typ, parts = client.uid("FETCH", uid.decode(), "(BODY.PEEK[])")
                assert typ == "OK", parts
                out += [p[1] for p in parts if isinstance(p, tuple)]
            return out

    def mailboxes(self, user: str) -> list[str]:
        with self.imap(user) as client:
            typ, data = client.list()
            assert typ == "OK", data
        names = []
        for line in data:
            m = _LIST_RE.match(line if isinstance(line, bytes) else b"")
            if m:
                name = m.group("name").decode()
                if name.startswith('"'):
                    name = re.sub(r"\\(.)", r"\1", name[1:-1])
                names.append(name)
        return names

    def clean(self) -> None:
        """Empty INBOX and delete every other mailbox of every user (over IMAP, like a user)."""
        for user in self.users:
            for name in self.mailboxes(user):
                with self.imap(user) as client:
                    if name.upper() == "INBOX":
                        _, count = client.select("INBOX")
                        if count[0] in (b"0", None):
                            continue  # "1:*" is an error on an empty mailbox
                        client.store("1:*", "+FLAGS.SILENT", r"(\Deleted)")
                        client.expunge()
                    else:
                        client.delete(_quote(name))


def _quote(mailbox: str) -> str:
    return '"' + mailbox.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dovecot_installed() -> bool:
    return shutil.which("dovecot") is not None and any(
        (d / "lmtp").exists() and (d / "imap").exists() for d in _DOVECOT_LIBEXEC
    )


@pytest.fixture(scope="session")
def dovecot(tls_files: TlsFiles) -> Iterator[Dovecot]:
    """A standalone Dovecot for the whole session (users in ``Dovecot.users``, one password)."""
    _need(
        _dovecot_installed(),
        "dovecot not installed: apt-get install -y dovecot-imapd dovecot-lmtpd",
    )
    # Not under pytest's tmp dir: that is 0700 and Dovecot's unprivileged processes must
    # traverse the path.  A short path also keeps unix socket names under 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="mr-dovecot-"))
    server = Dovecot(base_dir=base, mail_root=base / "mail", tls=tls_files)
    try:
        server.write_config()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def dovecot_clean(dovecot: Dovecot) -> Dovecot:
    """The session's Dovecot, running, with every mailbox empty."""
    dovecot.start()  # a test before may have stopped it
    dovecot.clean()
    return dovecot


# --------------------------------------------------------------------------- PostgreSQL


def _admin_url() -> URL:
    from sqlalchemy.engine import make_url

    return make_url(os.environ.get("MAILROUTER_PG_URL") or DEFAULT_PG_URL)


@contextlib.contextmanager
def fresh_database(prefix: str = "mailrouter_test") -> Iterator[str]:
    """A new, empty database on MAILROUTER_PG_URL's server, dropped afterwards.

    Missing PostgreSQL skips on a laptop and fails under MAILROUTER_REQUIRE_SERVERS=1.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    admin_url = _admin_url()
    admin = create_engine(
        admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        except OperationalError as exc:
            _need(False, f"PostgreSQL not reachable at {admin_url!r}: {exc.orig}")
        yield admin_url.set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            # WITH (FORCE) (PostgreSQL 13+): a test that leaked a connection, or a daemon
            # killed a moment ago, must not leave the database behind.
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a fresh database on MAILROUTER_PG_URL's server, dropped after the session."""
    with fresh_database() as url:
        yield url


def reset_schema(url: str) -> None:
    """Empty the database at ``url`` (every table gone; the next Runtime.open migrates).

    Connections a previous test left open (a daemon it killed, an engine it did not
    dispose) are ended first: they could hold a lock DROP SCHEMA would wait on forever.
    """
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
            conn.execute(text("SET lock_timeout = '10s'"))
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


# The two stores every store-touching test runs on.  The ids are what ``-k`` selects:
# ``-k sqlite`` or ``-m "not postgres"`` for a laptop without PostgreSQL.
BACKENDS = ("sqlite", pytest.param("postgresql", marks=pytest.mark.postgres))


# For a test about a SQLite-only behaviour in a module that runs on both stores (a
# trigger that aborts writes, file modes): ``@SQLITE_ONLY`` overrides the fixture's params.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store of this test: a SQLite file where helpers' settings keep it
    (``tmp_path/state``), or the session's PostgreSQL database, emptied for it."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'mailrouter.db'}"
    url: str = request.getfixturevalue("postgres_url")
    reset_schema(url)
    return url


@pytest.fixture
def backend(database_url: str) -> Iterator[str]:
    """Run the test on both stores without touching its body: every settings file the
    helpers write during the test (``make_settings``, ``config_text``) names ``database_url``.

    A module switches with ``pytestmark = pytest.mark.usefixtures("backend")``.
    """
    with store_at(database_url):
        yield database_url


@contextlib.contextmanager
def store_at(url: str) -> Iterator[None]:
    """While inside, the settings files helpers write name ``url`` (SQLite: helpers' own
    relative file, so each settings' state dir keeps its own store)."""
    import helpers

    with pytest.MonkeyPatch.context() as mp:
        if not url.startswith("sqlite"):
            mp.setattr(helpers, "DATABASE_URL", url)
        yield


@pytest.fixture(scope="module", params=BACKENDS)
def module_database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """For a module-scoped daemon: SQLite, or a PostgreSQL database of its own (function-
    scoped tests reset the session database, which must not happen under a daemon)."""
    if request.param == "sqlite":
        yield SQLITE_URL
        return
    with fresh_database() as url:
        yield url


# --------------------------------------------------------------------------- smarthost


@dataclass(frozen=True)
class Captured:
    """One message the capture smarthost accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    tls: bool
    auth_user: str | None


Stage = Literal["mail", "rcpt", "data"]


class _Handler:
    """aiosmtpd hooks: answer scripted failures, record what was accepted."""

    def __init__(self, owner: CaptureSmarthost) -> None:
        self.owner = owner

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.owner._take_failure("mail")
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        refusal = self.owner.refused_rcpts.get(address.lower())
        if refusal:
            return refusal
        reply = self.owner._take_failure("rcpt")
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = self.owner._take_failure("data")
        if reply:
            return reply
        auth = session.auth_data
        self.owner._record(
            Captured(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                content=envelope.original_content or b"",
                tls=session.ssl is not None,
                auth_user=auth.login.decode() if isinstance(auth, LoginPassword) else None,
            )
        )
        return "250 2.0.0 OK captured"


@dataclass
class CaptureSmarthost:
    """An aiosmtpd smarthost on loopback that records messages and fails on request.

    It offers STARTTLS (``tls``'s certificate; unless ``starttls`` is False) and AUTH
    PLAIN/LOGIN for ``user``/``password`` (after STARTTLS only, like a real submission server).
    """

    tls: TlsFiles
    starttls: bool = True  # offer STARTTLS (False: a smarthost that cannot encrypt)
    host: str = HOST
    port: int = field(default_factory=free_port)
    user: str = "mailrouter"
    password: str = PASSWORD
    messages: list[Captured] = field(default_factory=list)
    refused_rcpts: dict[str, str] = field(default_factory=dict)
    _failures: list[tuple[Stage, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _controller: Controller | None = None

    def fail_next(self, code: int, text: str = "", *, count: int = 1, at: Stage = "data") -> None:
        """Answer ``code text`` at ``at`` (MAIL, each RCPT, or end of DATA) for the next
        ``count`` such commands, then behave normally again."""
        reply = f"{code} {text or ('try again later' if code < 500 else 'rejected')}"
        with self._lock:
            self._failures += [(at, reply)] * count

    def refuse(self, address: str, code: int = 550, text: str = "5.1.1 no such user") -> None:
        """Always refuse ``address`` at RCPT."""
        self.refused_rcpts[address.lower()] = f"{code} {text}"

    def _take_failure(self, stage: Stage) -> str | None:
        with self._lock:
            for i, (at, reply) in enumerate(self._failures):
                if at == stage:
                    del self._failures[i]
                    return reply
        return None

    def _record(self, captured: Captured) -> None:
        with self._lock:
            self.messages.append(captured)

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: object
    ) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and (
            auth_data.login.decode(),
            auth_data.password.decode(),
        ) == (self.user, self.password)
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    def start(self) -> None:
        self._controller = Controller(
            _Handler(self),
            hostname=self.host,
            port=self.port,
            ready_timeout=10,
            tls_context=self.tls.server_context() if self.starttls else None,
            authenticator=self._authenticate,
            auth_require_tls=True,
        )
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


@pytest.fixture
def capture_smarthost(tls_files: TlsFiles) -> Iterator[CaptureSmarthost]:
    """A fresh capture smarthost per test (threaded aiosmtpd Controller; fine in tests)."""
    host = CaptureSmarthost(tls=tls_files)
    host.start()
    try:
        yield host
    finally:
        host.stop()
