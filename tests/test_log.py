"""The log shapes: one line per record in both formats, events as keys, foreign records too."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from helpers import make_settings, run_cli
from mailrouter.log import FOREIGN_EVENT, LogHandler, event, setup_logging
from mailrouter.store.migrate import head_revision

log = logging.getLogger("mailrouter.test")


def _lines(stream: io.StringIO) -> list[str]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return text[:-1].split("\n")


def _json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    out = [json.loads(line) for line in _lines(stream)]
    assert all(isinstance(obj, dict) and "event" in obj for obj in out), out
    return out


def _crash() -> None:
    raise RuntimeError("boom\nsecond line")


def test_kv_event_with_traceback_stays_on_one_line() -> None:
    """kv: an event with exc_info is one line; the traceback is an escaped exc= field."""
    stream = io.StringIO()
    setup_logging("kv", "INFO", stream)
    try:
        _crash()
    except RuntimeError:
        event(log, "stage-crashed", logging.ERROR, exc_info=True, stage="outbox", note="a b")
    [line] = _lines(stream)
    ts, level, logger, rest = line.split(" ", 3)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ts), ts
    assert (level, logger) == ("error", "mailrouter.test")
    assert rest.startswith('event=stage-crashed stage=outbox note="a b" exc="Traceback')
    assert "RuntimeError: boom\\nsecond line" in rest and rest.endswith('"')


def test_json_event_carries_fields_as_keys_and_traceback_in_exc() -> None:
    """json: event and fields are keys with their types; the traceback is the exc field."""
    stream = io.StringIO()
    setup_logging("json", "INFO", stream)
    try:
        _crash()
    except RuntimeError as exc:
        event(log, "routing-crashed", logging.ERROR, exc_info=exc, msgid="<a@b>", n=3, ok=False)
    [obj] = _json_lines(stream)
    assert (obj["event"], obj["level"], obj["logger"]) == ("routing-crashed", "error", log.name)
    assert (obj["msgid"], obj["n"], obj["ok"]) == ("<a@b>", 3, False)
    assert obj["exc"].startswith("Traceback") and "RuntimeError: boom" in obj["exc"]
    assert "message" not in obj


def test_json_field_named_like_a_base_key_is_kept_beside_it() -> None:
    """A field called level, ts or logger does not overwrite the record's own key."""
    stream = io.StringIO()
    setup_logging("json", "INFO", stream)
    event(log, "x", level="high", ts="t", logger="l", name="n")
    [obj] = _json_lines(stream)
    assert (obj["level_"], obj["ts_"], obj["logger_"], obj["name"]) == ("high", "t", "l", "n")
    assert (obj["event"], obj["level"], obj["logger"]) == ("x", "info", log.name)


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_other_libraries_records_get_the_same_shape(fmt: str) -> None:
    """aiosmtpd's mail.log and asyncio's records come out as event=log with the message."""
    stream = io.StringIO()
    setup_logging(fmt, "INFO", stream)
    logging.getLogger("mail.log").warning("%r unrecognised: %s", ("127.0.0.1", 4), "FOO")
    try:
        _crash()
    except RuntimeError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved\nfuture: x")
    lines = _lines(stream)
    assert len(lines) == 2
    if fmt == "json":
        smtp, loop = (json.loads(line) for line in lines)
        assert (smtp["event"], smtp["logger"]) == (FOREIGN_EVENT, "mail.log")
        assert smtp["message"] == "('127.0.0.1', 4) unrecognised: FOO"
        assert loop["message"] == "Task exception was never retrieved\nfuture: x"
        assert "RuntimeError: boom" in loop["exc"]
    else:
        assert lines[0].endswith(
            "warning mail.log event=log message=\"('127.0.0.1', 4) unrecognised: FOO\""
        )
        assert ' message="Task exception was never retrieved\\nfuture: x" exc="Trace' in lines[1]


def test_other_libraries_info_is_not_logged_but_ours_is() -> None:
    """Foreign loggers speak from WARNING up (aiosmtpd logs every connection at INFO)."""
    stream = io.StringIO()
    setup_logging("json", "DEBUG", stream)
    logging.getLogger("mail.log").info("Peer: ('127.0.0.1', 4)")
    logging.getLogger("alembic.runtime.migration").info("Running upgrade")
    event(log, "lmtp-delivered", logging.DEBUG, rcpt="a@b")
    assert [o["event"] for o in _json_lines(stream)] == ["lmtp-delivered"]


def test_python_warnings_go_through_the_formatter() -> None:
    """A warnings.warn() becomes one JSON object from py.warnings, not two stderr lines."""
    stream = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        setup_logging("json", "INFO", stream)
        warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    [obj] = _json_lines(stream)
    assert (obj["event"], obj["logger"], obj["level"]) == (FOREIGN_EVENT, "py.warnings", "warning")
    assert "DeprecationWarning: deprecated thing" in obj["message"]


def test_setup_twice_keeps_one_handler_and_leaves_others_alone() -> None:
    """Calling setup_logging again replaces its own handler, never someone else's."""
    other = logging.NullHandler()
    root = logging.getLogger()
    root.addHandler(other)
    try:
        first, second = io.StringIO(), io.StringIO()
        setup_logging("kv", "INFO", first)
        setup_logging("json", "INFO", second)
        ours = [h for h in root.handlers if isinstance(h, LogHandler)]
        assert len(ours) == 1 and other in root.handlers
        event(log, "ready")
        assert first.getvalue() == "" and json.loads(second.getvalue())["event"] == "ready"
    finally:
        root.removeHandler(other)


def test_record_names_the_caller_not_the_helper() -> None:
    """The record's file and function are where event() was called from."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        event(log, "here")
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)
    [record] = records
    assert (Path(record.pathname).name, record.funcName) == (
        "test_log.py",
        "test_record_names_the_caller_not_the_helper",
    )


def test_schema_upgrade_line_is_a_json_event(tmp_path: Path) -> None:
    """The defect: `db upgrade` under JSON logged {"message": "event=schema-upgrade …"}."""
    settings = make_settings(tmp_path)
    code, _, err = run_cli(settings, "--log-format", "json", "db", "upgrade")
    assert code == 0, err
    objs = [json.loads(line) for line in err.splitlines()]
    [upgrade] = [o for o in objs if o["event"] == "schema-upgrade"]

    assert (upgrade["from"], upgrade["to"], upgrade["logger"]) == (
        "empty",
        head_revision(),
        "mailrouter.store",
    )
    assert "message" not in upgrade


class _RaisesWhenCollected:
    def __del__(self) -> None:
        raise ValueError("in a finaliser")


def test_daemon_run_logs_what_python_would_print_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """daemon.run: an ignored finaliser error and an escaping exception are log events."""
    from mailrouter import daemon

    async def serve(self: daemon.Daemon) -> None:
        _RaisesWhenCollected()  # collected at once: "Exception ignored in …"
        raise RuntimeError("the loop died")

    monkeypatch.setattr(daemon.Daemon, "serve", serve)
    stream = io.StringIO()
    setup_logging("json", "INFO", stream)
    hook = sys.unraisablehook
    assert daemon.run(make_settings(tmp_path)) == 1
    assert sys.unraisablehook is hook  # put back once the daemon is done
    ignored, crashed = _json_lines(stream)
    assert (ignored["event"], ignored["level"]) == ("unraisable", "error")
    assert "ValueError: in a finaliser" in ignored["exc"]
    assert (crashed["event"], crashed["level"]) == ("crashed", "critical")
    assert "RuntimeError: the loop died" in crashed["exc"]


# --------------------------------------------------------------------------- journald


def _journal_env(path: Path) -> dict[str, str]:
    st = path.stat()
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_lines_to_the_journal_stream_carry_syslog_priorities(tmp_path: Path, fmt: str) -> None:
    """JOURNAL_STREAM names our stream: <7> debug, <6> info, <4> warning, <3> error, <2> crit."""
    path = tmp_path / "journal"
    with path.open("w", encoding="utf-8") as stream:
        setup_logging(fmt, "DEBUG", stream, env=_journal_env(path))
        for level in (
            logging.DEBUG,
            logging.INFO,
            logging.WARNING,
            logging.ERROR,
            logging.CRITICAL,
        ):
            event(log, "probe", level, level_name=logging.getLevelName(level))
    lines = path.read_text("utf-8").splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    if fmt == "json":  # journald strips the prefix; what remains is the JSON object
        assert [json.loads(line[3:])["event"] for line in lines] == ["probe"] * 5


def test_journal_stream_of_another_file_adds_no_prefix(tmp_path: Path) -> None:
    """JOURNAL_STREAM inherited while our stderr goes elsewhere: plain lines."""
    journal, other = tmp_path / "journal", tmp_path / "other"
    journal.touch()
    with other.open("w", encoding="utf-8") as stream:
        setup_logging("kv", "INFO", stream, env=_journal_env(journal))
        event(log, "probe", logging.WARNING)
    [line] = other.read_text("utf-8").splitlines()
    assert not line.startswith("<") and "event=probe" in line


def test_no_journal_stream_no_prefix(tmp_path: Path) -> None:
    """Without JOURNAL_STREAM (a terminal, a pipe, a file), lines are as before."""
    path = tmp_path / "log"
    with path.open("w", encoding="utf-8") as stream:
        setup_logging("kv", "INFO", stream, env={})
        event(log, "probe", logging.ERROR)
    [line] = path.read_text("utf-8").splitlines()
    assert line.split(" ")[1:3] == ["error", "mailrouter.test"]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("a\x00b", '"a\\x00b"'),
        ("\x1b[31mred\x1b[0m", '"\\x1b[31mred\\x1b[0m"'),
        ("del\x7f", '"del\\x7f"'),
        ("c1\x9b2J", '"c1\\x9b2J"'),
        ("line\u2028sep", '"line\\u2028sep"'),
        ("tab\there", '"tab\\there"'),
        ("plain-value", "plain-value"),
        ("Zoë", "Zoë"),
    ],
    ids=["nul", "esc", "del", "c1-csi", "u2028", "tab", "plain", "non-ascii"],
)
def test_kv_escapes_control_characters_in_values(value: str, shown: str) -> None:
    """kv: C0, DEL, C1 and line separators from mail are escapes, never raw bytes."""
    stream = io.StringIO()
    setup_logging("kv", "INFO", stream)
    event(log, "decision", subject=value)
    [line] = _lines(stream)
    assert line.endswith(f" event=decision subject={shown}")
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in line)


def test_json_escapes_control_characters_in_values() -> None:
    """json: the same values come out as JSON escapes; the line holds no raw control."""
    stream = io.StringIO()
    setup_logging("json", "INFO", stream)
    value = "a\x00\x1b[2J\x9b\u2028z"
    event(log, "decision", subject=value)
    [raw] = _lines(stream)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in raw)
    assert json.loads(raw)["subject"] == value
