"""The built wheel works outside the repository: ``pip install`` of it, then
``mailrouter --version``, ``check-config`` on a config without a template directory (the
packaged templates), ``db upgrade`` (the packaged migrations), and a transfer whose notice
is rendered from the packaged template.

The wheel is built from a copy of the source (no build isolation: the dev environment's
setuptools, offline) and installed into a fresh virtual environment in a temporary
directory.  That environment finds the dependencies in this one's site-packages through
a ``.pth`` line — which adds the directory to ``sys.path`` without processing the
``.pth`` files in it, so the editable install of the repository is *not* importable
there, and every command runs the installed wheel (checked: ``mailrouter.__file__``).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import need
from helpers import ROOT, SCENARIOS
from mailrouter import __version__

PACKAGE = ROOT / "src" / "mailrouter"


def _setuptools_version() -> tuple[int, ...]:
    try:
        import setuptools
    except ImportError:
        return (0,)
    return tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())


@dataclass
class Installed:
    venv: Path
    wheel: Path
    home: Path  # a directory outside the repository, the commands' working directory

    @property
    def mailrouter(self) -> str:
        return str(self.venv / "bin" / "mailrouter")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("MAILROUTER_", "PYTHON", "VIRTUAL_ENV"))
        }
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        done = subprocess.run(
            [*args], cwd=self.home, env=env, capture_output=True, text=True, timeout=120
        )
        if check:
            assert done.returncode == 0, f"{args}: {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done


def _copy_source(target: Path) -> None:
    """What the wheel is built from, without caches and build leftovers of the work tree."""
    target.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, target / name)
    shutil.copytree(
        PACKAGE,
        target / "src" / "mailrouter",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    need(_setuptools_version() >= (77,), "setuptools>=77 (the dev extra) builds the wheel")
    base = tmp_path_factory.mktemp("packaging")
    source, dist, venv, home = base / "source", base / "dist", base / "venv", base / "home"
    _copy_source(source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, source],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = dist.glob("mailrouter-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    new_site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    # The dependencies: this environment's site-packages, as plain sys.path entries.
    (new_site / "_deps_from_dev_env.pth").write_text(
        "\n".join(p for p in site.getsitepackages() if Path(p).is_dir()) + "\n", "utf-8"
    )
    subprocess.run(
        [*pip, "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index", wheel],
        check=True,
        capture_output=True,
        timeout=300,
    )
    home.mkdir()
    return Installed(venv, wheel, home)


def test_wheel_carries_every_file_of_the_package(installed: Installed) -> None:
    """Every file under src/mailrouter (migrations, templates, py.typed …) is in the wheel:
    a data file added without its package-data line fails here, not in production."""
    with zipfile.ZipFile(installed.wheel) as whl:
        packed = {name for name in whl.namelist() if name.startswith("mailrouter/")}
    on_disk = {
        "mailrouter/" + p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and p.suffix != ".pyc"
        and not p.name.startswith(".")  # .keep placeholders
    }
    assert on_disk - packed == set()
    assert {
        "mailrouter/store/migrations/env.py",
        "mailrouter/store/migrations/script.py.mako",
        "mailrouter/templates/transfer_notice.txt.j2",
        "mailrouter/py.typed",
    } <= packed


def write_config(home: Path) -> Path:
    """A small production-like config: no [templates] table, schema upgrades by hand."""
    state = home / "state"
    config = home / "mailrouter.toml"
    config.write_text(
        f"""\
state_dir = "{state}"
hostname = "mailrouter.example.test"

[database]
url = "sqlite:///mailrouter.db"
auto_upgrade = false

[smtp]
enabled = false

[outbound]
type = "pickup"
path = "pickup"

[accounts.sales]
address = "sales@example.test"
  [accounts.sales.transfer]
  enabled = true
  notify = true
  template = "transfer_notice"

[accounts.support]
address = "support@example.test"
""",
        "utf-8",
    )
    return config


def test_installed_wheel_runs_outside_the_repository(installed: Installed) -> None:
    """--version; check-config finds the packaged templates; db upgrade finds the packaged
    migrations; a transfer renders its notice from the packaged template."""
    i = installed
    where = i.run(
        str(i.venv / "bin" / "python"), "-c", "import mailrouter; print(mailrouter.__file__)"
    )
    assert Path(where.stdout.strip()).is_relative_to(i.venv), where.stdout
    assert not Path(where.stdout.strip()).is_relative_to(ROOT)

    assert i.run(i.mailrouter, "--version").stdout.strip() == f"mailrouter {__version__}"
    assert i.wheel.name.startswith(f"mailrouter-{__version__}-")

    config = write_config(i.home)
    checked = json.loads(i.run(i.mailrouter, "-c", str(config), "check-config", "--json").stdout)
    assert checked["ok"] is True and checked["problems"] == []
    template_dir = Path(checked["settings"]["template_dir"])
    assert template_dir.is_relative_to(i.venv) and template_dir.name == "templates"
    assert (template_dir / "transfer_notice.txt.j2").is_file()

    # auto_upgrade = false: nothing works until the schema is upgraded by hand.
    refused = i.run(i.mailrouter, "-c", str(config), "interactions", check=False)
    assert refused.returncode != 0 and "mailrouter db upgrade" in refused.stderr
    daemon = i.run(i.mailrouter, "-c", str(config), "run", check=False)
    assert daemon.returncode == 2, daemon.stderr  # "cannot start", not a crash
    assert "mailrouter: cannot start: database schema is at nothing" in daemon.stderr
    assert "Traceback" not in daemon.stderr
    upgraded = i.run(i.mailrouter, "-c", str(config), "db", "upgrade").stdout
    assert upgraded.startswith("schema: empty -> "), upgraded
    current = i.run(i.mailrouter, "-c", str(config), "db", "current").stdout
    head = upgraded.strip().rsplit(" ", 1)[1]
    assert current.strip() == f"schema: {head} (this version needs {head})"

    question = SCENARIOS / "chairs-quote" / "01-customer-asks.eml"
    i.run(i.mailrouter, "-c", str(config), "ingest", "--account", "sales", str(question))
    moved = i.run(i.mailrouter, "-c", str(config), "transfer", "1", "--to", "support").stdout
    assert "notice queued" in moved
    [notice] = (i.home / "state" / "pickup").glob("*.eml")
    text = notice.read_bytes()
    assert b"From: support@example.test" in text and b"Auto-Submitted: auto-generated" in text
