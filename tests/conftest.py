"""Shared fixtures: settings built per test, a fresh store, the example fixtures folder."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailrouter.log import LogHandler
from servers import *  # noqa: F403

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
CORPORA = ROOT.parent / "shared" / "corpora"
REQUIRE_SERVERS = os.environ.get("MAILROUTER_REQUIRE_SERVERS") == "1"
IN_CI = os.environ.get("CI") == "true" or REQUIRE_SERVERS
# The suite's own switches.  Every other MAILROUTER_* variable belongs to the shell the
# suite was started from (a developer's state dir or config file) and must reach neither
# a test nor the daemons it starts: with MAILROUTER_STATE_DIR set, tests share one store.
SUITE_SWITCHES = frozenset({"MAILROUTER_REQUIRE_SERVERS", "MAILROUTER_PG_URL"})


def need(condition: bool, reason: str) -> None:
    """Skip with ``reason`` on a laptop; fail in CI, where the thing must be there."""
    if condition:
        return
    if REQUIRE_SERVERS:
        pytest.fail(f"required in CI (MAILROUTER_REQUIRE_SERVERS=1): {reason}")
    pytest.skip(reason)


@pytest.fixture
def corpora() -> Path:
    """The third-party corpora beside the repository (../shared/corpora)."""
    if not CORPORA.is_dir():
        if IN_CI:
            pytest.fail(f"{CORPORA} is missing (CI must have ../shared)")
        pytest.skip(f"{CORPORA} not present")
    return CORPORA


@pytest.fixture(autouse=True)
def hermetic_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without the shell's MAILROUTER_* settings (subprocesses too)."""
    for name in list(os.environ):
        if name.startswith("MAILROUTER_") and name not in SUITE_SWITCHES:
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def logging_restored() -> Iterator[None]:
    """``mailrouter.cli.main`` configures logging for the process; undo it after each test.

    Only mailrouter's own handler is taken off (pytest's capture handlers come and go per
    phase and are pytest's business); levels and the warnings capture are put back.
    """
    root, ours = logging.getLogger(), logging.getLogger("mailrouter")
    saved = [(logger, logger.level, logger.propagate) for logger in (root, ours)]
    yield
    for logger, level, propagate in saved:
        for handler in [h for h in logger.handlers if isinstance(h, LogHandler)]:
            logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    logging.captureWarnings(False)
