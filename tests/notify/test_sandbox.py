"""The template sandbox and its bounds: escapes refused, every render bounded in time,
output and memory, and check-config never hangs (reliability issue, item 12)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mailrouter.config import AccountSettings, NotifySettings, Settings, TransferSettings
from mailrouter.notify import RenderLimits, TemplateError, check_templates, render_notice

VARIABLES: dict[str, object] = {
    "fromAccount": "sales@example.test",
    "toAccount": "support@example.test",
    "customer_name": "Zoë",
    "subject": "Order 7",
    "interaction_id": 42,
}
# Small bounds keep the suite quick; the defaults are 5 s and 100,000 characters.
QUICK = RenderLimits(timeout=1.0, max_output=10_000, memory_mb=64)
NESTED_LOOP = "{% set r = range(10000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}"


def render(tmp_path: Path, text: str, limits: RenderLimits = QUICK, **files: str) -> str:
    (tmp_path / "n.txt.j2").write_text(text, "utf-8")
    for name, body in files.items():
        (tmp_path / name.replace("_", ".")).write_text(body, "utf-8")
    return render_notice(tmp_path, "n", VARIABLES, limits).text


def refused(tmp_path: Path, text: str, match: str, limits: RenderLimits = QUICK) -> TemplateError:
    with pytest.raises(TemplateError, match=match) as info:
        render(tmp_path, text, limits)
    return info.value


# --------------------------------------------------------------------------- escapes


@pytest.mark.parametrize(
    "expression",
    [
        "''.__class__.__mro__",
        "''.__class__.__mro__[1].__subclasses__()",
        "cycler.__init__.__globals__",
        "lipsum.__globals__",
        "joiner.__init__.__globals__.os",
        "namespace.__init__.__globals__",
        "self._TemplateReference__context",
        "range.__self__",
        "toAccount.__class__.__base__",
        "'{0.__class__}'.format(toAccount)",
    ],
)
def test_access_to_internals_is_refused(tmp_path: Path, expression: str) -> None:
    """Dunder attributes and private names are refused: a sandbox error, not a value."""
    error = refused(tmp_path, f"{{{{ {expression} }}}}\n", "not allowed in the sandbox")
    assert error.file == str(tmp_path / "n.txt.j2")


def test_changing_a_list_is_refused(tmp_path: Path) -> None:
    """The sandbox is immutable: a template cannot grow a list with append."""
    refused(tmp_path, "{% set x = [] %}{{ x.append(1) }}\n", "not allowed in the sandbox")


def test_huge_range_is_refused(tmp_path: Path) -> None:
    """range() of more than 10,000 items is a sandbox error."""
    refused(tmp_path, "{% for i in range(10**6) %}{% endfor %}\n", "range of 1000000 items")


def test_string_multiplication_to_gigabytes_is_refused(tmp_path: Path) -> None:
    """'x' * 10**9 is refused before it is computed."""
    started = time.monotonic()
    refused(tmp_path, "{{ 'x' * 10**9 }}\n", r"str of 1000000000 items is too large")
    refused(tmp_path, "{{ [1, 2] * 10**9 }}\n", r"list of 2000000000 items is too large")
    assert time.monotonic() - started < 5


def test_huge_power_is_refused(tmp_path: Path) -> None:
    """10 ** (10 ** 9) would take minutes to compute: refused (Jinja's ** groups left)."""
    refused(tmp_path, "{{ 10 ** (10 ** 9) }}\n", "too large to compute")


def test_deep_recursion_is_refused(tmp_path: Path) -> None:
    """A macro that calls itself forever ends with an error, not a crash."""
    refused(
        tmp_path,
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}\n",
        "recursion too deep|more than 100000 calls",
    )


def test_self_include_is_refused(tmp_path: Path) -> None:
    """A template including itself recurses without a call: stopped too."""
    refused(tmp_path, "{% include 'n.txt.j2' %}\n", "recursion too deep|render process died")


@pytest.mark.parametrize("tag", ["include", "import", "extends", "from"])
def test_files_outside_the_template_directory_are_refused(tmp_path: Path, tag: str) -> None:
    """include / import / extends cannot reach a file outside the template directory."""
    outside = tmp_path / "secret.j2"
    outside.write_text("SECRET\n", "utf-8")
    inner = tmp_path / "templates"
    inner.mkdir()
    statement = {
        "include": "{% include NAME %}",
        "import": "{% import NAME as m %}",
        "extends": "{% extends NAME %}",
        "from": "{% from NAME import x %}",
    }[tag]
    for name in ("'../secret.j2'", f"'{outside}'"):
        with pytest.raises(TemplateError, match="template not found"):
            render(inner, statement.replace("NAME", name) + "\n")
    # A symlink inside the directory that points outside it is refused too.
    os.symlink(outside, inner / "link.j2")
    with pytest.raises(TemplateError, match="outside the template directory") as info:
        render(inner, statement.replace("NAME", "'link.j2'") + "\n")
    assert "SECRET" not in str(info.value)


def test_includes_inside_the_template_directory_still_work(tmp_path: Path) -> None:
    """The confinement does not get in the way of ordinary includes."""
    assert render(tmp_path, "{% include 'footer.j2' %}", footer_j2="bye\n") == "bye\n"


# --------------------------------------------------------------------------- bounds


def test_a_render_is_bounded_in_time(tmp_path: Path) -> None:
    """A nested loop that calls nothing (10^8 steps) is killed at the time limit."""
    started = time.monotonic()
    error = refused(tmp_path, NESTED_LOOP + "\n", r"rendering took longer than 1 s \(stopped\)")
    assert time.monotonic() - started < 4
    assert error.file == str(tmp_path / "n.txt.j2")


def test_a_render_is_bounded_in_output_size(tmp_path: Path) -> None:
    """Output is counted while it streams: a 100 MB loop stops at the limit."""
    text = "{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}\n"
    refused(tmp_path, text, r"output larger than 10000 characters \(stopped\)")


def test_output_limit_counts_all_parts_together(tmp_path: Path) -> None:
    """Subject, text and HTML share one budget."""
    (tmp_path / "n.html.j2").write_text("{{ 'y' * 6000 }}", "utf-8")
    with pytest.raises(TemplateError, match=r"n\.html\.j2: output larger than 10000"):
        render(tmp_path, "{{ 'x' * 6000 }}")


def test_a_render_is_bounded_in_memory(tmp_path: Path) -> None:
    """A filter building a gigabyte in C fails on the memory limit, not on the host."""
    error = refused(
        tmp_path, "{{ ('x' | center(10**9)) | length }}\n", "MiB of memory|render process died"
    )
    assert error.file == str(tmp_path / "n.txt.j2")


def test_the_part_that_runs_too_long_is_named(tmp_path: Path) -> None:
    """A subject template that loops forever is named in the error, not the text part."""
    (tmp_path / "n.subject.j2").write_text(NESTED_LOOP, "utf-8")
    with pytest.raises(TemplateError, match=r"n\.subject\.j2: rendering took longer"):
        render(tmp_path, "fine\n")


def test_render_limits_follow_the_notify_settings() -> None:
    """[notify] render_timeout, max_render_size and render_memory_mb are the bounds."""
    notify = NotifySettings(render_timeout=2.5, max_render_size=1234, render_memory_mb=99)
    limits = RenderLimits.of(notify)
    assert (limits.timeout, limits.max_output, limits.memory_mb) == (2.5, 1234, 99)


# --------------------------------------------------------------------------- check-config


def settings_for(template_dir: Path, timeout: float = 1.0) -> Settings:
    sales = AccountSettings(
        "sales", "sales@example.test", transfer=TransferSettings(True, True, "n")
    )
    return Settings(
        config_path=template_dir / "mailrouter.toml",
        state_dir=template_dir,
        database_url="sqlite://",
        auto_upgrade=False,
        accounts=(sales, AccountSettings("support", "support@example.test")),
        template_dir=template_dir,
        notify=NotifySettings(render_timeout=timeout),
    )


def test_check_templates_does_not_hang_on_a_nested_loop(tmp_path: Path) -> None:
    """check-config reports a template that never ends instead of hanging on it."""
    (tmp_path / "n.txt.j2").write_text(NESTED_LOOP, "utf-8")
    started = time.monotonic()
    [problem] = check_templates(settings_for(tmp_path))
    assert time.monotonic() - started < 4
    assert problem == (
        f"accounts.sales.transfer.template: {tmp_path / 'n.txt.j2'}: "
        "rendering took longer than 1 s (stopped)"
    )


def test_check_templates_refuses_a_template_making_100_mb(tmp_path: Path) -> None:
    """A template whose output is far past the limit does not pass check-config."""
    (tmp_path / "n.txt.j2").write_text(
        "{% for i in range(10000) %}{{ 'x' * 10000 }}{% endfor %}", "utf-8"
    )
    [problem] = check_templates(settings_for(tmp_path, timeout=5.0))
    assert "output larger than 100000 characters" in problem


def test_check_templates_refuses_sandbox_escapes(tmp_path: Path) -> None:
    """__mro__ / __globals__ and outside includes are caught at config check."""
    for text in ("{{ ''.__class__.__mro__ }}", "{{ lipsum.__globals__ }}", "{% include '../x' %}"):
        (tmp_path / "n.txt.j2").write_text(text, "utf-8")
        [problem] = check_templates(settings_for(tmp_path))
        assert problem.startswith("accounts.sales.transfer.template: ")
        assert "not allowed in the sandbox" in problem or "template not found" in problem


def test_a_render_process_that_cannot_start_is_a_template_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No process to render in (fork refused): a template error, not a crash."""
    from multiprocessing.process import BaseProcess

    def refuse(self: BaseProcess) -> None:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(BaseProcess, "start", refuse)
    refused(tmp_path, "hi\n", "cannot start the render process: .*Resource temporarily")


def test_a_render_still_runs_where_setrlimit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A seccomp filter refusing setrlimit (our hardened unit's ~@resources) must not make
    every notice fail: the child's own limits are skipped and named, the render goes on."""
    import resource
    import signal

    from mailrouter.notify import templates

    def refuse(which: int, limits: tuple[int, int]) -> None:
        raise PermissionError(1, "Operation not permitted")

    alarms: list[int] = []
    monkeypatch.setattr(resource, "setrlimit", refuse)
    monkeypatch.setattr(signal, "alarm", alarms.append)
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    assert set(templates._limit_self(QUICK)) <= {"cpu", "memory"}
    assert "cpu" in templates._limit_self(QUICK)
    assert alarms  # the wall-clock alarm is still set
