"""sd_notify: our client in-process, and a real `mailrouter run` talking to a fake systemd."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest

from daemon_process import FakeSystemd, running_daemon
from mailrouter.systemd import Notifier, monotonic_usec, status_text, watchdog_interval

# --------------------------------------------------------------------------- the client


def test_notifier_without_notify_socket_is_a_no_op() -> None:
    """Outside systemd nothing is sent, and nothing fails."""
    n = Notifier(env={})
    assert not n.enabled
    assert not n.ready("accepting") and not n.watchdog()
    assert n.watchdog_interval is None


def test_notifier_sends_one_datagram_of_assignments(tmp_path: Path) -> None:
    """READY=1 and STATUS= in one datagram; a newline in a status cannot add a line."""
    systemd = FakeSystemd(tmp_path)
    try:
        n = Notifier(env={"NOTIFY_SOCKET": str(systemd.path)})
        assert n.ready("accepting;\nREADY=0 queue 3")
        m = systemd.wait_for(lambda m: True, within=5)
        assert m.fields == {"READY": "1", "STATUS": "accepting; READY=0 queue 3"}
        n.close()
    finally:
        systemd.close()


def test_notifier_reaches_an_abstract_socket() -> None:
    """NOTIFY_SOCKET=@name is the abstract namespace (systemd's own default)."""
    name = f"mailrouter-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        n = Notifier(env={"NOTIFY_SOCKET": f"@{name}"})
        assert n.stopping()
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
        n.close()


def test_reloading_carries_clock_monotonic_in_microseconds(tmp_path: Path) -> None:
    """RELOADING=1 with MONOTONIC_USEC from CLOCK_MONOTONIC, as systemd compares it."""
    systemd = FakeSystemd(tmp_path)
    try:
        n = Notifier(env={"NOTIFY_SOCKET": str(systemd.path)})
        before = monotonic_usec()
        n.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        m = systemd.wait_for(lambda m: True, within=5)
        assert m.fields["RELOADING"] == "1"
        assert before <= int(m.fields["MONOTONIC_USEC"]) <= after
        n.close()
    finally:
        systemd.close()


def test_a_dead_notify_socket_does_not_stop_the_daemon(tmp_path: Path) -> None:
    """Nobody bound at NOTIFY_SOCKET: the send fails quietly (one warning), no exception."""
    n = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert not n.ready() and not n.watchdog()
    n.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "1000000"}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_watchdog_usec_for_our_pid_only(
    env: dict[str, str], expected: float | None
) -> None:
    """sd_watchdog_enabled(3): half of WATCHDOG_USEC, if WATCHDOG_PID is unset or ours."""
    assert watchdog_interval(env, pid=4242) == expected


def test_status_text_is_short_and_names_what_is_wrong() -> None:
    """One line: phase, queue depth, failures, each watcher ok or its state."""
    text = status_text(
        "accepting",
        {"pending": 2, "sending": 1, "failed": 1},
        {"support": "reconnect-backoff", "sales": "idle"},
        reload_refused=True,
    )
    assert text == (
        "accepting; queue 3; failed 1; imap sales ok, support reconnect-backoff; "
        "last reload refused (see log)"
    )
    assert status_text("running", None, {}) == "running; queue ?"


# --------------------------------------------------------------------------- `mailrouter run`


def test_ready_once_listening_with_a_status_line(tmp_path: Path) -> None:
    """READY=1 comes after the SMTP port is bound, with STATUS=accepting; queue 0."""
    with running_daemon(tmp_path) as d:
        [ready] = [m for m in d.systemd.messages if m.fields.get("READY") == "1"]
        assert ready.fields["STATUS"] == "accepting; queue 0"
        with socket.create_connection(("127.0.0.1", d.settings.smtp.port), timeout=5) as c:
            assert c.recv(512).startswith(b"220 ")
        assert d.stop() == 0


def test_sighup_brackets_the_reload_with_reloading_and_ready(tmp_path: Path) -> None:
    """SIGHUP: RELOADING=1 + MONOTONIC_USEC (now, on CLOCK_MONOTONIC), then READY=1."""
    with running_daemon(tmp_path) as d:
        seen = len(d.systemd.messages)
        before = monotonic_usec()
        d.signal(signal.SIGHUP)
        reloading = d.systemd.wait_for(lambda m: "RELOADING" in m.fields, after=seen)
        assert reloading.fields["RELOADING"] == "1"
        assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= monotonic_usec()
        index = d.systemd.messages.index(reloading)
        ready = d.systemd.wait_for(lambda m: m.fields.get("READY") == "1", after=index + 1)
        assert ready.fields["STATUS"].startswith("accepting; queue 0")
        d.err.wait_for(lambda e: e["event"] == "reloaded")
        assert d.stop() == 0


def test_sigterm_says_stopping_then_exits_zero(tmp_path: Path) -> None:
    """SIGTERM: STOPPING=1 (with a status saying so) before the drain, exit status 0."""
    with running_daemon(tmp_path) as d:
        seen = len(d.systemd.messages)
        d.signal(signal.SIGTERM)
        stopping = d.systemd.wait_for(lambda m: "STOPPING" in m.fields, after=seen)
        assert stopping.fields["STOPPING"] == "1"
        assert stopping.fields["STATUS"].startswith("stopping")
        assert d.proc.wait(timeout=30) == 0
        d.err.rest()
        assert [e["event"] for e in d.err.events()][-2:] == ["stopping", "stopped"]


def test_watchdog_pings_every_half_watchdog_usec(tmp_path: Path) -> None:
    """WATCHDOG_USEC=1 s, WATCHDOG_PID = the daemon's own: WATCHDOG=1 about every 0.5 s."""
    # sh exec's mailrouter, so $$ is the daemon's pid: the case systemd sets up.
    wrap = ["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh"]
    with running_daemon(tmp_path, env={"WATCHDOG_USEC": "1000000"}, wrap=wrap) as d:
        first = d.systemd.wait_for(lambda m: m.fields.get("WATCHDOG") == "1")
        window = 3.0
        pings = [m for m in d.systemd.collect(window) if m.fields.get("WATCHDOG") == "1"]
        # 6 expected; generous either way, for a loaded machine.
        assert 3 <= len(pings) <= 9, [round(p.at - first.at, 2) for p in pings]
        gaps = [b.at - a.at for a, b in zip([first, *pings], pings, strict=False)]
        assert max(gaps) < 1.0, gaps  # never as long as WATCHDOG_USEC itself
        assert d.stop() == 0


def test_watchdog_meant_for_another_pid_is_not_ours(tmp_path: Path) -> None:
    """WATCHDOG_PID names another process: no WATCHDOG=1 at all, while the daemon runs."""
    env = {"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}
    with running_daemon(tmp_path, env=env) as d:
        window = d.systemd.collect(1.5)  # six intervals of 0.25 s
        d.signal(signal.SIGHUP)  # the loop is alive and talking: it answers a reload
        d.systemd.wait_for(lambda m: "RELOADING" in m.fields)
        assert d.stop() == 0
    assert not [m for m in [*window, *d.systemd.messages] if "WATCHDOG" in m.fields]


def test_log_lines_carry_journal_priorities_under_journal_stream(tmp_path: Path) -> None:
    """JOURNAL_STREAM = our stderr's device:inode: every line starts <N> (6 info, 4 warning)."""
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    try:
        with running_daemon(tmp_path, env=env, stderr=write_end) as d:
            os.close(write_end)
            write_end = -1
            assert d.stop() == 0
        with os.fdopen(read_end, encoding="utf-8") as stream:
            read_end = -1
            lines = stream.read().splitlines()
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    assert lines and all(line[:3] in ("<6>", "<4>", "<3>") for line in lines), lines
    ready = next(line for line in lines if '"event": "ready"' in line)
    assert ready.startswith('<6>{"ts"')
