"""A transfer notice as a customer would get it, for a sample customer: the desk's preview.

The very code a transfer runs (:func:`~mailrouter.notify.compose.compose_notice`: the
template in its sandbox, undefined names as errors, the threading headers), with the
sample message ``check-config`` renders against instead of a real customer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage

from mailrouter.config import AccountSettings, Settings
from mailrouter.notify.compose import compose_notice
from mailrouter.notify.templates import TemplateError, sample_customer

__all__ = ["SAMPLE_INTERACTION", "NoticePreview", "preview_notice"]

SAMPLE_INTERACTION = 1234


@dataclass(frozen=True)
class NoticePreview:
    """The header fields a customer sees, and the parts of the body."""

    headers: list[tuple[str, str]]
    text: str
    html: str | None


def _parts(msg: EmailMessage) -> tuple[str, str | None]:
    text_part = msg.get_body(("plain",))
    html_part = msg.get_body(("html",))
    text = str(text_part.get_content()) if text_part is not None else ""
    html = str(html_part.get_content()) if html_part is not None else None
    return text.replace("\r\n", "\n"), html.replace("\r\n", "\n") if html is not None else None


def preview_notice(
    settings: Settings,
    *,
    from_account: AccountSettings,
    to_account: AccountSettings,
    agent: str | None,
    now: datetime | None = None,
) -> NoticePreview:
    """The notice a transfer from ``from_account`` to ``to_account`` would send the sample
    customer; raises :class:`TemplateError` when the template fails (or none is set)."""
    template = from_account.transfer.template
    if not template:
        key = f"accounts.{from_account.name}.transfer.template"
        raise TemplateError(str(settings.config_path), f"no template set ({key})")
    composed = compose_notice(
        settings,
        template=template,
        from_account=from_account,
        to_account=to_account,
        customer=sample_customer(),
        interaction_id=SAMPLE_INTERACTION,
        agent=agent,
        now=now or datetime.now(UTC),
    )
    # Our own freshly composed message: the strict modern parser is safe on it.
    msg = message_from_bytes(composed.raw, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    shown = ("From", "To", "Subject", "In-Reply-To", "Auto-Submitted")
    headers = [(name, str(msg[name])) for name in shown if msg[name] is not None]
    text, html = _parts(msg)
    return NoticePreview(headers, text, html)
