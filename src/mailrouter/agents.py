"""Agents: who may use the HTTP API and the desk, and what each of them may see.

The access rules live here and nowhere else.  An agent belongs to one or more accounts
and sees only the interactions those accounts *currently* own; an admin sees everything.
:attr:`Agent.scope` is the set of accounts an agent's reads are filtered to and its
operations are checked against: the domain operations take it as ``within=`` and check
it under the interaction's row lock, so an interaction transferred away while a request
was on its way is refused like one that never existed.  A transfer may target any
configured account; the source account's ``transfer.enabled`` still decides.

Only hashes are stored (scrypt, a salt per secret).  Nothing is cached: each request
reads the agent's row, so a removed agent or a rotated token stops working at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from mailrouter.errors import Refused
from mailrouter.runtime import Runtime
from mailrouter.store.models import Account, IdempotencyKey, utcnow
from mailrouter.store.models import Agent as AgentRow

__all__ = [
    "TOKEN_PREFIX",
    "Agent",
    "AgentInfo",
    "NewToken",
    "add",
    "authenticate_password",
    "authenticate_token",
    "identity",
    "list_agents",
    "remove",
    "rotate_token",
    "set_password",
]

TOKEN_PREFIX = "mrt"
MIN_PASSWORD = 8
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,199}$")

# scrypt costs.  A password may be guessable, so its hash is made expensive (32 MiB,
# about 0.1 s); it is checked once per desk sign-in.  A token is 256 random bits: no
# cost factor adds to that, and it is checked on every API request, so its hash is cheap.
PASSWORD_COST = 2**15
TOKEN_COST = 2**10
_R, _P = 8, 1
_MAXMEM = 64 * 1024 * 1024


@dataclass(frozen=True)
class Agent:
    """An authenticated agent: its name, its accounts and whether it is an admin."""

    name: str
    accounts: tuple[str, ...]
    admin: bool = False

    @property
    def scope(self) -> frozenset[str] | None:
        """The accounts whose interactions this agent sees and acts on; None: all (admin)."""
        return None if self.admin else frozenset(self.accounts)

    def sees(self, account: str) -> bool:
        """Whether interactions owned by ``account`` are visible to this agent."""
        return self.admin or account in self.accounts


@dataclass(frozen=True)
class AgentInfo:
    """One row of ``agent list``: never a hash."""

    name: str
    accounts: tuple[str, ...]
    admin: bool
    created_at: datetime
    token_rotated_at: datetime
    password_set: bool


@dataclass(frozen=True)
class NewToken:
    """A token as it is handed out: shown once, only its hash is kept."""

    agent: Agent
    token: str


# --------------------------------------------------------------------------- hashing


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_secret(secret: str, cost: int) -> str:
    """``scrypt$N$r$p$salt$hash``: the parameters travel with the hash, so they can change."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        secret.encode("utf-8"), salt=salt, n=cost, r=_R, p=_P, maxmem=_MAXMEM, dklen=32
    )
    return f"scrypt${cost}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def verify_secret(secret: str, stored: str) -> bool:
    """Whether ``secret`` matches ``stored``, compared in constant time."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            secret.encode("utf-8"),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=_MAXMEM,
            dklen=len(expected),
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


@cache
def _dummy_password_hash() -> str:
    return hash_secret(secrets.token_urlsafe(16), PASSWORD_COST)


def _new_token() -> tuple[str, str, str]:
    """(token, token_id, hash of its secret part)."""
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return f"{TOKEN_PREFIX}_{token_id}_{secret}", token_id, hash_secret(secret, TOKEN_COST)


# --------------------------------------------------------------------------- rows


def identity(row: AgentRow) -> Agent:
    """The :class:`Agent` a stored row stands for, with the accounts it belongs to now."""
    return Agent(row.name, tuple(a.name for a in row.accounts), row.admin)


def _row(s: Session, name: str) -> AgentRow:
    row = s.scalar(select(AgentRow).where(AgentRow.name == name))
    if row is None:
        raise Refused("unknown-agent", f"no agent {name!r}")
    return row


def _accounts(rt: Runtime, s: Session, names: Sequence[str]) -> list[Account]:
    chosen: list[str] = []
    for name in names:
        try:
            canonical = rt.settings.account(name).name
        except KeyError as exc:
            raise Refused("unknown-account", str(exc.args[0])) from None
        if canonical not in chosen:
            chosen.append(canonical)
    rows = {a.name: a for a in s.scalars(select(Account).where(Account.name.in_(chosen)))}
    return [rows[n] for n in chosen]


# --------------------------------------------------------------------------- operations


def add(rt: Runtime, name: str, accounts: Sequence[str], *, admin: bool = False) -> NewToken:
    """A new agent of ``accounts`` (names or addresses) with a fresh token, shown once."""
    if not _NAME_RE.match(name):
        raise Refused(
            "bad-agent-name",
            f"agent names use letters, digits, '.', '_', '@' and '-' (got {name!r})",
        )
    if not accounts and not admin:
        raise Refused("no-accounts", f"agent {name} needs at least one account (or to be an admin)")
    token, token_id, token_hash = _new_token()
    with rt.db.write() as s:
        if s.scalar(select(AgentRow.id).where(AgentRow.name == name)) is not None:
            raise Refused("agent-exists", f"agent {name!r} already exists")
        row = AgentRow(
            name=name,
            admin=admin,
            token_id=token_id,
            token_hash=token_hash,
            accounts=_accounts(rt, s, accounts),
        )
        s.add(row)
        s.flush()
        agent = identity(row)
    return NewToken(agent, token)


def set_password(rt: Runtime, name: str, password: str) -> None:
    """Set (or replace) the password agent ``name`` signs in to the desk with."""
    if len(password) < MIN_PASSWORD:
        raise Refused("weak-password", f"a password needs at least {MIN_PASSWORD} characters")
    hashed = hash_secret(password, PASSWORD_COST)  # slow: outside the write transaction
    with rt.db.write() as s:
        row = _row(s, name)
        row.password_hash = hashed
        row.password_set_at = utcnow()


def rotate_token(rt: Runtime, name: str) -> NewToken:
    """A new token for agent ``name``; the old one stops working with this commit."""
    token, token_id, token_hash = _new_token()
    with rt.db.write() as s:
        row = _row(s, name)
        row.token_id, row.token_hash, row.token_rotated_at = token_id, token_hash, utcnow()
        agent = identity(row)
    return NewToken(agent, token)


def list_agents(rt: Runtime) -> list[AgentInfo]:
    with rt.db.read() as s:
        rows = s.scalars(select(AgentRow).order_by(AgentRow.name))
        return [
            AgentInfo(
                r.name,
                tuple(a.name for a in r.accounts),
                r.admin,
                r.created_at,
                r.token_rotated_at,
                r.password_hash is not None,
            )
            for r in rows
        ]


def remove(rt: Runtime, name: str) -> None:
    """Remove agent ``name``: its token and password stop working with this commit.

    Interactions it picked keep its name as their assignee, and transfers keep it as
    their actor: that is history.  Its reply idempotency keys go, so that a new agent of
    the same name does not inherit them.
    """
    with rt.db.write() as s:
        row = _row(s, name)
        s.execute(delete(IdempotencyKey).where(IdempotencyKey.agent == name))
        s.delete(row)


def authenticate_token(rt: Runtime, token: str) -> Agent:
    """The agent a bearer token belongs to, read from the store now (never cached)."""
    prefix, _, rest = token.partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix == TOKEN_PREFIX and token_id and secret:
        with rt.db.read() as s:
            row = s.scalar(select(AgentRow).where(AgentRow.token_id == token_id))
            found = (identity(row), row.token_hash) if row is not None else None
        if found is not None and verify_secret(secret, found[1]):
            return found[0]
    raise Refused("bad-token", "the token is not valid (unknown, rotated, or its agent removed)")


def authenticate_password(rt: Runtime, name: str, password: str) -> Agent:
    """The agent ``name`` if ``password`` is its password (the desk's sign-in)."""
    with rt.db.read() as s:
        row = s.scalar(select(AgentRow).where(AgentRow.name == name))
        agent = identity(row) if row is not None else None
        stored = row.password_hash if row is not None else None
    # An unknown name, or an agent without a password, costs the same hash: the time an
    # answer takes does not tell which names exist.
    ok = verify_secret(password, stored or _dummy_password_hash())
    if agent is not None and stored is not None and ok:
        return agent
    raise Refused("bad-password", "unknown agent or wrong password")
