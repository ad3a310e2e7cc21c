"""``[http]``: off by default, on in the example config, and no clear-text bind beyond loopback.

Each refused config names file, line and key, like every other config error.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import ROOT, TEMPLATES
from mailrouter.config import ConfigError, HttpSettings, load, load_from_text
from servers import TlsFiles


def base(tmp_path: Path) -> str:
    return f"""\
state_dir = "{tmp_path / "state"}"
[templates]
directory = "{TEMPLATES}"
[accounts.sales]
address = "sales@example.test"
"""


def with_http(tmp_path: Path, lines: str) -> str:
    return base(tmp_path) + "[http]\nenabled = true\n" + lines


def error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        load_from_text(text, tmp_path / "mailrouter.toml", env={})
    return exc.value


def line_of(text: str, needle: str) -> int:
    return [ln.strip() for ln in text.splitlines()].index(needle) + 1


def test_http_is_off_unless_the_file_turns_it_on(tmp_path: Path) -> None:
    """No [http] table: the dataclass defaults, disabled, 127.0.0.1:8025."""
    settings = load_from_text(base(tmp_path), tmp_path / "mailrouter.toml", env={})
    assert settings.http == HttpSettings()
    assert (settings.http.enabled, settings.http.host, settings.http.port) == (
        False,
        "127.0.0.1",
        8025,
    )


def test_example_config_serves_http_on_loopback_8025() -> None:
    """`make run` gives an API (and later the desk) at http://127.0.0.1:8025."""
    http = load(ROOT / "config" / "mailrouter.example.toml", env={}).http
    assert (http.enabled, http.host, http.port, http.tls) == (True, "127.0.0.1", 8025, False)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::"])
def test_non_loopback_bind_without_tls_or_proxy_is_refused(tmp_path: Path, host: str) -> None:
    """Tokens must not cross a network in clear text: the error names the host key."""
    text = with_http(tmp_path, f'host = "{host}"\n')
    err = error(tmp_path, text)
    assert (err.key, err.line) == ("http.host", line_of(text, f'host = "{host}"'))
    assert err.problem == (
        f"listening on {host} (not loopback) needs tls_cert and tls_key, "
        "or behind_proxy = true with trusted_proxies"
    )
    assert str(err).startswith(f"{tmp_path / 'mailrouter.toml'}:{err.line}: http.host: ")


def test_non_loopback_bind_with_tls_is_accepted(tmp_path: Path, tls_files: TlsFiles) -> None:
    """A certificate and key (resolved next to the config) allow any address."""
    text = with_http(
        tmp_path, f'host = "0.0.0.0"\ntls_cert = "{tls_files.cert}"\ntls_key = "{tls_files.key}"\n'
    )
    http = load_from_text(text, tmp_path / "mailrouter.toml", env={}).http
    assert (http.host, http.tls_cert, http.tls_key, http.tls) == (
        "0.0.0.0",
        tls_files.cert,
        tls_files.key,
        True,
    )


def test_non_loopback_bind_behind_a_proxy_is_accepted(tmp_path: Path) -> None:
    """behind_proxy with the proxy's addresses, normalised for uvicorn (a network stays one)."""
    text = with_http(
        tmp_path,
        'host = "0.0.0.0"\nbehind_proxy = true\ntrusted_proxies = ["10.0.0.2", "10.1.0.7/16"]\n',
    )
    http = load_from_text(text, tmp_path / "mailrouter.toml", env={}).http
    assert (http.behind_proxy, http.trusted_proxies) == (True, ("10.0.0.2", "10.1.0.0/16"))


def test_behind_proxy_needs_the_proxy_address(tmp_path: Path) -> None:
    """behind_proxy alone would believe X-Forwarded-* from nobody, or anybody: refused."""
    text = with_http(tmp_path, 'host = "0.0.0.0"\nbehind_proxy = true\n')
    err = error(tmp_path, text)
    assert (err.key, err.line) == ("http.behind_proxy", line_of(text, "behind_proxy = true"))
    assert "needs trusted_proxies" in err.problem


@pytest.mark.parametrize(
    ("lines", "key", "problem"),
    [
        ('trusted_proxies = ["10.0.0.2"]\n', "http.trusted_proxies", "only used with"),
        (
            'behind_proxy = true\ntrusted_proxies = ["proxy.example"]\n',
            "http.trusted_proxies",
            "not an IP address or network: 'proxy.example'",
        ),
        ('tls_cert = "nowhere.pem"\n', "http.tls_cert", "nowhere.pem does not exist"),
        ("port = 70000\n", "http.port", "expected a TCP port"),
        ('proxy = "x"\n', "http.proxy", "unknown key"),
    ],
    ids=["proxies-without-proxy", "proxy-by-name", "missing-cert", "bad-port", "unknown-key"],
)
def test_bad_http_settings_name_their_key(
    tmp_path: Path, lines: str, key: str, problem: str
) -> None:
    """Each mistake in [http] is reported at its own key."""
    err = error(tmp_path, with_http(tmp_path, lines))
    assert err.key == key and problem in err.problem and err.line is not None


def test_tls_cert_without_key_is_refused(tmp_path: Path, tls_files: TlsFiles) -> None:
    """tls_cert and tls_key go together."""
    err = error(tmp_path, with_http(tmp_path, f'tls_cert = "{tls_files.cert}"\n'))
    assert (err.key, err.problem) == ("http.tls_key", "tls_cert and tls_key go together")
