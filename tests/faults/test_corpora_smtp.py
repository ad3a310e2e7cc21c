"""Every third-party corpus message through the SMTP listener of a real daemon: no crash,
no hang; each is accepted (routed, or held with a reason) or refused with a specific
5xx code and a log line (issue 9, hostile input 7).

Sent as an MTA would: bare LF line ends become CRLF; bare CR is left alone, so the CR-only
files arrive as one long line.  Included on purpose: the 210 KB Subject, the 3,038-part
message, the CR-only copies, the empty mailbox files and the duplicate Message-IDs.
"""

from __future__ import annotations

import re
import smtplib
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from chaos import DaemonProcess, free_port, outbox_open, state_paths, wait_until, write_config

from mailrouter.ingest.replay import collect
from mailrouter.parse import content_hash

pytestmark = pytest.mark.corpora

SESSIONS = 4
TIMEOUT = 120.0  # per SMTP command: far above the slowest message's few seconds
_BARE_LF = re.compile(rb"(?<!\r)\n")


def as_sent(raw: bytes) -> bytes:
    """The bytes an MTA puts on the wire for ``raw`` (what the daemon then stores)."""
    wire = _BARE_LF.sub(b"\r\n", raw)
    return wire if wire.endswith(b"\r\n") else wire + b"\r\n"


def send_all(port: int, raws: list[bytes], out: list[tuple[int, str] | None]) -> None:
    """One session per thread, reused; each result is the final reply to that message."""
    conn: smtplib.SMTP | None = None
    for i, raw in enumerate(raws):
        if out[i] is not None:
            continue
        try:
            if conn is None:
                conn = smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT)
                conn.ehlo("corpus.test")
            conn.sendmail("sender@corpus.test", ["sales@example.test"], as_sent(raw))
            out[i] = (250, "")
        except smtplib.SMTPResponseException as exc:
            out[i] = (exc.smtp_code, exc.smtp_error.decode("utf-8", "replace"))
        except (OSError, smtplib.SMTPException) as exc:
            out[i] = (0, f"{type(exc).__name__}: {exc}")  # a drop or a hang: a failure
            conn = None
    if conn is not None:
        conn.quit()


def test_every_corpus_message_through_smtp_is_accepted_or_refused_cleanly(
    corpora: Path, tmp_path: Path
) -> None:
    """~1,250 messages from every corpus, 4 sessions: 250 (stored or held with a reason)
    or 5xx with a log line; the daemon never crashes, never hangs, stays up."""
    items = list(collect(sorted(d for d in corpora.iterdir() if d.is_dir())))
    origins = [i.origin for i in items]
    for needed in (
        "flanker/long-header.eml",  # 210 KB Subject
        "flanker/enclosed-endless.eml",  # 3,038 parts
        "sisimai/maildir/mac/",  # CR-only line ends
        "sisimai/mailbox/size-0",  # an empty file
        "notmuch/duplicate/",  # one Message-ID, different messages
    ):
        assert any(needed in o for o in origins), f"corpus lost {needed}"
    port = free_port()
    config = write_config(tmp_path, smtp_port=port, names=("sales", "support"))
    db, _ = state_paths(tmp_path)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    daemon.start()
    raws = [i.raw for i in items]
    results: list[tuple[int, str] | None] = [None] * len(raws)
    try:
        daemon.wait_ready()
        began = time.monotonic()
        lanes = [list(range(k, len(raws), SESSIONS)) for k in range(SESSIONS)]
        outs = [[None] * len(lane) for lane in lanes]
        threads = [
            threading.Thread(
                target=send_all, args=(port, [raws[i] for i in lane], out), daemon=True
            )
            for lane, out in zip(lanes, outs, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
            assert not t.is_alive(), "a session hung"
        for lane, out in zip(lanes, outs, strict=True):
            for i, r in zip(lane, out, strict=True):
                results[i] = r
        took = time.monotonic() - began
        assert daemon.alive, daemon.tail()
        # Still serving: a plain message right after the corpus is accepted.
        with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as c:
            c.sendmail("a@corpus.test", ["sales@example.test"], b"Subject: ok\r\n\r\nok\r\n")
        wait_until(lambda: outbox_open(db) == 0, 300, "every accepted message delivered")
        assert daemon.stop() == 0
    finally:
        if daemon.alive:
            daemon.kill()

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = conn.execute("SELECT content_hash, status, hold_reason, rule FROM messages").fetchall()
    failed = conn.execute("SELECT count(*) FROM outbox WHERE status != 'sent'").fetchone()[0]
    conn.close()
    stored = {h for h, *_ in rows}
    log = daemon.lines
    refusal_lines = Counter(
        m.group(1) for line in log if (m := re.search(r"event=refused .*reply=\"?([0-9]{3})", line))
    )
    codes: Counter[int] = Counter()
    refused: Counter[str] = Counter()
    for item, result in zip(items, results, strict=True):
        assert result is not None
        code, text = result
        codes[code] += 1
        if code == 250:
            assert content_hash(as_sent(item.raw)) in stored, f"{item.origin}: 250, not stored"
        else:
            assert 500 <= code < 600 and text, f"{item.origin}: {code} {text}"
            refused[str(code)] += 1
    # Every refusal left a line in the log, with its code.
    for code, count in refused.items():
        assert refusal_lines[code] >= count, (code, count, refusal_lines)
    held = [r for r in rows if r[1] == "held"]
    assert held and all(reason for _h, _s, reason, _r in held), "held without a reason"
    assert not [r for r in rows if r[3] == "internal-error"], "routing crashed on a message"
    assert failed == 0
    crashes = [line for line in log if " error " in line or " critical " in line]
    assert not crashes, crashes[:5]
    by_origin = dict(zip(origins, results, strict=True))
    assert by_origin[next(o for o in origins if o.endswith("flanker/long-header.eml"))] == (250, "")
    assert by_origin[next(o for o in origins if o.endswith("enclosed-endless.eml"))] == (250, "")
    print(f"corpora over SMTP: {len(items)} messages in {took:.0f} s: {dict(codes)}; "
          f"held {len(held)}; refusals logged {dict(refusal_lines)}")  # fmt: skip
