"""Configuration errors are phrased for the operator: ``file:line: key: problem``.

Each test starts from a small valid config and breaks one thing, then checks that the
error names the file, the line to look at, the dotted key and what is wrong with it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import TEMPLATES
from mailrouter.config import (
    PACKAGED_TEMPLATES,
    ConfigError,
    DeliverySettings,
    ImapWatchSettings,
    ListenerSettings,
    OutboundSettings,
    OutboxSettings,
    Secret,
    Settings,
    load,
    load_from_text,
)


def valid(tmp_path: Path) -> str:
    return f"""\
state_dir = "{tmp_path / "state"}"

[templates]
directory = "{TEMPLATES}"

[accounts.sales]
address = "sales@example.test"
  [accounts.sales.transfer]
  enabled = true
  notify = true
  template = "transfer_notice"

[accounts.support]
address = "support@example.test"
"""


def line_of(text: str, needle: str) -> int:
    """1-based number of the first line that is ``needle`` once stripped."""
    return [ln.strip() for ln in text.splitlines()].index(needle) + 1


def config_error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    path = tmp_path / "mailrouter.toml"
    with pytest.raises(ConfigError) as exc:
        load_from_text(text, path, env={} if env is None else env)
    return exc.value


def assert_error(err: ConfigError, tmp_path: Path, line: int, key: str, problem: str) -> None:
    path = tmp_path / "mailrouter.toml"
    assert (err.file, err.line, err.key) == (str(path), line, key)
    assert err.problem == problem
    assert str(err) == f"{path}:{line}: {key}: {problem}"


def test_valid_config_loads(tmp_path: Path) -> None:
    """The base config of these tests is valid (so each break below is the only problem)."""
    settings = load_from_text(valid(tmp_path), tmp_path / "mailrouter.toml", env={})
    assert [a.name for a in settings.accounts] == ["sales", "support"]
    assert settings.account("support").transfer.enabled is False  # the default


def test_tables_left_out_get_the_settings_defaults(tmp_path: Path) -> None:
    """A file without [outbox], [smtp] or [lmtp] gets the defaults the dataclasses state."""
    settings = load_from_text(valid(tmp_path), tmp_path / "mailrouter.toml", env={})
    assert settings.outbox == OutboxSettings()
    assert settings.smtp == ListenerSettings(enabled=True, port=2525)
    assert settings.lmtp == ListenerSettings(port=2424)
    assert (settings.references_limit, settings.log_format, settings.log_level) == (
        20,
        "kv",
        "INFO",
    )
    assert (settings.hostname, settings.shutdown_timeout) == ("mailrouter.invalid", 30.0)


def test_imap_and_lmtp_defaults_depend_on_the_account(tmp_path: Path) -> None:
    """IMAP watching logs in as the account's address; LMTP delivers to it, on port 24."""
    text = valid(tmp_path) + (
        "  [accounts.support.imap]\n"
        '  password_env = "MR_PW"\n'
        "  [accounts.support.delivery]\n"
        '  type = "lmtp"\n'
    )
    settings = load_from_text(text, tmp_path / "mailrouter.toml", env={"MR_PW": "pw"})
    support = settings.account("support")
    address = "support@example.test"
    assert support.imap == ImapWatchSettings(user=address, password=Secret("env:MR_PW", "pw"))
    assert support.delivery == DeliverySettings(type="lmtp", port=24, user=address)


def test_wrong_type_names_key_and_expected_type(tmp_path: Path) -> None:
    """A value of the wrong type is reported with its key, the expected and the actual type."""
    text = valid(tmp_path).replace("enabled = true", 'enabled = "yes"')
    err = config_error(tmp_path, text)
    assert_error(
        err,
        tmp_path,
        line_of(text, 'enabled = "yes"'),
        "accounts.sales.transfer.enabled",
        "expected true or false, got a string",
    )


def test_unknown_key_is_refused_with_the_allowed_ones(tmp_path: Path) -> None:
    """A misspelt key is an error listing the keys that table accepts."""
    text = valid(tmp_path).replace('address = "support', 'adress = "support')
    err = config_error(tmp_path, text)
    assert_error(
        err,
        tmp_path,
        line_of(text, 'adress = "support@example.test"'),
        "accounts.support.adress",
        "unknown key (expected one of: address, delivery, display_name, imap, transfer)",
    )


def test_unknown_key_hint_offers_a_secret_as_file_or_env(tmp_path: Path) -> None:
    """A table with a password lists password_file and password_env among its keys."""
    text = valid(tmp_path) + '\n[outbound]\ntype = "smtp"\npasword_env = "PW"\n'
    err = config_error(tmp_path, text)
    assert_error(
        err,
        tmp_path,
        line_of(text, 'pasword_env = "PW"'),
        "outbound.pasword_env",
        "unknown key (expected one of: helo_name, host, password, password_env, "
        "password_file, path, port, timeout, tls, tls_ca_file, type, user)",
    )


def test_unknown_top_level_table_is_refused(tmp_path: Path) -> None:
    """A misspelt table is an error at its header line."""
    text = valid(tmp_path) + '\n[outbond]\ntype = "pickup"\n'
    err = config_error(tmp_path, text)
    assert err.key == "outbond"
    assert err.line == line_of(text, "[outbond]")
    assert err.problem.startswith("unknown key (expected one of: ")


def test_missing_address_points_at_the_account_table(tmp_path: Path) -> None:
    """An account without an address is reported at its table header."""
    text = valid(tmp_path).replace('address = "support@example.test"\n', 'display_name = "S"\n')
    err = config_error(tmp_path, text)
    assert_error(
        err,
        tmp_path,
        line_of(text, "[accounts.support]"),
        "accounts.support.address",
        "missing (the account's email address)",
    )


def test_invalid_address_is_refused(tmp_path: Path) -> None:
    """An address that is not local@domain is refused."""
    text = valid(tmp_path).replace('"support@example.test"', '"support at example"')
    err = config_error(tmp_path, text)
    assert (err.key, err.line) == (
        "accounts.support.address",
        line_of(text, 'address = "support at example"'),
    )
    assert err.problem == "not an email address: 'support at example'"


def test_notify_without_template_is_refused(tmp_path: Path) -> None:
    """transfer.notify = true without a template name is an error at the transfer table."""
    text = valid(tmp_path).replace('  template = "transfer_notice"\n', "")
    err = config_error(tmp_path, text)
    assert_error(
        err,
        tmp_path,
        line_of(text, "[accounts.sales.transfer]"),
        "accounts.sales.transfer.template",
        "notify = true needs a template name",
    )


def test_missing_template_file_is_refused(tmp_path: Path) -> None:
    """A template name without its .txt.j2 file names the file that is missing."""
    text = valid(tmp_path).replace('"transfer_notice"', '"transfer_notise"')
    err = config_error(tmp_path, text)
    assert_error(
        err,
        tmp_path,
        line_of(text, 'template = "transfer_notise"'),
        "accounts.sales.transfer.template",
        f"template 'transfer_notise' not found: {TEMPLATES / 'transfer_notise.txt.j2'} "
        "does not exist",
    )


def test_duplicate_address_is_refused(tmp_path: Path) -> None:
    """Two accounts with one address is an error naming the account that has it first."""
    text = valid(tmp_path).replace('"support@example.test"', '"Sales@Example.test"')
    err = config_error(tmp_path, text)
    assert_error(
        err,
        tmp_path,
        line_of(text, "[accounts.support]"),
        "accounts.support",
        "'sales@example.test' is already used by account 'sales'",
    )


def test_inline_password_is_refused_without_echoing_it(tmp_path: Path) -> None:
    """A password written into the config is refused; the error does not repeat it."""
    text = valid(tmp_path) + (
        "  [accounts.support.delivery]\n"
        '  type = "imap"\n'
        '  user = "support@example.test"\n'
        '  password = "hunter2-Secret"\n'
    )
    err = config_error(tmp_path, text)
    assert_error(
        err,
        tmp_path,
        line_of(text, 'password = "hunter2-Secret"'),
        "accounts.support.delivery.password",
        "inline secrets are not accepted; use password_file or password_env",
    )
    assert "hunter2" not in str(err)


def test_password_from_environment_is_masked(tmp_path: Path) -> None:
    """password_env reads the secret from the environment; printing it shows no secret."""
    text = valid(tmp_path) + (
        "  [accounts.support.delivery]\n"
        '  type = "imap"\n'
        '  user = "support@example.test"\n'
        '  password_env = "MR_SUPPORT_PW"\n'
    )
    err = config_error(tmp_path, text)
    assert (err.key, err.problem) == (
        "accounts.support.delivery.password_env",
        "environment variable MR_SUPPORT_PW is not set or empty",
    )
    settings = load_from_text(
        text, tmp_path / "mailrouter.toml", env={"MR_SUPPORT_PW": "hunter2-Secret"}
    )
    secret = settings.account("support").delivery.password
    assert secret is not None
    assert secret.get() == "hunter2-Secret"
    assert "hunter2" not in f"{secret} {secret!r} {settings!r}"


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    """A TOML syntax error is reported with its line."""
    text = valid(tmp_path).replace('address = "support@example.test"', "address = support")
    err = config_error(tmp_path, text)
    assert err.line == line_of(text, "address = support")
    assert err.problem.startswith("not valid TOML: ")


def test_missing_config_file_says_how_to_give_one(tmp_path: Path) -> None:
    """Loading a file that does not exist explains -c and MAILROUTER_CONFIG."""
    with pytest.raises(
        ConfigError, match=r"no such file \(give -c PATH or set MAILROUTER_CONFIG\)"
    ):
        load(tmp_path / "nope.toml", env={})


# --------------------------------------------------------------------------- paths


def test_state_dir_env_overrides_state_dir(tmp_path: Path) -> None:
    """MAILROUTER_STATE_DIR wins over state_dir, and every state path follows it."""
    elsewhere = tmp_path / "elsewhere"
    settings = load_from_text(
        valid(tmp_path), tmp_path / "mailrouter.toml", env={"MAILROUTER_STATE_DIR": str(elsewhere)}
    )
    assert settings.state_dir == elsewhere.resolve()
    assert settings.database_url == f"sqlite:///{elsewhere.resolve() / 'mailrouter.db'}"
    assert settings.account("sales").delivery.path == elsewhere.resolve() / "maildir" / "sales"
    assert settings.outbound.path == elsewhere.resolve() / "pickup"


def test_state_dir_from_config_without_env(tmp_path: Path) -> None:
    """Without MAILROUTER_STATE_DIR the configured state_dir is used."""
    settings = load_from_text(valid(tmp_path), tmp_path / "mailrouter.toml", env={})
    assert settings.state_dir == (tmp_path / "state").resolve()


def test_relative_sqlite_url_resolves_under_state_dir(tmp_path: Path) -> None:
    """sqlite:///relative.db is relative to the state directory, not the working directory."""
    text = valid(tmp_path).replace(
        "[templates]", '[database]\nurl = "sqlite:///db/mailrouter.sqlite"\n\n[templates]'
    )
    settings = load_from_text(text, tmp_path / "mailrouter.toml", env={})
    state = (tmp_path / "state").resolve()
    assert settings.database_url == f"sqlite:///{state / 'db' / 'mailrouter.sqlite'}"


@pytest.mark.parametrize(
    "url",
    ["sqlite:////var/lib/mailrouter/mr.db", "sqlite:///:memory:", "postgresql+psycopg://u@h/db"],
)
def test_absolute_and_non_file_urls_are_kept(tmp_path: Path, url: str) -> None:
    """Absolute SQLite paths, :memory: and other engines are used as written."""
    text = valid(tmp_path).replace("[templates]", f'[database]\nurl = "{url}"\n\n[templates]')
    settings = load_from_text(text, tmp_path / "mailrouter.toml", env={})
    assert settings.database_url == url


def test_relative_template_directory_resolves_next_to_config(tmp_path: Path) -> None:
    """templates.directory is configuration: relative to the config file, not the state dir."""
    conf = tmp_path / "etc"
    (conf / "notices").mkdir(parents=True)
    (conf / "notices" / "transfer_notice.txt.j2").write_text("{{fromAccount}}\n", "utf-8")
    text = valid(tmp_path).replace(f'directory = "{TEMPLATES}"', 'directory = "notices"')
    settings: Settings = load_from_text(text, conf / "mailrouter.toml", env={})
    assert settings.template_dir == conf.resolve() / "notices"


def test_template_directory_not_set_is_the_packaged_templates(tmp_path: Path) -> None:
    """No templates.directory: the notice templates shipped inside the package, which is
    what makes an installed wheel work with a config that has no template files beside it."""
    text = valid(tmp_path).replace(f'[templates]\ndirectory = "{TEMPLATES}"\n', "")
    assert "[templates]" not in text
    settings: Settings = load_from_text(text, tmp_path / "etc" / "mailrouter.toml", env={})
    assert settings.template_dir == PACKAGED_TEMPLATES
    assert (PACKAGED_TEMPLATES / "transfer_notice.txt.j2").is_file()
    # The repository's config/templates is the same directory, for the example config.
    assert TEMPLATES.resolve() == PACKAGED_TEMPLATES


def test_tls_ca_file_resolves_next_to_config_and_must_exist(tmp_path: Path) -> None:
    """tls_ca_file is relative to the config file; a missing one names file, line and key."""
    from mailrouter.config import ConfigError, load_from_text

    (tmp_path / "ca.pem").write_text("not checked here\n")
    base = f'state_dir = "{tmp_path}"\n[accounts.sales]\naddress = "sales@example.test"\n'
    ok = load_from_text(
        base + '[outbound]\ntype = "smtp"\ntls_ca_file = "ca.pem"\n', tmp_path / "m.toml", env={}
    )
    assert ok.outbound.tls_ca_file == tmp_path / "ca.pem"
    with pytest.raises(ConfigError) as exc:
        load_from_text(
            base + '[outbound]\ntype = "smtp"\ntls_ca_file = "missing.pem"\n',
            tmp_path / "m.toml",
            env={},
        )
    assert "outbound.tls_ca_file" in str(exc.value) and ":6:" in str(exc.value)


# --------------------------------------------------------------------------- outbound


@pytest.mark.parametrize("host", [None, "smtp.example.net"])
def test_smtp_outbound_without_tls_key_uses_starttls(tmp_path: Path, host: str | None) -> None:
    """type = "smtp" with no tls key means STARTTLS, loopback or not, as OutboundSettings says."""
    text = valid(tmp_path) + '\n[outbound]\ntype = "smtp"\n'
    if host is not None:
        text += f'host = "{host}"\n'
    settings = load_from_text(text, tmp_path / "mailrouter.toml", env={})
    assert settings.outbound.type == "smtp"
    assert settings.outbound.tls == "starttls"
    assert OutboundSettings().tls == "starttls"  # the dataclass and the loader agree


def test_pickup_outbound_is_only_its_directory(tmp_path: Path) -> None:
    """A pickup outbound is type and path; the smarthost settings keep their defaults."""
    text = valid(tmp_path) + '\n[outbound]\ntype = "pickup"\n'
    settings = load_from_text(text, tmp_path / "mailrouter.toml", env={})
    pickup = (tmp_path / "state").resolve() / "pickup"
    assert settings.outbound == OutboundSettings(type="pickup", path=pickup)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql+psycopg://mr:s3cret@db.example/mr",
            "postgresql+psycopg://mr:********@db.example/mr",
        ),
        (
            "postgresql://mr:p@ss:w0rd@db.example:5432/mr",
            "postgresql://mr:********@db.example:5432/mr",
        ),
        (
            "postgresql://db.example/mr?password=s3cret&sslmode=require",
            "postgresql://db.example/mr?password=********&sslmode=require",
        ),
        ("postgresql://mr@db.example/mr", "postgresql://mr@db.example/mr"),
    ],
    ids=["plain", "at-and-colon-in-password", "query-parameter", "no-password"],
)
def test_check_config_masks_every_database_password(url: str, shown: str) -> None:
    """A database URL's password never appears in check-config's output, wherever it is."""
    from mailrouter.config.settings import mask_url

    assert mask_url(url) == shown
    assert "s3cret" not in mask_url(url) and "w0rd" not in mask_url(url)


def test_reuse_port_is_off_by_default_and_set_per_listener(tmp_path: Path) -> None:
    """``reuse_port`` defaults to false; ``[smtp]`` and ``[lmtp]`` each take their own."""
    text = valid(tmp_path) + "[smtp]\nreuse_port = true\n"
    settings = load_from_text(text, tmp_path / "mailrouter.toml", env={})
    assert settings.smtp.reuse_port is True
    assert settings.lmtp.reuse_port is False


def test_reuse_port_must_be_a_boolean(tmp_path: Path) -> None:
    """A ``reuse_port`` that is not true/false names the key and the expected type."""
    text = valid(tmp_path) + '[lmtp]\nreuse_port = "yes"\n'
    err = config_error(tmp_path, text)
    assert_error(
        err,
        tmp_path,
        line_of(text, 'reuse_port = "yes"'),
        "lmtp.reuse_port",
        "expected true or false, got a string",
    )
