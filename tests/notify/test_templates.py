"""Notice templates: the Jinja2 sandbox, StrictUndefined errors, escaping, the variables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from jinja2.exceptions import SecurityError

from mailrouter.config import AccountSettings, Settings, TransferSettings
from mailrouter.notify import (
    RenderedNotice,
    TemplateError,
    check_templates,
    notice_variables,
    render_notice,
    reply_subject,
)
from mailrouter.parse import parse

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_TEMPLATES = ROOT / "config" / "templates"
FIXTURES = ROOT / "fixtures" / "notify"

SALES = AccountSettings(
    "sales",
    "sales@example.test",
    "Sales Team",
    TransferSettings(enabled=True, notify=True, template="transfer_notice"),
)
SUPPORT = AccountSettings("support", "support@example.test")

VARIABLES: dict[str, object] = {
    "fromAccount": "sales@example.test",
    "toAccount": "support@example.test",
    "fromAccountName": "Sales Team",
    "toAccountName": "support",
    "interaction_id": 42,
    "customer_name": "Zoë Müller",
    "customer_address": "zoe@customer.example",
    "subject": "Re: Order 7",
    "base_subject": "Order 7",
    "reply_subject": "Re: Order 7",
    "agent": None,
    "transferred_at": "2024-03-12T10:30:00+00:00",
}


def write(directory: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def settings_for(template_dir: Path, *accounts: AccountSettings) -> Settings:
    return Settings(
        config_path=template_dir / "mailrouter.toml",
        state_dir=template_dir,
        database_url="sqlite://",
        auto_upgrade=False,
        accounts=accounts or (SALES, SUPPORT),
        template_dir=template_dir,
    )


# --------------------------------------------------------------------------- render_notice


def test_renders_subject_text_and_html_parts(tmp_path: Path) -> None:
    """All three files render with the variables."""
    write(
        tmp_path,
        {
            "n.subject.j2": "{{ reply_subject }}\n",
            "n.txt.j2": "From {{fromAccount}} to {{toAccount}}\n",
            "n.html.j2": "<p>{{ toAccount }}</p>\n",
        },
    )
    assert render_notice(tmp_path, "n", VARIABLES) == RenderedNotice(
        subject="Re: Order 7",
        text="From sales@example.test to support@example.test\n",
        html="<p>support@example.test</p>\n",
    )


def test_text_only_template_has_no_subject_or_html(tmp_path: Path) -> None:
    """Subject and HTML files are optional."""
    write(tmp_path, {"n.txt.j2": "hi\n"})
    assert render_notice(tmp_path, "n", VARIABLES) == RenderedNotice(None, "hi\n", None)


def test_trailing_newline_is_kept(tmp_path: Path) -> None:
    """keep_trailing_newline: the body ends the way the file does."""
    write(tmp_path, {"n.txt.j2": "a\n\n"})
    assert render_notice(tmp_path, "n", VARIABLES).text == "a\n\n"


def test_block_tags_leave_no_blank_lines(tmp_path: Path) -> None:
    """trim_blocks/lstrip_blocks: an {% if %} line does not show up in the mail."""
    write(tmp_path, {"n.txt.j2": "a\n  {% if agent %}\nby {{ agent }}\n  {% endif %}\nb\n"})
    assert render_notice(tmp_path, "n", VARIABLES).text == "a\nb\n"


def test_missing_text_template_raises_template_error(tmp_path: Path) -> None:
    """The plain-text body is required."""
    write(tmp_path, {"n.subject.j2": "x"})
    with pytest.raises(TemplateError, match=r"n\.txt\.j2: missing"):
        render_notice(tmp_path, "n", VARIABLES)


def test_undefined_variable_raises_template_error_naming_file_and_line(tmp_path: Path) -> None:
    """StrictUndefined: a typo is an error with file and line, not an empty string."""
    write(tmp_path, {"n.txt.j2": "Hello\n{{ toAcount }}\n"})
    with pytest.raises(TemplateError) as info:
        render_notice(tmp_path, "n", VARIABLES)
    assert info.value.file == str(tmp_path / "n.txt.j2")
    assert info.value.line == 2
    assert (
        str(info.value) == f"{tmp_path / 'n.txt.j2'}:2: undefined variable: 'toAcount' is undefined"
    )


def test_undefined_variable_in_html_part_names_html_file(tmp_path: Path) -> None:
    """The error names the file that failed, not just the notice."""
    write(tmp_path, {"n.txt.j2": "ok\n", "n.html.j2": "<p>{{ nope }}</p>"})
    with pytest.raises(TemplateError, match=r"n\.html\.j2:1: undefined variable"):
        render_notice(tmp_path, "n", VARIABLES)


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    """A template that does not compile is reported with its line."""
    write(tmp_path, {"n.txt.j2": "ok\n\n{% if %}\n"})
    with pytest.raises(TemplateError, match=r"n\.txt\.j2:3: syntax error") as info:
        render_notice(tmp_path, "n", VARIABLES)
    assert info.value.line == 3


def test_sandbox_blocks_attribute_access(tmp_path: Path) -> None:
    """{{ ''.__class__.__mro__ }} is refused: SecurityError, wrapped in TemplateError."""
    write(tmp_path, {"n.txt.j2": "{{ ''.__class__.__mro__ }}\n"})
    with pytest.raises(TemplateError, match="not allowed in the sandbox") as info:
        render_notice(tmp_path, "n", VARIABLES)
    assert isinstance(info.value.__cause__, SecurityError)
    assert info.value.file == str(tmp_path / "n.txt.j2")


def test_runtime_error_in_template_is_template_error(tmp_path: Path) -> None:
    """Any exception raised by template code is the template's fault, with its line."""
    write(tmp_path, {"n.txt.j2": "a\n{{ interaction_id / 0 }}\n"})
    with pytest.raises(TemplateError, match=r"n\.txt\.j2:2: ZeroDivisionError"):
        render_notice(tmp_path, "n", VARIABLES)


def test_error_in_included_template_names_included_file(tmp_path: Path) -> None:
    """With {% include %} the error points at the file that has the mistake."""
    write(tmp_path, {"n.txt.j2": "{% include 'footer.j2' %}\n", "footer.j2": "\n{{ nope }}\n"})
    with pytest.raises(TemplateError, match=r"footer\.j2:2: undefined variable"):
        render_notice(tmp_path, "n", VARIABLES)


def test_template_that_is_not_utf8_is_template_error(tmp_path: Path) -> None:
    """A Latin-1 file is reported with its name instead of crashing the transfer."""
    (tmp_path / "n.txt.j2").write_bytes("Grüße {{ toAccount }}\n".encode("latin-1"))
    with pytest.raises(TemplateError, match=r"n\.txt\.j2: not UTF-8 text"):
        render_notice(tmp_path, "n", VARIABLES)


def test_template_name_cannot_leave_template_directory(tmp_path: Path) -> None:
    """Path separators and leading dots are refused before anything is opened."""
    (tmp_path / "outside.txt.j2").write_text("secret", encoding="utf-8")
    inner = tmp_path / "templates"
    inner.mkdir()
    for name in ("../outside", "sub/n", ".hidden", ""):
        with pytest.raises(TemplateError, match="template names use"):
            render_notice(inner, name, VARIABLES)


def test_html_part_escapes_customer_name(tmp_path: Path) -> None:
    """Autoescape is on for .html.j2: customer text cannot inject markup."""
    write(
        tmp_path, {"n.txt.j2": "{{ customer_name }}\n", "n.html.j2": "<p>{{ customer_name }}</p>"}
    )
    variables = {**VARIABLES, "customer_name": "<script>alert(1)</script> & Co"}
    rendered = render_notice(tmp_path, "n", variables)
    assert rendered.html == "<p>&lt;script&gt;alert(1)&lt;/script&gt; &amp; Co</p>"
    assert "<script>" not in (rendered.html or "")


def test_text_part_and_subject_are_not_escaped(tmp_path: Path) -> None:
    """Plain text and the subject show characters as they are, not as HTML entities."""
    write(tmp_path, {"n.subject.j2": "{{ subject }}", "n.txt.j2": "{{ subject }}\n"})
    rendered = render_notice(tmp_path, "n", {**VARIABLES, "subject": "Fish & <Chips>"})
    assert rendered.subject == "Fish & <Chips>"
    assert rendered.text == "Fish & <Chips>\n"


def test_subject_is_collapsed_to_one_line(tmp_path: Path) -> None:
    """CR/LF in a rendered subject cannot start a new header line."""
    write(tmp_path, {"n.subject.j2": "\n  {{ subject }}\r\n  more\n", "n.txt.j2": "x"})
    rendered = render_notice(tmp_path, "n", {**VARIABLES, "subject": "Hi\r\nBcc: evil@x.example"})
    assert rendered.subject == "Hi Bcc: evil@x.example more"


def test_blank_subject_template_gives_no_subject(tmp_path: Path) -> None:
    """A subject template that renders blank falls back to the default subject (None)."""
    write(tmp_path, {"n.subject.j2": "{% if agent %}{{ agent }}{% endif %}\n", "n.txt.j2": "x"})
    assert render_notice(tmp_path, "n", VARIABLES).subject is None


def test_none_variable_renders_as_empty_string(tmp_path: Path) -> None:
    """A variable that is None (agent of a scripted transfer) prints nothing, not 'None'."""
    write(tmp_path, {"n.txt.j2": "by [{{ agent }}]\n{% if not agent %}\nno agent\n{% endif %}\n"})
    assert render_notice(tmp_path, "n", VARIABLES).text == "by []\nno agent\n"


# --------------------------------------------------------------------------- variables


def test_reply_subject_does_not_stack_prefixes() -> None:
    """ "RE: Re: Aw: Order 7" becomes "Re: Order 7"."""
    assert reply_subject("RE: Re: Aw: Order 7") == "Re: Order 7"
    assert reply_subject("Order 7") == "Re: Order 7"
    assert reply_subject("SV: VS: Tilaus 7") == "Re: Tilaus 7"
    assert reply_subject("") == "Re:"


def test_notice_variables_name_both_accounts_and_the_customer() -> None:
    """fromAccount/toAccount are addresses; the *Name variables are display names."""
    customer = parse((FIXTURES / "customer_reply_to.eml").read_bytes())
    variables = notice_variables(
        from_account=SALES,
        to_account=SUPPORT,
        interaction_id=42,
        customer=customer,
        agent="jdoe",
        transferred_at=datetime(2024, 3, 12, 11, 30, tzinfo=timezone(timedelta(hours=1))),
    )
    assert variables == {
        "fromAccount": "sales@example.test",
        "toAccount": "support@example.test",
        "fromAccountName": "Sales Team",
        "toAccountName": "support",  # no display_name: the account's name
        "interaction_id": 42,
        "customer_name": "Zoë Müller",
        "customer_address": "orders@customer.example",  # Reply-To, where the notice goes
        "subject": "RE: Re: Aw: Order 7",
        "base_subject": "Order 7",
        "reply_subject": "Re: Order 7",
        "agent": "jdoe",
        "transferred_at": "2024-03-12T10:30:00+00:00",
    }


def test_naive_transferred_at_is_taken_as_utc() -> None:
    """A naive datetime is UTC, never the host's local zone."""
    customer = parse((FIXTURES / "customer_plain.eml").read_bytes())
    variables = notice_variables(
        from_account=SALES,
        to_account=SUPPORT,
        interaction_id=1,
        customer=customer,
        agent=None,
        transferred_at=datetime(2024, 3, 12, 10, 30),
    )
    assert variables["transferred_at"] == "2024-03-12T10:30:00+00:00"
    assert variables["customer_address"] == "mark.jones@customer.example"
    assert variables["agent"] is None


def test_raw_utf8_customer_name_is_decoded() -> None:
    """Raw UTF-8 header bytes (RFC 6532) reach the template as text, not as U+FFFD."""
    customer = parse((FIXTURES / "raw_utf8_headers.eml").read_bytes())
    variables = notice_variables(
        from_account=SALES,
        to_account=SUPPORT,
        interaction_id=1,
        customer=customer,
        agent=None,
        transferred_at=datetime(2024, 3, 12, tzinfo=UTC),
    )
    assert variables["customer_name"] == "Zoë Müller"
    assert variables["subject"] == "Grüße aus Köln"


# --------------------------------------------------------------------------- example files


def test_example_templates_render_from_and_to_accounts() -> None:
    """The shipped notice uses {{fromAccount}} and {{toAccount}} in text and HTML."""
    rendered = render_notice(EXAMPLE_TEMPLATES, "transfer_notice", VARIABLES)
    for part in (rendered.text, rendered.html or ""):
        assert "sales@example.test" in part
        assert "support@example.test" in part
        assert "#42" in part
    assert "Zoë Müller" in rendered.text
    assert 'your message "Order 7".' in rendered.text  # base_subject: no "Re:" in the prose


def test_example_subject_template_keeps_reply_subject() -> None:
    """The shipped subject is the threading-friendly "Re: <original>"."""
    rendered = render_notice(EXAMPLE_TEMPLATES, "transfer_notice", VARIABLES)
    assert rendered.subject == "Re: Order 7"


# --------------------------------------------------------------------------- check_templates


def test_check_templates_accepts_example_templates() -> None:
    """The shipped templates pass check-config."""
    assert check_templates(settings_for(EXAMPLE_TEMPLATES)) == []


def test_check_templates_reports_undefined_variable_with_account_key(tmp_path: Path) -> None:
    """A typo is found at start-up, with the config key and the template line."""
    write(tmp_path, {"transfer_notice.txt.j2": "{{ fromAccount }}\n{{ toAcount }}\n"})
    problems = check_templates(settings_for(tmp_path))
    assert problems == [
        f"accounts.sales.transfer.template: {tmp_path / 'transfer_notice.txt.j2'}:2: "
        "undefined variable: 'toAcount' is undefined"
    ]


def test_check_templates_reports_missing_template_file(tmp_path: Path) -> None:
    """A template deleted after the config was loaded is a problem, not a crash."""
    problems = check_templates(settings_for(tmp_path))
    assert len(problems) == 1
    assert problems[0].startswith("accounts.sales.transfer.template: ")
    assert "transfer_notice.txt.j2: missing" in problems[0]


def test_check_templates_reports_empty_body(tmp_path: Path) -> None:
    """A body that renders to nothing would send customers an empty mail."""
    write(tmp_path, {"transfer_notice.txt.j2": "{% if false %}{{ toAccount }}{% endif %}\n"})
    [problem] = check_templates(settings_for(tmp_path))
    assert problem.endswith("renders an empty body")


def test_check_templates_ignores_accounts_without_notify(tmp_path: Path) -> None:
    """Only accounts with transfer.notify need a working template."""
    quiet = AccountSettings("sales", "sales@example.test", transfer=TransferSettings(enabled=True))
    assert check_templates(settings_for(tmp_path, quiet, SUPPORT)) == []


def test_check_templates_reports_notify_without_template_name(tmp_path: Path) -> None:
    """Settings built in code (not from TOML) may lack the name; say so."""
    broken = AccountSettings("sales", "sales@example.test", transfer=TransferSettings(notify=True))
    assert check_templates(settings_for(tmp_path, broken)) == [
        "accounts.sales.transfer.template: notify = true needs a template name"
    ]
