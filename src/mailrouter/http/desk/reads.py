"""What the desk's pages show beyond the API's rows: how an interaction arrived in its
account, and the text of each message.

The rows themselves, and which of them an agent may see, come from
:mod:`mailrouter.agent_views` (the same calls as the API); this module only adds to
rows the agent was already given.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from email import message_from_bytes
from email.policy import compat32
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailrouter.agent_views import visible_detail
from mailrouter.agents import Agent
from mailrouter.store.models import Message, Transfer

__all__ = ["MAX_TEXT", "arrivals", "detail_with_text", "plain_text"]

MAX_TEXT = 100_000  # characters of a message's text shown on the page


def arrivals(s: Session, interaction_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """For each interaction that came by transfer: the latest transfer, which brought it
    to the account that owns it now (only a transfer changes the owner)."""
    ids = list(interaction_ids)
    if not ids:
        return {}
    latest: dict[int, dict[str, Any]] = {}
    for t in s.scalars(
        select(Transfer).where(Transfer.interaction_id.in_(ids)).order_by(Transfer.at, Transfer.id)
    ).unique():
        latest[t.interaction_id] = {"from": t.from_account.name, "by": t.actor, "at": t.at}
    return latest


def plain_text(raw: bytes) -> str | None:
    """The first text/plain part of a message that is not an attachment, decoded; None if
    it has none.  Lenient like the rest of ingest: a wrong charset is replaced, not fatal."""
    msg = message_from_bytes(raw, policy=compat32)
    for part in msg.walk():
        if part.is_multipart() or part.get_content_type() != "text/plain":
            continue
        if (part.get("Content-Disposition") or "").strip().lower().startswith("attachment"):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        charset = part.get_content_charset() or "us-ascii"
        try:
            codecs.lookup(charset)
        except LookupError:
            charset = "utf-8"
        text = payload.decode(charset, "replace").replace("\r\n", "\n")
        return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "\n[…]"
    return None


def detail_with_text(s: Session, agent: Agent, interaction_id: int) -> dict[str, Any]:
    """``show --json`` of an interaction the agent sees, each message with its ``text``."""
    detail = visible_detail(s, agent, interaction_id)
    raws = list(
        s.scalars(
            # The order of views.interaction_detail, so the two lists pair up.
            select(Message.raw)
            .where(Message.interaction_id == interaction_id)
            .order_by(Message.received_at, Message.id)
        )
    )
    if len(raws) == len(detail["messages"]):
        for message, raw in zip(detail["messages"], raws, strict=True):
            message["text"] = plain_text(raw)
    else:  # a message arrived between the two reads: show it on the next load
        for message in detail["messages"]:
            message.setdefault("text", None)
    return detail
