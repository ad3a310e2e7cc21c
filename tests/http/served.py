"""A real ``mailrouter run`` with ``[http]`` on, for the HTTP tests: started as a subprocess,
ready once ``/healthz`` answers, stopped with SIGTERM.

Its stderr goes to a file (a pipe nobody reads could fill up and stall the daemon); tests
read the log from there.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from helpers import config_text, subprocess_env
from mailrouter.config import Settings, load
from servers import free_port

__all__ = ["Served", "http_settings", "start", "wait_until"]


def http_settings(tmp_path: Path, *, http: str = "", **transfer: Any) -> Settings:
    """helpers' three accounts, with SMTP and HTTP on free loopback ports.

    ``http``: more lines for the ``[http]`` table.
    """
    text = config_text(tmp_path, **transfer).replace(
        "[smtp]\nenabled = false\n", f"[smtp]\nport = {free_port()}\n"
    )
    text += (
        f"\n[http]\nenabled = true\nport = {free_port()}\n{http}\n"
        "\n[outbox]\npoll_interval = 0.2\ninitial_backoff = 0.1\n"
        "\n[daemon]\nshutdown_timeout = 10\n"
    )
    path = tmp_path / "mailrouter.toml"
    path.write_text(text, "utf-8")
    return load(path, env={})


def wait_until(what: Callable[[], bool], within: float = 20.0, step: float = 0.05) -> bool:
    """Poll ``what`` until it is true or ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(step)
    return what()


def command() -> list[str]:
    exe = Path(sys.executable).parent / "mailrouter"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mailrouter"]


@dataclass
class Served:
    settings: Settings
    proc: subprocess.Popen[bytes]
    log_path: Path
    scheme: str = "http"
    verify: Any = True
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.settings.http.port}"

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(
            base_url=self.base_url, headers=headers, timeout=30, verify=self.verify, **kwargs
        )

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def answers(self) -> bool:
        try:
            with self.client() as c:
                return c.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


def start(settings: Settings, *, scheme: str = "http", verify: Any = True) -> Served:
    """``mailrouter run`` on ``settings``, returned once ``/healthz`` answers 200."""
    log_path = settings.state_dir.parent / f"daemon-{settings.http.port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [*command(), "-c", str(settings.config_path), "run"],
        env=subprocess_env(settings),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    served = Served(settings, proc, log_path, scheme, verify, log)
    try:
        if not wait_until(lambda: proc.poll() is not None or served.answers(), within=30):
            pytest.fail(f"the daemon did not answer /healthz within 30 s:\n{served.log()}")
        if proc.poll() is not None:
            pytest.fail(f"the daemon exited with {proc.returncode}:\n{served.log()}")
    except BaseException:
        served.close()
        raise
    return served
