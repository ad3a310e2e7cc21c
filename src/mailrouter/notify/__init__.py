"""Stage 4, what we tell the customer: the templated transfer notice and agent replies.

Pure functions: templates and a customer message in, raw RFC 5322 bytes and an envelope
out, threaded to the customer's message.  Sending them is the outbox's and deliver's job.
"""

from mailrouter.notify.compose import (
    Composed,
    NoticeSuppressed,
    answer_address,
    compose_notice,
    compose_reply,
    own_addresses,
    reply_threading,
    subject_token,
    suppression_reason,
)
from mailrouter.notify.preview import NoticePreview, preview_notice
from mailrouter.notify.templates import (
    RenderedNotice,
    RenderLimits,
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
    "RenderLimits",
    "RenderedNotice",
    "TemplateError",
    "answer_address",
    "check_templates",
    "compose_notice",
    "compose_reply",
    "notice_variables",
    "own_addresses",
    "preview_notice",
    "render_notice",
    "reply_subject",
    "reply_threading",
    "subject_token",
    "suppression_reason",
]
