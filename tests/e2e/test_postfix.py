"""A real Postfix in front, configured from ``docs/postfix-dovecot.md`` alone.

The test reads the doc's fenced blocks (each starts with a ``# /etc/...`` comment naming
the file it belongs to: the ``main.cf`` lines, the ``master.cf`` and transport lines for
the LMTP and for the SMTP hand-off, and ``mailrouter.toml``), rewrites only paths and
port numbers, and starts from them (the doc's main.cf lines follow a short base for a
private instance, ``_BASE_MAIN_CF``, and may not set anything it sets)

- a private Postfix instance (``postfix -c DIR start``: its own config, queue and data
  directories, smtpd on a free loopback port, its log in a file — nothing system-wide),
- ``mailrouter run`` as a subprocess, delivering into the suite's Dovecot over LMTP,
- the capture smarthost as Postfix's relayhost, where mailrouter's notices end up.

The customer connects from 127.0.0.2, outside the instance's ``mynetworks``, like a
stranger on the Internet.  Every wait is bounded and polls a condition.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import need
from helpers import counts, pipeline, subprocess_env
from mailrouter.config import Settings, load
from servers import CaptureSmarthost, Dovecot, free_port

pytestmark = [pytest.mark.dovecot, pytest.mark.postfix]

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "postfix-dovecot.md"
TEMPLATES = ROOT / "config" / "templates"
HOST = "127.0.0.1"
CUSTOMER_IP = "127.0.0.2"  # not in the instance's mynetworks: an outsider
HANDOFFS = ("lmtp", "smtp")

# The first line of each block the doc must have (and the test uses): exactly one each.
MAIN_CF = "# /etc/postfix/main.cf"
MASTER_CF = {
    "lmtp": "# /etc/postfix/master.cf — add (LMTP",
    "smtp": "# /etc/postfix/master.cf — add (SMTP",
}
TRANSPORT = {"lmtp": "# /etc/postfix/transport — LMTP", "smtp": "# /etc/postfix/transport — SMTP"}
MAILROUTER_TOML = "# /etc/mailrouter/mailrouter.toml"
# The ports the doc uses, and what the test puts in their place.
DOC_PORTS = {"lmtp": 2424, "smtp": 2525, "postfix": 25, "dovecot": 24}


# --------------------------------------------------------------------------- the doc


def doc_blocks(text: str | None = None) -> list[str]:
    """Every fenced code block of the doc, without its fences."""
    text = DOC.read_text("utf-8") if text is None else text
    return [m.group(1) for m in re.finditer(r"^```[\w-]*\n(.*?)^```$", text, re.S | re.M)]


def doc_block(first_line: str) -> str:
    """The one block whose first line starts with ``first_line``."""
    found = [b for b in doc_blocks() if b.startswith(first_line)]
    assert len(found) == 1, f"{DOC.name}: {len(found)} blocks start with {first_line!r}"
    return found[0]


def replace_once(text: str, old: str, new: str, what: str) -> str:
    """``text`` with ``old`` replaced; the doc must contain it (else the test rewrites
    nothing and would silently test something else)."""
    assert old in text, f"{DOC.name}: {what} no longer contains {old!r}"
    return text.replace(old, new)


def postfix_params(text: str) -> dict[str, str]:
    """``name = value`` of a main.cf text (continuation lines joined, comments dropped)."""
    out: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and name:
            out[name] += " " + line.strip()
            continue
        name, _, value = line.partition("=")
        name = name.strip()
        out[name] = value.strip()
    return out


def test_doc_gives_every_block_once_and_postfix_refuses_big_mail_before_mailrouter() -> None:
    """The blocks are there, and the size limits are in the documented order: Postfix's
    ``message_size_limit`` below mailrouter's ``max_message_size`` (both listeners), with
    room for the header Postfix adds."""
    main = postfix_params(doc_block(MAIN_CF))
    for handoff in HANDOFFS:
        doc_block(MASTER_CF[handoff])
        doc_block(TRANSPORT[handoff])
    toml = tomllib.loads(doc_block(MAILROUTER_TOML))
    postfix_limit = int(main["message_size_limit"])
    for listener in ("lmtp", "smtp"):
        ours = toml[listener]["max_message_size"]
        assert postfix_limit <= ours - 64 * 1024, (listener, postfix_limit, ours)
    assert "lmtp_destination_recipient_limit" not in main  # the default already
    assert main["unverified_recipient_reject_code"] == "550"
    assert "reject_unverified_recipient" in main["smtpd_recipient_restrictions"]
    assert "example.test" in main["relay_domains"]
    assert toml["outbound"]["helo_name"]


# --------------------------------------------------------------------------- Postfix

# What only a private test instance needs; the doc's main.cf lines follow these, and may
# not set any of them (checked), so nothing here changes what the doc configures.
_BASE_MAIN_CF = """\
# private test instance written by tests/e2e/test_postfix.py
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = {host}
inet_protocols = ipv4
myhostname = postfix.example.test
mydestination =
mynetworks = {host}/32
# Everything not for mailrouter (mailrouter's notices to customers) goes to the capture
# smarthost: no DNS, no Internet.
relayhost = [{host}]:{relay_port}
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
alias_maps =
alias_database =
biff = no
# How long smtpd waits between looks at a probe's result (default 3s): test patience only.
address_verify_poll_delay = 1s
address_verify_poll_count = 10
"""

# Debian's master.cf services without chroot (the private queue has no chroot files) and
# with smtpd on our port; the doc's master.cf lines follow.
_BASE_MASTER_CF = """\
{host}:{port} inet n -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(check: Callable[[], bool], what: str, within: float = 20.0) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within}s: {what}")
        time.sleep(0.1)


@dataclass
class Postfix:
    """A private Postfix instance: ``postfix -c conf start`` with its own directories."""

    base: Path
    handoff: str
    mailrouter_port: int
    relay_port: int
    port: int = field(default_factory=free_port)

    @property
    def conf(self) -> Path:
        return self.base / "conf"

    def write_config(self) -> None:
        self.conf.mkdir(parents=True)
        # postfix-script wants the queue directory to exist; `postfix start` creates what
        # is inside it (and the data directory) with the owners Postfix expects.
        (self.base / "queue").mkdir()
        fill = {"base": self.base, "host": HOST, "port": self.port, "relay_port": self.relay_port}
        base_main = _BASE_MAIN_CF.format(**fill)
        main = replace_once(doc_block(MAIN_CF), "/etc/postfix/", f"{self.conf}/", "main.cf")
        overlap = postfix_params(base_main).keys() & postfix_params(main).keys()
        assert not overlap, f"the doc's main.cf sets what the test instance must: {overlap}"
        (self.conf / "main.cf").write_text(base_main + "\n" + main)

        master = doc_block(MASTER_CF[self.handoff])
        (self.conf / "master.cf").write_text(_BASE_MASTER_CF.format(**fill) + "\n" + master)

        # inet:127.0.0.1:2424 (LMTP) or [127.0.0.1]:2525 (SMTP)
        doc_port = f"127.0.0.1:{DOC_PORTS[self.handoff]}"
        transport = doc_block(TRANSPORT[self.handoff]).replace("]:", ":")
        transport = replace_once(
            transport, doc_port, f"127.0.0.1:{self.mailrouter_port}", "the transport map"
        )
        if self.handoff == "smtp":
            transport = transport.replace("127.0.0.1:", "127.0.0.1]:")
        (self.conf / "transport").write_text(transport)
        self.run("postmap", "-c", str(self.conf), f"hash:{self.conf}/transport")

    def run(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stderr}\n{self.log()}")
        return proc

    def start(self) -> None:
        self.run("postfix", "-c", str(self.conf), "start")
        wait_for(lambda: _port_open(self.port), f"postfix listening on {self.port}\n{self.log()}")

    def running(self) -> bool:
        status = subprocess.run(
            ["postfix", "-c", str(self.conf), "status"], capture_output=True, timeout=30
        )
        return status.returncode == 0

    def stop(self) -> None:
        if not self.running():
            return
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True, timeout=60)
        deadline = time.monotonic() + 20
        while self.running() or _port_open(self.port):
            if time.monotonic() > deadline:
                subprocess.run(["postfix", "-c", str(self.conf), "abort"], capture_output=True)
                break
            time.sleep(0.1)

    def postqueue(self, *args: str) -> str:
        return self.run("postqueue", "-c", str(self.conf), *args).stdout

    def queue_ids(self) -> list[str]:
        """Queue ids ``postqueue -p`` lists (deferred or active)."""
        return re.findall(r"^([0-9A-F]{6,})[*!]?\s", self.postqueue("-p"), re.M)

    def log(self) -> str:
        path = self.base / "maillog"
        return path.read_text(errors="replace") if path.exists() else "(no maillog)"

    def mailrouter_lines(self) -> list[str]:
        """Delivery log lines of the doc's ``mailrouter`` transport."""
        return [line for line in self.log().splitlines() if " postfix/mailrouter/" in line]


# --------------------------------------------------------------------------- mailrouter


@dataclass
class Mailrouter:
    """``mailrouter run`` as a subprocess, from the doc's TOML (ports rewritten)."""

    settings: Settings
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def write_config(tmp: Path, dovecot: Dovecot, postfix_port: int) -> Settings:
        text = doc_block(MAILROUTER_TOML)
        ports = {
            "lmtp": free_port(),
            "smtp": free_port(),
            "postfix": postfix_port,
            "dovecot": dovecot.lmtp_port,
        }
        for name, doc_port in DOC_PORTS.items():
            line = re.compile(rf"^(\s*port = ){doc_port}(\s|$)", re.M)
            assert line.search(text), f"{DOC.name}: the mailrouter.toml has no port {doc_port}"
            text = line.sub(rf"\g<1>{ports[name]}\g<2>", text)
        text = f'state_dir = "{tmp / "state"}"\n' + text
        text += f'\n[templates]\ndirectory = "{TEMPLATES}"\n'
        path = tmp / "mailrouter.toml"
        path.write_text(text, "utf-8")
        return load(path, env={})

    def _cmd(self) -> list[str]:
        exe = Path(sys.executable).parent / "mailrouter"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mailrouter"]
        return [*cmd, "-c", str(self.settings.config_path)]

    def start(self) -> None:
        start = len(self.log())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self._cmd(), "run"],
                env=subprocess_env(self.settings),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"mailrouter exited with {proc.returncode}:\n{self.log()}")
            return "event=ready" in self.log()[start:]

        wait_for(ready, f"mailrouter ready\n{self.log()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=40) == 0, self.log()
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"mailrouter did not stop on SIGTERM:\n{self.log()}")

    def cli(self, *args: str) -> str:
        proc = subprocess.run(
            [*self._cmd(), *args],
            env=subprocess_env(self.settings),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, f"mailrouter {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    postfix: Postfix
    mailrouter: Mailrouter
    dovecot: Dovecot
    smarthost: CaptureSmarthost

    def send(
        self, raw: bytes, *rcpts: str, source: str = CUSTOMER_IP
    ) -> dict[str, tuple[int, bytes]]:
        """Send as the customer's server would: from 127.0.0.2 to Postfix's smtpd."""
        with smtplib.SMTP(HOST, self.postfix.port, timeout=30, source_address=(source, 0)) as c:
            return c.sendmail("dana@customer.test", list(rcpts or ["sales@example.test"]), raw)

    def inbox(self, user: str) -> list[bytes]:
        return self.dovecot.fetch_all(user)

    def wait_inbox(self, user: str, count: int, within: float = 30.0) -> list[bytes]:
        wait_for(
            lambda: len(self.inbox(user)) >= count,
            f"{count} message(s) in {user}'s INBOX\n{self.diagnostics()}",
            within,
        )
        got = self.inbox(user)
        assert len(got) == count, f"{user}: {len(got)} messages, expected {count}"
        return got

    def store_counts(self) -> dict[str, int]:
        """Rows in mailrouter's store (messages, transfers, outbox), read beside the daemon."""
        with pipeline(self.mailrouter.settings) as rt:
            return counts(rt)

    def diagnostics(self) -> str:
        return (
            f"--- postqueue -p\n{self.postfix.postqueue('-p')}\n--- maillog\n"
            f"{self.postfix.log()[-4000:]}\n--- mailrouter\n{self.mailrouter.log()[-4000:]}"
        )


def _postfix_installed() -> bool:
    return all(shutil.which(p) for p in ("postfix", "postqueue", "postmap"))


@pytest.fixture(params=HANDOFFS)
def stack(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    dovecot_clean: Dovecot,
    capture_smarthost: CaptureSmarthost,
) -> Iterator[Stack]:
    need(
        _postfix_installed(),
        "postfix not installed: scripts/test-servers (apt-get install postfix)",
    )
    need(os.geteuid() == 0, "a private Postfix instance must be started as root")
    # `postfix -c DIR` reads the default main.cf for its multi-instance list.
    need(
        Path("/etc/postfix/main.cf").exists(),
        "/etc/postfix/main.cf missing: scripts/test-servers installs postfix 'Local only'",
    )
    # Not under pytest's 0700 tmp dir: Postfix's unprivileged daemons resolve paths too.
    base = Path(tempfile.mkdtemp(prefix="mr-postfix-"))
    base.chmod(0o755)
    postfix_port = free_port()
    settings = Mailrouter.write_config(tmp_path, dovecot_clean, postfix_port)
    handoff = str(request.param)
    listener = settings.lmtp if handoff == "lmtp" else settings.smtp
    postfix = Postfix(
        base,
        handoff,
        mailrouter_port=listener.port,
        relay_port=capture_smarthost.port,
        port=postfix_port,
    )
    mailrouter = Mailrouter(settings, tmp_path / "mailrouter.log")
    try:
        postfix.write_config()
        postfix.start()
        mailrouter.start()
        yield Stack(postfix, mailrouter, dovecot_clean, capture_smarthost)
    finally:
        with contextlib.suppress(BaseException):
            mailrouter.stop()
        postfix.stop()
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- the mail

FIRST = b"""From: Dana Customer <dana@customer.test>\r
To: sales@example.test\r
Subject: Broken hinge on order 5512\r
Date: Wed, 25 Nov 2026 10:00:00 +0000\r
Message-ID: <hinge-1@customer.test>\r
\r
The hinge broke after two days.\r
"""
REPLY = b"""From: Dana Customer <dana@customer.test>\r
To: sales@example.test\r
Subject: Re: Broken hinge on order 5512\r
Date: Thu, 26 Nov 2026 08:30:00 +0000\r
Message-ID: <hinge-2@customer.test>\r
In-Reply-To: <hinge-1@customer.test>\r
References: <hinge-1@customer.test>\r
\r
Any update?\r
"""


def headers_of(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]


def test_new_message_through_postfix_lands_in_the_account_mailbox(stack: Stack) -> None:
    """Customer → Postfix → mailrouter → Dovecot: one copy in sales' INBOX, logged sent."""
    assert stack.send(FIRST) == {}
    [got] = stack.wait_inbox("sales@example.test", 1)
    head = headers_of(got)
    assert b"Message-ID: <hinge-1@customer.test>" in head
    assert b"X-Mailrouter-Interaction: 1" in head
    assert b"by postfix.example.test (Postfix)" in head  # it really came through Postfix
    assert stack.inbox("support@example.test") == []
    wait_for(
        lambda: any("status=sent" in line for line in stack.postfix.mailrouter_lines()),
        "Postfix logged the hand-off as sent",
    )
    [sent] = [line for line in stack.postfix.mailrouter_lines() if "status=sent" in line]
    assert "to=<sales@example.test>" in sent and "250 2.0.0 OK deliver interaction=1" in sent
    wait_for(lambda: stack.postfix.queue_ids() == [], "Postfix's queue empty")


@pytest.mark.parametrize("stack", ["lmtp"], indirect=True)  # the same after either hand-off
def test_reply_to_old_address_after_transfer_reaches_new_account(stack: Stack) -> None:
    """`mailrouter transfer` (CLI, same store), then the customer answers to sales@: the
    reply is in support's INBOX, and the notice left through Postfix with helo_name."""
    assert stack.send(FIRST) == {}
    stack.wait_inbox("sales@example.test", 1)
    out = stack.mailrouter.cli("transfer", "1", "--to", "support", "--by", "bob")
    assert "support" in out

    # The notice: mailrouter → Postfix (port 25 in the doc) → relayhost (the capture).
    wait_for(lambda: len(stack.smarthost.messages) == 1, f"the notice\n{stack.diagnostics()}")
    notice = stack.smarthost.messages[0]
    assert notice.rcpt_tos == ("dana@customer.test",)
    assert b"In-Reply-To: <hinge-1@customer.test>" in headers_of(notice.content)
    # outbound.helo_name, not the machine's name, is what Postfix saw in EHLO.
    assert b"Received: from mailrouter.example.test (" in notice.content

    assert stack.send(REPLY) == {}  # to the OLD address
    [routed] = stack.wait_inbox("support@example.test", 1)
    head = headers_of(routed)
    assert b"Message-ID: <hinge-2@customer.test>" in head
    assert b"X-Mailrouter-Routed-From: sales@example.test" in head
    assert b"\nTo: sales@example.test" in head  # original address headers untouched
    assert len(stack.inbox("sales@example.test")) == 1  # nothing new at sales


def test_unknown_address_is_refused_at_rcpt_and_probes_store_nothing(stack: Stack) -> None:
    """Postfix probes mailrouter (no DATA) and refuses the customer's RCPT with 550 5.1.1;
    the probes — for the unknown address and for a real one — leave the store empty."""
    with smtplib.SMTP(HOST, stack.postfix.port, timeout=30, source_address=(CUSTOMER_IP, 0)) as c:
        c.ehlo("mx.customer.test")
        assert c.mail("dana@customer.test")[0] == 250
        code, text = c.rcpt("nobody@example.test")
        assert (code, text[:5]) == (550, b"5.1.1"), (code, text, stack.diagnostics())
        assert b"not a mailrouter account" in text  # mailrouter's own words
        code, text = c.rcpt("sales@example.test")  # a real account: probed, accepted
        assert code == 250, (code, text, stack.diagnostics())
        code, text = c.rcpt("someone@elsewhere.test")  # not ours: no relay for strangers
        assert code == 454 and b"Relay access denied" in text, (code, text)
        c.rset()
    # The unknown address a second time: still refused (no negative cache needed).
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        stack.send(FIRST, "nobody@example.test")
    assert refused.value.recipients["nobody@example.test"][0] == 550

    lines = stack.postfix.mailrouter_lines()
    assert any("to=<nobody@example.test>" in x and "status=undeliverable" in x for x in lines)
    assert any("to=<sales@example.test>" in x and "status=deliverable" in x for x in lines)
    assert "event=reject" in stack.mailrouter.log()  # the probe reached mailrouter
    assert stack.store_counts() == {"messages": 0, "transfers": 0, "outbox": 0}
    assert stack.inbox("sales@example.test") == []
    assert stack.postfix.queue_ids() == []  # nothing queued
    assert stack.smarthost.messages == []  # nothing bounced

    # From Postfix's own networks nothing is probed: accepted, then bounced with 5.1.1.
    assert stack.send(FIRST, "nobody@example.test", source=HOST) == {}
    wait_for(lambda: len(stack.smarthost.messages) == 1, f"a bounce\n{stack.diagnostics()}")
    bounce = stack.smarthost.messages[0]
    assert bounce.mail_from == "<>" and bounce.rcpt_tos == ("dana@customer.test",)
    assert b"Status: 5.1.1" in bounce.content
    assert b"not a mailrouter account" in bounce.content
    assert stack.store_counts()["messages"] == 0


def test_two_accounts_postfix_logs_sent_twice_mailrouter_stores_once(stack: Stack) -> None:
    """To sales@, Cc support@: Postfix logs `status=sent` for both recipients; mailrouter
    keeps one message and the owner's mailbox (sales, first in To) gets one copy."""
    raw = FIRST.replace(
        b"To: sales@example.test\r\n", b"To: sales@example.test\r\nCc: support@example.test\r\n"
    )
    assert stack.send(raw, "sales@example.test", "support@example.test") == {}
    stack.wait_inbox("sales@example.test", 1)

    def sent_to() -> set[str]:
        return {
            m.group(1)
            for line in stack.postfix.mailrouter_lines()
            if "status=sent" in line and (m := re.search(r"to=<([^>]+)>", line))
        }

    wait_for(lambda: len(sent_to()) == 2, f"two sent lines\n{stack.postfix.log()}")
    assert sent_to() == {"sales@example.test", "support@example.test"}
    sent = [line for line in stack.postfix.mailrouter_lines() if "status=sent" in line]
    assert len({line.split(": ")[1] for line in sent}) == 1  # one queue id: one hand-off
    assert all("(250 2.0.0 OK deliver interaction=1)" in line for line in sent)
    assert stack.inbox("support@example.test") == []
    assert stack.store_counts()["messages"] == 1
    log = stack.mailrouter.log()
    assert log.count("event=decision") == 1 and "owner=sales@example.test" in log


def test_mailrouter_down_mail_waits_in_postfix_queue_then_arrives_once(stack: Stack) -> None:
    """mailrouter stopped: Postfix accepts (the address was verified before), defers, and
    `postqueue -p` shows it; after mailrouter is back, `postqueue -f` delivers it once."""
    assert stack.send(FIRST) == {}  # verifies sales@ while mailrouter is up
    stack.wait_inbox("sales@example.test", 1)
    stack.mailrouter.stop()

    assert stack.send(REPLY) == {}
    wait_for(
        lambda: "Connection refused" in stack.postfix.postqueue("-p"),
        f"deferred in Postfix's queue\n{stack.diagnostics()}",
    )
    [queue_id] = stack.postfix.queue_ids()
    assert "sales@example.test" in stack.postfix.postqueue("-p")
    # A recipient Postfix has not verified yet cannot be checked now: 450, the sender retries.
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        stack.send(FIRST, "support@example.test")
    assert refused.value.recipients["support@example.test"][0] == 450

    stack.mailrouter.start()
    stack.postfix.postqueue("-f")
    messages = stack.wait_inbox("sales@example.test", 2)
    assert sum(b"Message-ID: <hinge-2@customer.test>" in m for m in messages) == 1
    wait_for(lambda: stack.postfix.queue_ids() == [], f"queue empty\n{stack.diagnostics()}")
    sent = [
        line
        for line in stack.postfix.mailrouter_lines()
        if f"{queue_id}:" in line and "status=sent" in line
    ]
    assert len(sent) == 1, stack.postfix.log()
    assert stack.store_counts()["messages"] == 2


@pytest.mark.parametrize("stack", ["lmtp"], indirect=True)  # Postfix's edge: no hand-off
def test_oversized_mail_is_refused_by_postfix_with_552(stack: Stack) -> None:
    """A customer announcing a message above the doc's message_size_limit gets 552 5.3.4
    from Postfix at MAIL FROM: refused at the edge, never queued, never bounced."""
    limit = int(postfix_params(doc_block(MAIN_CF))["message_size_limit"])
    with smtplib.SMTP(HOST, stack.postfix.port, timeout=30, source_address=(CUSTOMER_IP, 0)) as c:
        c.ehlo("mx.customer.test")
        assert int(c.esmtp_features["size"]) == limit
        code, text = c.mail("dana@customer.test", [f"SIZE={limit + 1}"])
    assert (code, text[:5]) == (552, b"5.3.4"), (code, text)
    assert stack.postfix.queue_ids() == []
