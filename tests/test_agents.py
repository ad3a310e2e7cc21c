"""Agents: tokens and passwords (only hashes kept), rotation and removal at once, and the
``mailrouter agent`` commands."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from helpers import make_settings, run_cli
from mailrouter import agents
from mailrouter.config import Settings
from mailrouter.errors import Refused
from mailrouter.runtime import Runtime, opened


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def rt(settings: Settings) -> Iterator[Runtime]:
    runtime = Runtime.open(settings)
    try:
        yield runtime
    finally:
        runtime.close()


def _store_bytes(settings: Settings) -> bytes:
    db = Path(settings.database_url.removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def test_token_authenticates_its_agent_with_its_accounts(rt: Runtime) -> None:
    """`add` returns a token once; it authenticates the agent, accounts by name or address."""
    new = agents.add(rt, "alice", ["sales", "support@example.test"])
    assert new.token.startswith("mrt_")
    assert agents.authenticate_token(rt, new.token) == agents.Agent(
        "alice", ("sales", "support"), admin=False
    )


def test_only_hashes_of_tokens_and_passwords_are_stored(rt: Runtime, settings: Settings) -> None:
    """Neither the token's secret part nor the password is anywhere in the database files."""
    new = agents.add(rt, "alice", ["sales"])
    agents.set_password(rt, "alice", "correct horse battery")
    secret = new.token.split("_", 2)[2]
    stored = _store_bytes(settings)
    assert secret.encode() not in stored
    assert b"correct horse battery" not in stored
    assert b"scrypt$" in stored


def test_wrong_or_altered_token_is_refused(rt: Runtime) -> None:
    """A token with another secret, or not of our shape, is `bad-token`."""
    new = agents.add(rt, "alice", ["sales"])
    prefix, token_id, secret = new.token.split("_", 2)
    for token in (
        f"{prefix}_{token_id}_{secret[:-1]}x",
        f"{prefix}_{token_id}_",
        "mrt_nope",
        "",
        new.token.replace("mrt_", "xyz_"),
    ):
        with pytest.raises(Refused) as exc:
            agents.authenticate_token(rt, token)
        assert exc.value.code == "bad-token"


def test_rotated_token_stops_working_at_once(rt: Runtime) -> None:
    """After `rotate_token` the old token is refused, the new one works."""
    old = agents.add(rt, "alice", ["sales"]).token
    new = agents.rotate_token(rt, "alice").token
    with pytest.raises(Refused, match="not valid"):
        agents.authenticate_token(rt, old)
    assert agents.authenticate_token(rt, new).name == "alice"


def test_removed_agent_token_and_password_stop_working(rt: Runtime) -> None:
    """A removed agent cannot authenticate any more, by token or password."""
    token = agents.add(rt, "alice", ["sales"]).token
    agents.set_password(rt, "alice", "correct horse battery")
    agents.remove(rt, "alice")
    with pytest.raises(Refused):
        agents.authenticate_token(rt, token)
    with pytest.raises(Refused) as exc:
        agents.authenticate_password(rt, "alice", "correct horse battery")
    assert exc.value.code == "bad-password"


def test_password_authenticates_only_when_right(rt: Runtime) -> None:
    """The desk's sign-in: right password yes; wrong, unset, unknown agent all the same no."""
    agents.add(rt, "alice", ["sales"])
    agents.add(rt, "bob", ["support"])
    agents.set_password(rt, "alice", "correct horse battery")
    assert agents.authenticate_password(rt, "alice", "correct horse battery").name == "alice"
    for name, password in (("alice", "wrong password"), ("bob", ""), ("nobody", "x" * 10)):
        with pytest.raises(Refused) as exc:
            agents.authenticate_password(rt, name, password)
        assert (exc.value.code, exc.value.message) == (
            "bad-password",
            "unknown agent or wrong password",
        )


def test_admin_sees_every_account_without_naming_one(rt: Runtime) -> None:
    """An admin needs no account; its scope is everything."""
    admin = agents.authenticate_token(rt, agents.add(rt, "root", [], admin=True).token)
    assert admin.admin and admin.scope is None and admin.sees("billing")
    alice = agents.authenticate_token(rt, agents.add(rt, "alice", ["sales"]).token)
    assert alice.scope == frozenset({"sales"}) and not alice.sees("billing")


@pytest.mark.parametrize(
    ("name", "accounts", "code"),
    [
        ("alice", ["nowhere"], "unknown-account"),
        ("alice", [], "no-accounts"),
        ("al ice", ["sales"], "bad-agent-name"),
        ("taken", ["sales"], "agent-exists"),
    ],
)
def test_add_refusals_change_nothing(
    rt: Runtime, name: str, accounts: list[str], code: str
) -> None:
    """Every refused `add` says why and leaves the agents as they were."""
    agents.add(rt, "taken", ["support"])
    before = agents.list_agents(rt)
    with pytest.raises(Refused) as exc:
        agents.add(rt, name, accounts)
    assert exc.value.code == code
    assert agents.list_agents(rt) == before


def test_short_password_and_unknown_agent_are_refused(rt: Runtime) -> None:
    agents.add(rt, "alice", ["sales"])
    with pytest.raises(Refused) as short:
        agents.set_password(rt, "alice", "short")
    with pytest.raises(Refused) as unknown:
        agents.rotate_token(rt, "nobody")
    assert (short.value.code, unknown.value.code) == ("weak-password", "unknown-agent")
    assert not agents.list_agents(rt)[0].password_set


# --------------------------------------------------------------------------- CLI


def test_cli_agent_add_json_prints_name_token_accounts_once(settings: Settings) -> None:
    """`agent add --json` prints {"name", "token", "accounts"}; `list` never shows a token."""
    code, out, err = run_cli(
        settings, "agent", "add", "alice", "--account", "sales", "--account", "support", "--json"
    )
    assert code == 0, err
    added = json.loads(out)
    assert set(added) == {"name", "token", "accounts"}
    assert (added["name"], added["accounts"]) == ("alice", ["sales", "support"])
    code, out, _ = run_cli(settings, "agent", "list", "--json")
    [row] = json.loads(out)
    assert (row["name"], row["accounts"], row["admin"], row["password_set"]) == (
        "alice",
        ["sales", "support"],
        False,
        False,
    )
    assert added["token"] not in out
    with opened(settings) as rt:
        assert agents.authenticate_token(rt, added["token"]).name == "alice"


def test_cli_agent_add_prints_only_the_token_on_stdout(settings: Settings) -> None:
    """Without --json stdout is the token alone (for `TOKEN=$(…)`); the note is on stderr."""
    code, out, err = run_cli(settings, "agent", "add", "root", "--admin")
    assert code == 0
    assert out.count("\n") == 1 and out.startswith("mrt_")
    assert "shown only now" in err and "admin" in err


def test_cli_agent_passwd_reads_stdin(settings: Settings) -> None:
    """`agent passwd NAME` takes the first line of stdin (no terminal: nothing to hide)."""
    run_cli(settings, "agent", "add", "alice", "--account", "sales")
    with mock.patch.object(sys, "stdin", _Stdin("correct horse battery\n")):
        code, _, err = run_cli(settings, "agent", "passwd", "alice")
    assert code == 0, err
    with opened(settings) as rt:
        assert agents.authenticate_password(rt, "alice", "correct horse battery").name == "alice"


def test_cli_agent_passwd_on_a_terminal_asks_twice_without_echo(settings: Settings) -> None:
    """On a tty the password is read with getpass, twice; a mismatch changes nothing."""
    run_cli(settings, "agent", "add", "alice", "--account", "sales")
    tty = _Stdin("", tty=True)
    with (
        mock.patch.object(sys, "stdin", tty),
        mock.patch("getpass.getpass", side_effect=["first-password", "other-password"]),
    ):
        code, _, err = run_cli(settings, "agent", "passwd", "alice")
    assert code == 1 and "differ" in err
    with (
        mock.patch.object(sys, "stdin", tty),
        mock.patch("getpass.getpass", side_effect=["same-password", "same-password"]) as ask,
    ):
        assert run_cli(settings, "agent", "passwd", "alice")[0] == 0
    assert ask.call_count == 2
    with opened(settings) as rt:
        assert agents.authenticate_password(rt, "alice", "same-password").name == "alice"


def test_cli_agent_token_rotates_and_remove_revokes(settings: Settings) -> None:
    """`agent token` prints a new token (the old one dies); `agent remove` kills the new one."""
    _, first, _ = run_cli(settings, "agent", "add", "alice", "--account", "sales")
    code, second, _ = run_cli(settings, "agent", "token", "alice")
    assert code == 0 and second.strip() != first.strip()
    with opened(settings) as rt:
        with pytest.raises(Refused):
            agents.authenticate_token(rt, first.strip())
        assert agents.authenticate_token(rt, second.strip()).name == "alice"
    assert run_cli(settings, "agent", "remove", "alice")[0] == 0
    with opened(settings) as rt, pytest.raises(Refused):
        agents.authenticate_token(rt, second.strip())
    code, _, err = run_cli(settings, "agent", "remove", "alice")
    assert code == 1 and "no agent 'alice'" in err


def test_cli_agent_add_unknown_account_exits_1(settings: Settings) -> None:
    code, _, err = run_cli(settings, "agent", "add", "alice", "--account", "nowhere")
    assert code == 1 and "unknown account 'nowhere'" in err
    assert json.loads(run_cli(settings, "agent", "list", "--json")[1]) == []


class _Stdin:
    def __init__(self, text: str, *, tty: bool = False) -> None:
        self._lines = text.splitlines(keepends=True)
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty

    def readline(self) -> str:
        return self._lines.pop(0) if self._lines else ""
