"""What the desk tests share: agents made with the real CLI, mail sent over SMTP, a signed-in
HTTP client, reads of the store through ``show --json``, and the screenshot folder.

Agents are made the way an operator makes them: ``mailrouter agent add … --json`` and
``mailrouter agent passwd NAME`` with the password on stdin, as subprocesses.
"""

from __future__ import annotations

import json
import re
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from email.utils import formataddr
from pathlib import Path
from typing import Any

import httpx
from served import Served, command

from helpers import run_cli, subprocess_env
from mailrouter.config import Settings

__all__ = [
    "PASSWORD",
    "SHOTS_COPY",
    "add_agent",
    "csrf_of",
    "interaction_id",
    "keep_shot",
    "mailrouter",
    "send_mail",
    "show",
    "signed_in_client",
]

PASSWORD = "correct horse battery"
# Screenshots are saved under the run's tmp dir and copied here for the lead's review.
SHOTS_COPY = Path("/tmp/desk-shots")
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def mailrouter(settings: Settings, *args: str, stdin: str | None = None) -> str:
    """``mailrouter -c CONFIG ARGS`` as a subprocess; its stdout (asserts exit 0)."""
    done = subprocess.run(
        [*command(), "-c", str(settings.config_path), *args],
        input=stdin,
        env=subprocess_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"mailrouter {' '.join(args)}: {done.stderr}"
    return done.stdout


def add_agent(
    settings: Settings, name: str, *accounts: str, admin: bool = False, password: str = PASSWORD
) -> dict[str, Any]:
    """An agent of ``accounts`` with a desk password, through the CLI."""
    args = ["agent", "add", name, "--json"]
    for account in accounts:
        args += ["--account", account]
    if admin:
        args.append("--admin")
    made: dict[str, Any] = json.loads(mailrouter(settings, *args))
    mailrouter(settings, "agent", "passwd", name, stdin=password + "\n")
    return made


def send_mail(
    settings: Settings,
    *,
    to: str,
    subject: str,
    msgid: str,
    sender: tuple[str, str] = ("Zoë Customer", "zoe@customer.test"),
    body: str = "Hello,\nwhere is my order?\n",
    in_reply_to: str | None = None,
) -> None:
    """One customer message over SMTP to the daemon (answered 250 after its commit)."""
    msg = EmailMessage()
    msg["From"] = formataddr(sender)
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = msgid
    if in_reply_to is not None:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    msg.set_content(body)
    with smtplib.SMTP("127.0.0.1", settings.smtp.port, timeout=30) as smtp:
        assert smtp.send_message(msg, sender[1], [to]) == {}


def _cli_json(settings: Settings, *args: str) -> Any:
    code, out, err = run_cli(settings, *args, "--json")  # in-process: no interpreter start
    assert code == 0, err
    return json.loads(out)


def show(settings: Settings, interaction_id: int) -> dict[str, Any]:
    """``mailrouter show ID --json``: the store's view, independent of the desk."""
    out: dict[str, Any] = _cli_json(settings, "show", str(interaction_id))
    return out


def interaction_id(settings: Settings, subject: str) -> int:
    """The one interaction with this subject (each test sends its own)."""
    rows = _cli_json(settings, "interactions")
    [found] = [int(r["id"]) for r in rows if r["subject"] == subject]
    return found


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found is not None, "the page has no form with a CSRF token"
    return found.group(1)


@contextmanager
def signed_in_client(served: Served, name: str, password: str = PASSWORD) -> Iterator[httpx.Client]:
    """An HTTP client (no browser) signed in to the desk as ``name``."""
    with served.client(follow_redirects=False) as client:
        form = client.get("/")
        data = {"csrf": csrf_of(form.text), "agent": name, "password": password}
        r = client.post("/", data=data)
        assert (r.status_code, r.headers.get("location")) == (303, "/accounts"), r.text
        yield client


def keep_shot(path: Path) -> None:
    """Copy a screenshot for the lead's review (the original stays in the tmp dir)."""
    SHOTS_COPY.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, SHOTS_COPY / path.name)
