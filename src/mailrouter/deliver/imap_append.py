"""Deliver a message into an account's IMAP mailbox with APPEND, at most once per Message-ID.

The session itself (timeouts, TLS, LOGIN, aioimaplib's traps) is :mod:`mailrouter.imapclient`;
this module only decides what to send and whose fault a failure is.
"""

from __future__ import annotations

import logging
import re
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from mailrouter import imapclient
from mailrouter.config import DeliverySettings
from mailrouter.deliver.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailrouter.imapclient import ImapError, ImapSession
from mailrouter.log import event

__all__ = ["deliver_imap"]

log = logging.getLogger("mailrouter.deliver.imap")

_EOL = re.compile(rb"\r\n|\r|\n")
# Response codes (RFC 5530, RFC 7889) that say "this message can never be stored": the
# message is at fault, so retrying is pointless and the outbox should record a failure.
# Not CANNOT: Dovecot answers APPEND to an invalid mailbox name with it, and a mailbox name
# is the account's setup, which ops can fix.
_PERMANENT_CODES = {"TOOBIG", "LIMIT", "PARSE"}


# --------------------------------------------------------------------------- delivering


async def deliver_imap(
    settings: DeliverySettings, raw: bytes, *, message_id: str, flags: str = ""
) -> str:
    """APPEND ``raw`` to ``settings.mailbox`` unless a message with ``message_id`` is there;
    returns the server's reply (or why nothing was appended).

    Idempotent so that a crash between APPEND and the outbox bookkeeping never stores a
    second copy: the mailbox is searched for the Message-ID first and the hits are compared
    exactly (IMAP SEARCH matches substrings, case-insensitively).  The mailbox is created
    when missing.  ``flags`` is an IMAP flag list such as ``\\Seen`` (empty: unread).
    Two deliveries of the same message running *at the same time* can still both append;
    the outbox's lease makes that rare.

    Classification, by whose fault the failure is:

    * the message's — BAD, or NO with TOOBIG/LIMIT/PARSE: permanent, since no
      retry can store it;
    * the account's or server's — LOGIN refused, mailbox neither selectable nor
      creatable, quota full, other NO, timeouts, lost connections: temporary, so queued
      mail flows by itself once ops fix the password, mailbox or quota (the outbox
      lifetime still bounds the wait).  Such failures are logged loudly.
    """
    if not settings.user or settings.password is None:
        raise TemporaryDeliveryError("IMAP delivery has no user/password configured")
    # IMAP literals are RFC 5322 messages: CRLF line ends (Cyrus rejects bare LF).
    message = _EOL.sub(b"\r\n", raw)
    key = _id_core(message_id)
    if not key:
        event(
            log,
            "imap-no-message-id",
            logging.WARNING,
            mailbox=settings.mailbox,
            risk="duplicates cannot be detected",
        )
    elif _id_core(_header(message, "Message-ID")) != key:
        event(
            log,
            "imap-message-id-mismatch",
            logging.WARNING,
            msgid=message_id,
            risk="not the message's own Message-ID, duplicates cannot be detected later",
        )
    try:
        session = await imapclient.connect(settings)
        try:
            return await _append(session, settings, message, message_id, key, flags)
        finally:
            await session.close()
    except ImapError as exc:
        # Whatever went wrong with the session itself, a new one later may well succeed.
        raise TemporaryDeliveryError(str(exc)) from exc


async def _append(
    session: ImapSession,
    settings: DeliverySettings,
    message: bytes,
    message_id: str,
    key: str,
    flags: str,
) -> str:
    client = session.client
    name = settings.mailbox
    mailbox = imapclient.mailbox_arg(name)
    response = await session.run(client.select(mailbox), f"SELECT {name}")
    if response.result == "OK":
        if key and await _already_there(session, key):
            event(log, "imap-duplicate-skipped", mailbox=name, msgid=message_id)
            return f"already in {name} (a copy with this Message-ID): not appended again"
    else:
        # Dovecot answers a plain NO for a missing mailbox (no [NONEXISTENT]), so try
        # to create it; a new mailbox cannot hold a copy, so no search is needed.
        await _create(session, name, imapclient.response_text(response))

    append = client.append(message, mailbox=mailbox, flags=flags or None)
    response = await session.run(append, "APPEND")
    if response.result == "NO" and imapclient.response_code(response) == "TRYCREATE":
        # Deleted between SELECT and APPEND (RFC 3501 §6.3.11): create once, retry once.
        await _create(session, name, imapclient.response_text(response))
        append = client.append(message, mailbox=mailbox, flags=flags or None)
        response = await session.run(append, "APPEND")
    _classify_append(response, f"{settings.host}:{settings.port}", name)
    text = imapclient.response_text(response)
    event(log, "imap-appended", mailbox=name, msgid=message_id, reply=text)
    return f"OK {text}"


async def _create(session: ImapSession, name: str, why: str) -> None:
    response = await session.run(
        session.client.create(imapclient.mailbox_arg(name)), f"CREATE {name}"
    )
    if response.result == "OK":
        event(log, "imap-mailbox-created", mailbox=name)
        return
    # It exists but cannot be selected, or cannot be created: the account's setup is wrong
    # (name, permissions).  Temporary — see deliver_imap — and loud.
    text = imapclient.response_text(response)
    event(log, "imap-mailbox-unusable", logging.ERROR, mailbox=name, select=why, create=text)
    raise TemporaryDeliveryError(f"IMAP mailbox {name} unusable: {why}; CREATE: {text}")


async def _already_there(session: ImapSession, key: str) -> bool:
    """Whether the selected mailbox holds a message whose Message-ID is exactly ``key``."""
    client = session.client
    response = await session.run(
        client.uid_search("HEADER", "Message-ID", imapclient.quoted(key)), "UID SEARCH"
    )
    if response.result != "OK":
        # Appending blindly could duplicate; the server is unwell anyway, so retry later.
        raise TemporaryDeliveryError(
            f"IMAP UID SEARCH failed: {imapclient.response_text(response)}"
        )
    uids = imapclient.search_uids(response)
    if not uids:
        return False
    # SEARCH HEADER is a case-insensitive substring match: <a@b> also finds <A@B.c>.
    # Skipping delivery on such a near miss would lose mail, so compare exactly.
    fetch = client.uid("fetch", ",".join(map(str, uids)), "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    response = await session.run(fetch, "UID FETCH")
    if response.result != "OK":
        raise TemporaryDeliveryError(f"IMAP UID FETCH failed: {imapclient.response_text(response)}")
    return any(
        _id_core(_header(head, "Message-ID")) == key
        for head in imapclient.fetched_literals(response).values()
    )


def _classify_append(response: Any, where: str, mailbox: str) -> None:
    if response.result == "OK":
        return
    text = imapclient.response_text(response)
    msg = f"IMAP {where} APPEND to {mailbox}: {response.result} {text}"
    code = imapclient.response_code(response)
    if response.result == "BAD" or code in _PERMANENT_CODES:
        # BAD: the server rejects our command as sent (size, syntax) — deterministic.
        raise PermanentDeliveryError(msg)
    if code == "OVERQUOTA":
        event(log, "imap-over-quota", logging.ERROR, server=where, mailbox=mailbox, reply=text)
    raise TemporaryDeliveryError(msg)


# --------------------------------------------------------------------------- helpers


def _header(message: bytes, name: str) -> str:
    """One header of ``message``, parsed leniently (compat32 never raises on odd ids)."""
    value = BytesHeaderParser(policy=compat32).parsebytes(message).get(name)
    return str(value) if value is not None else ""


def _id_core(message_id: str) -> str:
    """``<abc@example>`` -> ``abc@example``: unfolded, trimmed, without the angle brackets."""
    core = re.sub(r"\s+", "", message_id)
    if core.startswith("<") and core.endswith(">"):
        core = core[1:-1]
    return core
