"""systemd/mailrouter.service: `systemd-analyze verify` is clean and `security` rates it ≤ 1.5."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, need

UNIT = ROOT / "systemd" / "mailrouter.service"
INSTALLED = "/usr/local/bin/mailrouter"
BAR = 1.5


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    need(exe is not None, "systemd-analyze is not installed (apt-get install systemd)")
    assert exe is not None
    return exe


def _unit_for_this_venv(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's ``mailrouter`` (verify wants it to exist)."""
    exe = Path(sys.executable).parent / "mailrouter"
    assert exe.exists(), f"{exe} missing: pip install -e . first"
    text = UNIT.read_text("utf-8")
    assert INSTALLED in text
    unit = tmp_path / "mailrouter.service"
    unit.write_text(text.replace(INSTALLED, str(exe)), "utf-8")
    return unit


def test_unit_verifies_without_a_word(tmp_path: Path) -> None:
    """`systemd-analyze verify` prints nothing and exits 0."""
    out = subprocess.run(
        [_analyze(), "verify", str(_unit_for_this_venv(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


def test_unit_exposure_is_at_most_one_and_a_half() -> None:
    """`systemd-analyze security --offline=yes` gives an overall exposure ≤ 1.5."""
    out = subprocess.run(
        [_analyze(), "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for mailrouter\.service: (\d+\.\d+)", out.stdout)
    assert m is not None, out.stdout + out.stderr
    assert float(m.group(1)) <= BAR, out.stdout


def test_unit_keeps_the_service_contract() -> None:
    """Type=notify, SIGHUP for reload, a watchdog, a dedicated user, no capabilities."""
    lines = {line.strip() for line in UNIT.read_text("utf-8").splitlines()}
    for wanted in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=mailrouter",
        "StateDirectory=mailrouter",
        "CapabilityBoundingSet=",
        "NoNewPrivileges=true",
        # `mailrouter run` exits 2 on a config error (tests/test_cli.py): not retried.
        "RestartPreventExitStatus=2",
    ):
        assert wanted in lines, wanted
    assert any(line.startswith("WatchdogSec=") for line in lines)
