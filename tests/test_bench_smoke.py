"""Smoke check of the benchmarks: each ``bench/*.py --quick`` runs and prints its ratio.

Only that: the exit status and a ``ratio <what>: <number>`` line.  Never a speed check —
the figures are for people (docs/benchmarks.md), and a slow machine must not fail CI.
Deselect locally with ``-m "not bench"``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from conftest import REQUIRE_SERVERS, need
from servers import DEFAULT_PG_URL, _dovecot_installed

ROOT = Path(__file__).resolve().parent.parent
BENCHES = sorted(p for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))
RATIO = re.compile(r"^ratio (\S+): (-?[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)\s*$", re.M)
TIMEOUT = 240  # seconds per bench: generous, a --quick run takes well under a minute
DOVECOT = {"imap_watch_bench.py"}


def _postgres() -> str | None:
    """The PostgreSQL server URL if one answers on its port (or CI demands one), else None."""
    url = os.environ.get("MAILROUTER_PG_URL") or DEFAULT_PG_URL
    u = make_url(url)
    try:
        socket.create_connection((u.host or "127.0.0.1", u.port or 5432), timeout=2).close()
    except OSError:
        return url if REQUIRE_SERVERS else None  # CI: let the bench fail loudly
    return url


def _param(script: Path) -> object:
    marks = [pytest.mark.bench]
    if script.name in DOVECOT:
        marks.append(pytest.mark.dovecot)
    return pytest.param(script, marks=marks, id=script.stem)


@pytest.mark.parametrize("script", [_param(s) for s in BENCHES])
def test_bench_quick_runs_and_prints_a_ratio(script: Path) -> None:
    """``--quick`` exits 0 and prints at least one ``ratio <what>: <number>`` line."""
    if script.name in DOVECOT:
        need(_dovecot_installed(), "dovecot not installed: apt-get install -y dovecot-imapd")
    args = [sys.executable, str(script), "--quick"]
    if script.name == "smtp_bench.py":
        url = _postgres()
        if url is not None:  # the same run on PostgreSQL, one and two instances
            args += ["--database-url", url, "--instances", "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROUTER_")}
    if REQUIRE_SERVERS:
        env["MAILROUTER_REQUIRE_SERVERS"] = "1"  # a bench needing a server fails without it
    done = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    tail = f"\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"{script.name} --quick exited {done.returncode}{tail}"
    assert RATIO.search(done.stdout), f"{script.name} printed no 'ratio <what>: <n>' line{tail}"
