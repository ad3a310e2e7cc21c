"""The ``agent`` commands: add agents, set their desk password, rotate their API token,
list and remove them.  A token is printed once, when it is made; only its hash is kept."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import TYPE_CHECKING

from mailrouter.cli._common import (
    EXIT_OK,
    CommandError,
    Subparsers,
    add_command,
    json_flag,
    print_json,
    table,
)
from mailrouter.config import Settings

if TYPE_CHECKING:
    from mailrouter.agents import AgentInfo

__all__ = ["register"]


def cmd_agent(settings: Settings, args: argparse.Namespace) -> int:
    from mailrouter import agents
    from mailrouter.runtime import opened

    action = args.agent_command
    password = _read_password(args.name) if action == "passwd" else ""
    with opened(settings) as rt:
        if action == "add":
            new = agents.add(rt, args.name, args.account or [], admin=args.admin)
        elif action == "token":
            new = agents.rotate_token(rt, args.name)
        elif action == "passwd":
            agents.set_password(rt, args.name, password)
            print(f"agent {args.name}: password set", file=sys.stderr)
            return EXIT_OK
        elif action == "remove":
            agents.remove(rt, args.name)
            print(f"agent {args.name} removed; its token no longer works", file=sys.stderr)
            return EXIT_OK
        else:
            return _list(agents.list_agents(rt), args.json)
    a = new.agent
    if getattr(args, "json", False):
        print_json({"name": a.name, "token": new.token, "accounts": list(a.accounts)})
        return EXIT_OK
    # The token alone on stdout, so `TOKEN=$(mailrouter agent token NAME)` works.
    print(new.token)
    what = "added" if action == "add" else "has a new token (the old one no longer works)"
    scope = "admin, sees every account" if a.admin else "accounts: " + ", ".join(a.accounts)
    print(f"agent {a.name} {what} ({scope}); the token is shown only now", file=sys.stderr)
    return EXIT_OK


def _list(rows: list[AgentInfo], as_json: bool) -> int:
    data = [
        {
            "name": r.name,
            "accounts": list(r.accounts),
            "admin": r.admin,
            "password_set": r.password_set,
            "created_at": r.created_at.isoformat(),
            "token_rotated_at": r.token_rotated_at.isoformat(),
        }
        for r in rows
    ]
    if as_json:
        print_json(data)
    else:
        shown = [
            {**row, "accounts": ",".join(r.accounts) or "-"}
            for row, r in zip(data, rows, strict=True)
        ]
        table(shown, ["name", "accounts", "admin", "password_set", "token_rotated_at"])
    return EXIT_OK


def _read_password(name: str) -> str:
    """The new password: asked twice without echo on a terminal, else stdin's first line."""
    if sys.stdin.isatty():
        first = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != first:
            raise CommandError("the two passwords differ; nothing changed")
        return first
    line = sys.stdin.readline()
    if not line:
        raise CommandError("no password on stdin; nothing changed")
    return line.rstrip("\r\n")


def register(sub: Subparsers) -> None:
    sp = add_command(
        sub, "agent", cmd_agent, "agents of the HTTP API and desk: add, passwd, token, list, remove"
    )
    actions = sp.add_subparsers(dest="agent_command", metavar="ACTION", required=True)

    add = actions.add_parser("add", help="add an agent and print its API token (once)")
    add.add_argument("name")
    add.add_argument(
        "--account",
        action="append",
        metavar="A",
        help="an account the agent belongs to (name or address; repeat for more)",
    )
    add.add_argument("--admin", action="store_true", help="sees and acts on every account")
    json_flag(add)

    passwd = actions.add_parser("passwd", help="set the desk password (read from stdin)")
    passwd.add_argument("name")

    token = actions.add_parser("token", help="rotate the API token: print a new one")
    token.add_argument("name")
    json_flag(token)

    json_flag(actions.add_parser("list", help="list agents (never their secrets)"))

    remove = actions.add_parser("remove", help="remove an agent: its token stops working")
    remove.add_argument("name")
