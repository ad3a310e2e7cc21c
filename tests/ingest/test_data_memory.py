"""Memory a big message used goes back to the operating system once it is freed."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from mailrouter.ingest.smtp import return_big_buffers

# Frees a 30 MiB buffer, then allocates and frees a 20 MiB one: what glibc kept of the
# second is what a daemon keeps after a big message.  Prints the resident growth.
SCRIPT = """
import sys
from pathlib import Path


def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024


if sys.argv[1] == "fixed":
    from mailrouter.ingest.smtp import return_big_buffers

    assert return_big_buffers()
base = rss()
first = b"x" * (30 << 20)
del first
second = b"y" * (20 << 20)
del second
print(rss() - base)
"""

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's allocator on Linux",
)


def _kept(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(out.stdout)


def test_freed_message_buffers_return_to_the_os() -> None:
    """With the threshold fixed, a freed 20 MiB buffer leaves no resident memory behind."""
    assert _kept("fixed") < 4 << 20


def test_without_the_fixed_threshold_glibc_keeps_them() -> None:
    """The control: glibc's own adjustment keeps the second buffer resident."""
    assert _kept("default") > 16 << 20


def test_an_operators_malloc_setting_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """MALLOC_MMAP_THRESHOLD_ in the environment wins: nothing is changed."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_big_buffers() is False
