"""The ``[notify]`` table: defaults, the subject token's shape, positive bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import ROOT
from mailrouter.config import ConfigError, NotifySettings, load, load_from_text

BASE = '[accounts.sales]\naddress = "sales@example.test"\n'


def test_notify_defaults_apply_without_a_notify_table(tmp_path: Path) -> None:
    """No [notify] table: the token is on, ten automatic mails a day, bounded renders."""
    notify = load_from_text(BASE, tmp_path / "m.toml", {}).notify
    assert notify == NotifySettings()
    assert (notify.subject_token, notify.max_auto_per_customer_per_day) == ("[#{id}]", 10)


def test_example_config_sets_the_notify_defaults() -> None:
    """The shipped example spells out the defaults it documents."""
    notify = load(ROOT / "config" / "mailrouter.example.toml", env={}).notify
    assert notify.subject_token == "[#{id}]"
    assert notify.max_auto_per_customer_per_day == 10


def test_subject_token_can_be_turned_off_or_reshaped(tmp_path: Path) -> None:
    """ "" turns the token off; any short ASCII shape with {id} once is accepted."""
    for token in ("", "[Ticket#{id}]", "(ref {id})"):
        text = f'[notify]\nsubject_token = "{token}"\n' + BASE
        assert load_from_text(text, tmp_path / "m.toml", {}).notify.subject_token == token


@pytest.mark.parametrize(
    "token", ["[#]", "[#{id}{id}]", "[#{id}]\\r\\nBcc: x@y.test", "[#{id}]" + "x" * 40, "[#{id}é]"]
)
def test_a_bad_subject_token_is_refused_with_its_line(tmp_path: Path, token: str) -> None:
    """Without {id}, twice, with CR/LF, too long or non-ASCII: a config error at its line."""
    text = f'[notify]\nsubject_token = "{token}"\n' + BASE
    with pytest.raises(ConfigError, match=r"m\.toml:2: notify\.subject_token: expected") as info:
        load_from_text(text, tmp_path / "m.toml", {})
    assert info.value.line == 2


@pytest.mark.parametrize(
    "key", ["max_auto_per_customer_per_day", "render_timeout", "max_render_size"]
)
def test_notify_bounds_must_be_positive(tmp_path: Path, key: str) -> None:
    """A zero bound would turn the guard off or refuse every notice: refused."""
    text = f"[notify]\n{key} = 0\n" + BASE
    with pytest.raises(ConfigError, match=f"notify.{key}: must be greater than 0"):
        load_from_text(text, tmp_path / "m.toml", {})
