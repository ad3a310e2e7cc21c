"""Stage 4, what we tell the customer: the templated transfer notice and agent replies.

Pure functions: templates and a customer message in, raw RFC 5322 bytes and an envelope
out, threaded to the customer's message.  Sending them is the outbox's and deliver's job.
"""

from mailrouter.notify.compose import (
    Composed,
    NoticeSuppressed,
    compose_notice,
    compose_reply,
    reply_threading,
    suppression_reason,
)
from mailrouter.notify.preview import NoticePreview, preview_notice
from mailrouter.notify.templates import (
    RenderedNotice,
    TemplateError,
    check_templates,
    notice_variables,
    render_notice,
    reply_subject,
)

__all__ = [
    "Composed",
    "NoticePreview",
    "NoticeSuppressed",
    "RenderedNotice",
    "TemplateError",
    "check_templates",
    "compose_notice",
    "compose_reply",
    "notice_variables",
    "preview_notice",
    "render_notice",
    "reply_subject",
    "reply_threading",
    "suppression_reason",
]
