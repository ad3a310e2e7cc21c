"""Render the transfer notice templates: Jinja2 files in a sandbox, undefined names are errors.

A notice ``NAME`` is up to three files in the template directory: ``NAME.txt.j2`` (the plain
text body, required), ``NAME.subject.j2`` and ``NAME.html.j2`` (both optional).  Templates
are written by operators, but they see customer-controlled text (names, subjects), so they
run in Jinja's sandbox and only the HTML part is autoescaped.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.exceptions import SecurityError, TemplateNotFound, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from mailrouter.config import AccountSettings, Settings
from mailrouter.parse import ParsedMessage, parse, strip_reply_prefixes

__all__ = [
    "RenderedNotice",
    "TemplateError",
    "check_templates",
    "notice_variables",
    "one_line",
    "render_notice",
    "reply_subject",
    "sample_customer",
]

# Same shape as account names in the config: no path separators, no leading dot, so a
# template name can never reach outside the template directory.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TemplateError(Exception):
    """A template that cannot be loaded or rendered: ``file[:line]: problem``."""

    def __init__(self, file: str, problem: str, line: int | None = None) -> None:
        self.file, self.problem, self.line = file, problem, line
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class RenderedNotice:
    """The rendered parts of a notice; ``subject`` and ``html`` are None without their file."""

    subject: str | None
    text: str
    html: str | None


def _finalize(value: object) -> object:
    # A variable that is *defined* but None (``agent`` when a script transferred) prints as
    # nothing rather than the word "None"; ``{% if agent %}`` still sees it as false.
    # Undefined names are unaffected: StrictUndefined raises before they get here.
    return "" if value is None else value


def _autoescape(template_name: str | None) -> bool:
    # Escaping belongs to the HTML part only: escaping the text part or the subject would
    # show customers "&lt;" and "&amp;" literally.
    return template_name is not None and template_name.endswith(".html.j2")


def _environment(template_dir: Path) -> SandboxedEnvironment:
    return SandboxedEnvironment(
        loader=FileSystemLoader(str(template_dir)),
        undefined=StrictUndefined,
        autoescape=_autoescape,
        keep_trailing_newline=True,
        # Block tags on their own line leave no blank line or indentation behind; this is
        # what people writing plain-text mail expect.
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_finalize,
        auto_reload=False,
    )


def one_line(text: str) -> str:
    """Collapse all whitespace, CR and LF included, into single spaces (header injection guard).

    Parsing and the templates already give one-line values; this is defence in depth, so
    that a CR or LF reaching a header never starts a new field.
    """
    return " ".join(text.split())


def _error_line(exc: BaseException, template_dir: Path, fallback: Path) -> tuple[str, int | None]:
    """The template file and line a render error happened at, from Jinja's rewritten traceback."""
    root = template_dir.resolve()
    found: tuple[str, int | None] = (str(fallback), None)
    for frame in traceback.extract_tb(exc.__traceback__):
        # Jinja rewrites the traceback so template code shows as frames of the .j2 file;
        # the innermost such frame is where the problem is (it may be an included file).
        if frame.filename.endswith(".j2") and Path(frame.filename).resolve().is_relative_to(root):
            found = (frame.filename, frame.lineno)
    return found


def _render_file(
    env: SandboxedEnvironment, template_dir: Path, filename: str, variables: Mapping[str, object]
) -> str:
    path = template_dir / filename
    try:
        return env.get_template(filename).render(dict(variables))
    except TemplateSyntaxError as exc:
        file = exc.filename or str(path)
        raise TemplateError(file, f"syntax error: {exc.message}", exc.lineno) from exc
    except TemplateNotFound as exc:
        # Only reached through {% include %} / {% extends %}: the file itself was checked.
        file, line = _error_line(exc, template_dir, path)
        raise TemplateError(file, f"template not found: {exc.name}", line) from exc
    except SecurityError as exc:
        file, line = _error_line(exc, template_dir, path)
        raise TemplateError(file, f"not allowed in the sandbox: {exc}", line) from exc
    except UndefinedError as exc:
        file, line = _error_line(exc, template_dir, path)
        raise TemplateError(file, f"undefined variable: {exc}", line) from exc
    except UnicodeDecodeError as exc:
        raise TemplateError(str(path), f"not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise TemplateError(str(path), f"cannot read: {exc.strerror or exc}") from exc
    except Exception as exc:
        # Anything else a template expression can raise ({{ 1 / 0 }}, a bad filter
        # argument): still the template's fault, so report it as such rather than crash
        # the stage that renders it.
        file, line = _error_line(exc, template_dir, path)
        raise TemplateError(file, f"{type(exc).__name__}: {exc}", line) from exc


def render_notice(template_dir: Path, name: str, variables: Mapping[str, object]) -> RenderedNotice:
    """Render notice ``name`` from ``template_dir``; raises :class:`TemplateError`."""
    if not _NAME_RE.match(name):
        raise TemplateError(
            str(template_dir / name), "template names use letters, digits, '.', '_' and '-'"
        )
    text_file = f"{name}.txt.j2"
    if not (template_dir / text_file).is_file():
        raise TemplateError(str(template_dir / text_file), "missing (the plain-text body)")
    env = _environment(template_dir)
    text = _render_file(env, template_dir, text_file, variables)

    subject = None
    if (template_dir / f"{name}.subject.j2").is_file():
        # A blank subject is treated as "no subject template" so the notice still gets the
        # threading-friendly default instead of an empty Subject.
        line = one_line(_render_file(env, template_dir, f"{name}.subject.j2", variables))
        subject = line or None

    html = None
    if (template_dir / f"{name}.html.j2").is_file():
        html = _render_file(env, template_dir, f"{name}.html.j2", variables)
    return RenderedNotice(subject=subject, text=text, html=html)


def reply_subject(subject: str) -> str:
    """``Re: `` + the subject without its reply prefixes, on one line: never ``Re: Re:``."""
    return one_line(f"Re: {strip_reply_prefixes(one_line(subject))}")


def _account_name(account: AccountSettings) -> str:
    return account.display_name or account.name


def notice_variables(
    *,
    from_account: AccountSettings,
    to_account: AccountSettings,
    interaction_id: int,
    customer: ParsedMessage,
    agent: str | None,
    transferred_at: datetime,
) -> dict[str, object]:
    """The variables a notice template sees (each one is documented in docs/templates.md)."""
    if transferred_at.tzinfo is None:
        # The daemon works in UTC; a naive time is taken to be UTC, not the host's zone.
        transferred_at = transferred_at.replace(tzinfo=UTC)
    return {
        "fromAccount": from_account.address,
        "toAccount": to_account.address,
        "fromAccountName": _account_name(from_account),
        "toAccountName": _account_name(to_account),
        "interaction_id": interaction_id,
        "customer_name": customer.from_name,
        "customer_address": customer.reply_to_email or customer.from_email,
        "subject": customer.subject,
        "base_subject": strip_reply_prefixes(customer.subject),
        "reply_subject": reply_subject(customer.subject),
        "agent": agent,
        "transferred_at": transferred_at.astimezone(UTC).isoformat(timespec="seconds"),
    }


# A customer message for trial renders: non-ASCII name and subject, so a template that
# only works for ASCII shows up in check-config rather than on the first real transfer.
_SAMPLE_CUSTOMER = (
    b"From: =?utf-8?q?Zo=C3=AB_Sample?= <zoe.sample@customer.invalid>\r\n"
    b"To: account@example.invalid\r\n"
    b"Subject: =?utf-8?q?Re:_Order_7_=E2=80=93_delivery?=\r\n"
    b"Message-ID: <sample.1@customer.invalid>\r\n"
    b"Date: Mon, 01 Jan 2024 09:00:00 +0000\r\n"
    b"\r\n"
    b"Where is my order?\r\n"
)


def sample_customer() -> ParsedMessage:
    """The sample customer message trial renders use (``check-config``, the desk's preview)."""
    return parse(_SAMPLE_CUSTOMER)


def check_templates(settings: Settings) -> list[str]:
    """Problems with the notice template of every account that notifies (empty = fine).

    Each template is loaded and trial-rendered with sample variables, so a typo such as
    ``{{ toAcount }}`` is reported by ``check-config`` and at start-up, not at the first
    transfer.
    """
    problems: list[str] = []
    customer = sample_customer()
    for account in settings.accounts:
        if not account.transfer.notify:
            continue
        key = f"accounts.{account.name}.transfer.template"
        if not account.transfer.template:
            problems.append(f"{key}: notify = true needs a template name")
            continue
        # Any other account stands in as the destination; with a single account the notice
        # would never be sent, but the template can still be checked against itself.
        others = [a for a in settings.accounts if a is not account]
        variables = notice_variables(
            from_account=account,
            to_account=others[0] if others else account,
            interaction_id=1,
            customer=customer,
            agent="sample.agent",
            transferred_at=datetime(2024, 1, 1, 9, 30, tzinfo=UTC),
        )
        try:
            rendered = render_notice(settings.template_dir, account.transfer.template, variables)
        except TemplateError as exc:
            problems.append(f"{key}: {exc}")
            continue
        if not rendered.text.strip():
            file = settings.template_dir / f"{account.transfer.template}.txt.j2"
            problems.append(f"{key}: {file}: renders an empty body")
    return problems
