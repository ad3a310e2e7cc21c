"""Render the transfer notice templates: Jinja2 files in a bounded sandbox, undefined names
are errors.

A notice ``NAME`` is up to three files in the template directory: ``NAME.txt.j2`` (the plain
text body, required), ``NAME.subject.j2`` and ``NAME.html.j2`` (both optional).  Templates
are written by operators, but they see customer-controlled text (names, subjects), so they
run in Jinja's sandbox and only the HTML part is autoescaped.

A render is bounded twice.  Inside, the sandbox refuses what it can see coming: a huge
``range``, a string or list multiplied past the output limit, a huge power, too many calls
(deep recursion), files outside the template directory, and output past the limit (counted
while it streams).  Outside, every render runs in a child process (forked from a
forkserver, so a few milliseconds) that is killed at the time limit and may grow by only so
much memory: a nested loop that calls nothing, or a filter that builds a gigabyte in C,
cannot be interrupted from inside, but a process can always be killed.  A thread could not:
an abandoned thread keeps its CPU and memory until it finishes, and a loop of 10^10 steps
never does.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import resource
import signal
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.environment import Environment
from jinja2.exceptions import SecurityError, TemplateNotFound, TemplateSyntaxError, UndefinedError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mailrouter.config import AccountSettings, NotifySettings, Settings
from mailrouter.parse import ParsedMessage, parse, strip_reply_prefixes

__all__ = [
    "RenderLimits",
    "RenderedNotice",
    "TemplateError",
    "cap",
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

    def __reduce__(self) -> tuple[Any, ...]:
        # It crosses from the render process; the default would call __init__ with one arg.
        return (TemplateError, (self.file, self.problem, self.line))


@dataclass(frozen=True)
class RenderLimits:
    """The bounds of one render (all parts together); see the module docstring."""

    timeout: float = 5.0  # seconds of wall-clock time, then the process is killed
    max_output: int = 100_000  # characters produced, subject + text + HTML
    memory_mb: int = 256  # how much the render process may grow
    max_calls: int = 100_000  # function, method, filter-free calls the template makes
    max_range: int = 10_000  # items one range() may have
    max_power_bits: int = 4096  # the largest integer ``**`` may make

    @classmethod
    def of(cls, notify: NotifySettings) -> RenderLimits:
        return cls(
            timeout=notify.render_timeout,
            max_output=notify.max_render_size,
            memory_mb=notify.render_memory_mb,
        )


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


class _ConfinedLoader(FileSystemLoader):
    """A FileSystemLoader that refuses any file resolving outside its directory.

    Jinja already refuses ``..`` in names; this also covers a symlink in the directory
    that points elsewhere (``{% include 'passwd.j2' %}`` → /etc/passwd).
    """

    def __init__(self, root: Path) -> None:
        super().__init__(str(root))
        self.root = root.resolve()

    def get_source(
        self, environment: Environment, template: str
    ) -> tuple[str, str, Callable[[], bool]]:
        source, filename, uptodate = super().get_source(environment, template)
        if not Path(filename).resolve().is_relative_to(self.root):
            raise SecurityError(f"{template!r} is outside the template directory {self.root}")
        return source, filename, uptodate


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, plus limits on what a template can make it compute.

    The sandbox sees every call and the intercepted operators, so it can refuse a huge
    ``range``, ``'x' * 10**9``, ``10 ** 10**9`` and a call count that only a runaway loop
    or recursion reaches, each with a clear error.  What it cannot see (a loop that calls
    nothing, a filter's own work) is left to the render process's time and memory limits.
    """

    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self, limits: RenderLimits, **options: Any) -> None:
        super().__init__(**options)
        self.limits = limits
        self.calls = 0
        self.globals["range"] = self._range

    def _range(self, *args: int) -> range:
        rng = range(*args)
        if len(rng) > self.limits.max_range:
            raise SecurityError(
                f"range of {len(rng)} items is too large (limit {self.limits.max_range})"
            )
        return rng

    def call(
        __self,  # Jinja's own spelling: no keyword argument of the call can clash
        __context: Context,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        __self.calls += 1
        if __self.calls > __self.limits.max_calls:
            raise SecurityError(
                f"more than {__self.limits.max_calls} calls in one render "
                "(a runaway loop or recursion)"
            )
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        limit = self.limits.max_output
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(n, int)
                    and len(seq) * n > limit
                ):
                    raise SecurityError(
                        f"{type(seq).__name__} of {len(seq) * n} items is too large (limit {limit})"
                    )
        if (
            operator == "**"
            and isinstance(left, int)
            and isinstance(right, int)
            and abs(left) > 1
            and right * math.log2(abs(left)) > self.limits.max_power_bits
        ):
            raise SecurityError(f"{left} ** {right} is too large to compute")
        result = super().call_binop(context, operator, left, right)
        if isinstance(result, str | list | tuple) and len(result) > limit:
            raise SecurityError(f"{type(result).__name__} of {len(result)} items is too large")
        return result


def _environment(template_dir: Path, limits: RenderLimits) -> _BoundedSandbox:
    return _BoundedSandbox(
        limits,
        loader=_ConfinedLoader(template_dir),
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


# C0, DEL and C1 controls: never wanted in a header or a one-line value (a NUL from a
# customer's Subject reached the notice's header).  Whitespace among them becomes a space.
_CONTROLS_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(text: str) -> str:
    """Collapse all whitespace, CR and LF included, into single spaces and drop the other
    control characters (header injection guard).

    Parsing and the templates already give one-line values; this is defence in depth, so
    that a CR or LF reaching a header never starts a new field, and a NUL or an ESC never
    reaches one.
    """
    text = _CONTROLS_RE.sub(lambda m: " " if m.group().isspace() else "", text)
    return " ".join(text.split())


def cap(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, marked with an ellipsis when cut."""
    if len(text) <= limit:
        return text
    return text[: max(limit - 1, 0)].rstrip() + "…"


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


class _Budget:
    """Characters a render may still produce, shared by its parts."""

    def __init__(self, limit: int) -> None:
        self.limit = self.left = limit


def _render_file(
    env: _BoundedSandbox,
    template_dir: Path,
    filename: str,
    variables: Mapping[str, object],
    budget: _Budget,
) -> str:
    path = template_dir / filename
    try:
        # Streamed, so output past the limit stops the render there instead of after a
        # loop has built all of it.
        chunks: list[str] = []
        for chunk in env.get_template(filename).generate(dict(variables)):
            budget.left -= len(chunk)
            if budget.left < 0:
                raise TemplateError(
                    str(path), f"output larger than {budget.limit} characters (stopped)"
                )
            chunks.append(chunk)
        return "".join(chunks)
    except TemplateError:
        raise
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
    except RecursionError as exc:
        file, line = _error_line(exc, template_dir, path)
        raise TemplateError(file, "recursion too deep (stopped)", line) from exc
    except MemoryError as exc:
        file, line = _error_line(exc, template_dir, path)
        raise TemplateError(
            file, f"needs more than {env.limits.memory_mb} MiB of memory (stopped)", line
        ) from exc
    except Exception as exc:
        # Anything else a template expression can raise ({{ 1 / 0 }}, a bad filter
        # argument): still the template's fault, so report it as such rather than crash
        # the stage that renders it.
        file, line = _error_line(exc, template_dir, path)
        raise TemplateError(file, f"{type(exc).__name__}: {exc}", line) from exc


def _render_here(
    template_dir: Path,
    name: str,
    variables: Mapping[str, object],
    limits: RenderLimits,
    starting: Callable[[str], None] = lambda file: None,
) -> RenderedNotice:
    """The render itself, in this process (the render process calls it)."""
    text_file = f"{name}.txt.j2"
    env = _environment(template_dir, limits)
    budget = _Budget(limits.max_output)
    starting(str(template_dir / text_file))
    text = _render_file(env, template_dir, text_file, variables, budget)

    subject = None
    if (template_dir / f"{name}.subject.j2").is_file():
        starting(str(template_dir / f"{name}.subject.j2"))
        # A blank subject is treated as "no subject template" so the notice still gets the
        # threading-friendly default instead of an empty Subject.
        line = one_line(_render_file(env, template_dir, f"{name}.subject.j2", variables, budget))
        subject = line or None

    html = None
    if (template_dir / f"{name}.html.j2").is_file():
        starting(str(template_dir / f"{name}.html.j2"))
        html = _render_file(env, template_dir, f"{name}.html.j2", variables, budget)
    return RenderedNotice(subject=subject, text=text, html=html)


# --------------------------------------------------------------------------- the render process


@cache
def _context() -> BaseContext:
    """The forkserver context, started on first use with this module preloaded.

    A forkserver is a small process started fresh (no threads, no open database), which
    forks one child per render: cheap, and safe in a daemon that runs threads (forking one
    directly is not).  Where there is no forkserver, spawn (slower, same guarantees).
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # "__main__" too: a child whose forkserver has not imported the main module
        # imports it itself, which made every render cost a few hundred milliseconds.
        ctx.set_forkserver_preload(["__main__", __name__])
        return ctx
    return multiprocessing.get_context("spawn")


def _vm_size() -> int | None:
    """This process's virtual memory size in bytes (Linux), or None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


def _limit_self(limits: RenderLimits) -> list[str]:
    """Bounds the render process sets on itself, so they hold even if its parent dies:
    CPU seconds (then SIGXCPU), a wall-clock alarm (SIGALRM) and how far it may grow.

    Returns the limits that could not be set.  A seccomp filter may refuse setrlimit
    (systemd's ``SystemCallFilter=~@resources`` with ``SystemCallErrorNumber=EPERM``):
    the render still runs, bounded by the parent's kill at the time limit and by the
    output limit, rather than every notice failing.
    """
    missing: list[str] = []
    seconds = math.ceil(limits.timeout) + 1
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(seconds + 1)
    wanted = [(resource.RLIMIT_CPU, "cpu", seconds, seconds + 1)]
    size = _vm_size()
    if size is not None:
        cap_bytes = size + limits.memory_mb * 1024 * 1024
        wanted.append((resource.RLIMIT_AS, "memory", cap_bytes, cap_bytes))
    for which, name, soft, hard in wanted:
        try:
            resource.setrlimit(which, (soft, hard))
        except (OSError, ValueError):
            missing.append(name)
    return missing


def _render_child(
    conn: Connection,
    template_dir: str,
    name: str,
    variables: dict[str, object],
    limits: RenderLimits,
) -> None:
    """The render process: set its own bounds, render, send the result or the error."""
    try:
        _limit_self(limits)
        result: tuple[Any, ...] = (
            "ok",
            _render_here(
                Path(template_dir),
                name,
                variables,
                limits,
                starting=lambda file: conn.send(("part", file)),
            ),
        )
    except TemplateError as exc:
        cause = exc.__cause__
        # The cause (SecurityError, UndefinedError …) goes along when it is plain enough
        # to cross the pipe; the message already says everything an operator needs.
        result = ("error", exc, cause if type(cause).__module__.startswith("jinja2") else None)
    except BaseException as exc:  # noqa: BLE001 - the parent reports it as the template's
        result = ("error", TemplateError(template_dir, f"{type(exc).__name__}: {exc}"), None)
    try:
        conn.send(result)
    finally:
        conn.close()


def _died(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


def _render_isolated(
    template_dir: Path, name: str, variables: Mapping[str, object], limits: RenderLimits
) -> RenderedNotice:
    """Render in a child process, killed at ``limits.timeout``; raises TemplateError."""
    current = str(template_dir / f"{name}.txt.j2")  # the part being rendered, for errors
    ctx = _context()
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(  # type: ignore[attr-defined]
        target=_render_child,
        args=(writer, str(template_dir), name, dict(variables), limits),
        name="mailrouter-render",
        daemon=True,
    )
    started = False
    try:
        try:
            proc.start()
            started = True
        except (OSError, RuntimeError) as exc:  # no fork, no forkserver socket, …
            raise TemplateError(current, f"cannot start the render process: {exc}") from exc
        finally:
            writer.close()
        deadline = time.monotonic() + limits.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not reader.poll(left):
                raise TemplateError(
                    current, f"rendering took longer than {limits.timeout:g} s (stopped)"
                )
            try:
                message = reader.recv()
            except EOFError:
                proc.join(1.0)
                raise TemplateError(
                    current,
                    f"the render process died ({_died(proc.exitcode)}): more than "
                    f"{limits.memory_mb} MiB or {limits.timeout:g} s?",
                ) from None
            match message:
                case ("part", str(file)):
                    current = file
                case ("ok", RenderedNotice() as rendered):
                    return rendered
                case ("error", TemplateError() as error, cause):
                    raise error from cause
                case _:
                    raise TemplateError(current, "unexpected answer from the render process")
    finally:
        reader.close()
        if started:
            if proc.is_alive():
                proc.kill()
            proc.join()
            proc.close()


def render_notice(
    template_dir: Path,
    name: str,
    variables: Mapping[str, object],
    limits: RenderLimits | None = None,
) -> RenderedNotice:
    """Render notice ``name`` from ``template_dir`` within ``limits``; raises
    :class:`TemplateError`."""
    if not _NAME_RE.match(name):
        raise TemplateError(
            str(template_dir / name), "template names use letters, digits, '.', '_' and '-'"
        )
    text_file = template_dir / f"{name}.txt.j2"
    if not text_file.is_file():
        raise TemplateError(str(text_file), "missing (the plain-text body)")
    return _render_isolated(template_dir, name, variables, limits or RenderLimits())


def reply_subject(subject: str, limit: int | None = None) -> str:
    """``Re: `` + the subject without its reply prefixes, on one line: never ``Re: Re:``.

    With ``limit``, the original subject is cut to that many characters first.
    """
    base = strip_reply_prefixes(one_line(subject))
    return one_line(f"Re: {cap(base, limit) if limit is not None else base}")


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
    to_address: str | None = None,
    max_subject: int = NotifySettings.max_subject_length,
) -> dict[str, object]:
    """The variables a notice template sees (each one is documented in docs/templates.md).

    ``to_address``: where the notice goes (notify/compose.py decides); without it, the
    customer's Reply-To, else From.  Customer text is one line, without control
    characters, and cut to ``max_subject`` characters: a 210 KB Subject must not make a
    210 KB notice.
    """
    if transferred_at.tzinfo is None:
        # The daemon works in UTC; a naive time is taken to be UTC, not the host's zone.
        transferred_at = transferred_at.replace(tzinfo=UTC)
    subject = cap(one_line(customer.subject), max_subject)
    return {
        "fromAccount": from_account.address,
        "toAccount": to_account.address,
        "fromAccountName": _account_name(from_account),
        "toAccountName": _account_name(to_account),
        "interaction_id": interaction_id,
        "customer_name": cap(one_line(customer.from_name), max_subject),
        "customer_address": one_line(to_address or customer.reply_to_email or customer.from_email),
        "subject": subject,
        "base_subject": strip_reply_prefixes(subject),
        "reply_subject": reply_subject(customer.subject, max_subject),
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

    Each template is loaded and trial-rendered with sample variables, within the same
    bounds as a real notice, so a typo such as ``{{ toAcount }}``, a sandbox escape or a
    render that never ends is reported by ``check-config`` and at start-up (and neither
    hangs), not at the first transfer.
    """
    problems: list[str] = []
    customer = sample_customer()
    limits = RenderLimits.of(settings.notify)
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
            rendered = render_notice(
                settings.template_dir, account.transfer.template, variables, limits
            )
        except TemplateError as exc:
            problems.append(f"{key}: {exc}")
            continue
        if not rendered.text.strip():
            file = settings.template_dir / f"{account.transfer.template}.txt.j2"
            problems.append(f"{key}: {file}: renders an empty body")
    return problems
