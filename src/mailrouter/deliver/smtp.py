"""Send mailrouter's own mail (notices, agent replies) out through an SMTP smarthost.

aiosmtplib does the protocol; this module decides TLS and AUTH from the settings and turns
every outcome into "delivered (maybe to fewer recipients)", "retry" or "give up".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import NamedTuple

import aiosmtplib

from mailrouter.config import OutboundSettings, client_ssl_context
from mailrouter.deliver.errors import PermanentDeliveryError, TemporaryDeliveryError
from mailrouter.log import event

__all__ = ["SmtpResult", "send_smtp", "submit_smtp"]

log = logging.getLogger("mailrouter.deliver.smtp")

_HAS_CODE = re.compile(r"\d{3}(?: |$)")

# Connection refused or lost, timeouts, a failed TLS handshake (SMTPConnectError): the
# network's or the smarthost's trouble, worth a retry.
_NETWORK_ERRORS = (
    aiosmtplib.SMTPConnectError,
    aiosmtplib.SMTPServerDisconnected,
    aiosmtplib.SMTPTimeoutError,
    OSError,
)


class SmtpResult(NamedTuple):
    """What the smarthost said: recipients it refused, and its reply to the message."""

    refused: dict[str, tuple[int, str]]
    reply: str  # "250 2.0.0 Ok: queued as …"


async def send_smtp(
    settings: OutboundSettings, raw: bytes, *, envelope_from: str, envelope_to: list[str]
) -> dict[str, tuple[int, str]]:
    """Send ``raw`` to ``envelope_to``; return the recipients the smarthost refused.

    :func:`submit_smtp` without the smarthost's reply (see there).
    """
    result = await submit_smtp(settings, raw, envelope_from=envelope_from, envelope_to=envelope_to)
    return result.refused


async def submit_smtp(
    settings: OutboundSettings, raw: bytes, *, envelope_from: str, envelope_to: list[str]
) -> SmtpResult:
    """Send ``raw`` to ``envelope_to``; return the refused recipients and the final reply.

    Returns normally when at least one recipient was accepted — the message is then on
    its way to those, and the refused ones come back as ``{address: (code, text)}`` for
    the caller to record (or to retry the 4xx ones).  Raises
    :class:`PermanentDeliveryError` when the smarthost refuses the message with a 5xx
    (at MAIL, at DATA, or for every recipient), and :class:`TemporaryDeliveryError` on
    4xx, timeouts and connection failures — and when every recipient was refused but at
    least one only temporarily, because a retry can still reach that one.

    Failures of *our* setup — STARTTLS not offered although configured, AUTH refused —
    are temporary even when the reply is 5xx: a password is the operator's to fix, and
    the notice should go out once it is fixed instead of being recorded as undeliverable.
    ``envelope_from`` may be ``""`` (null reverse-path).
    """
    if not envelope_to:
        raise ValueError("send_smtp needs at least one recipient")
    where = f"{settings.host}:{settings.port}"
    client = aiosmtplib.SMTP(
        hostname=settings.host,
        port=settings.port,
        timeout=settings.timeout,  # aiosmtplib bounds every read and write with it
        local_hostname=settings.helo_name,
        use_tls=settings.tls == "tls",
        # False, not None: None would upgrade opportunistically, and tls = "none" means a
        # loopback smarthost where a failing opportunistic upgrade would only get in the way.
        start_tls=settings.tls == "starttls",
        tls_context=client_ssl_context(settings.tls_ca_file),
    )
    transport: asyncio.BaseTransport | None = None
    try:
        try:
            # aiosmtplib bounds each command; this also bounds the EHLO name lookup and
            # the TLS handshake as a whole.
            await asyncio.wait_for(client.connect(), settings.timeout)
            if settings.user and settings.password is not None:
                login = client.login(settings.user, settings.password.get())
                await asyncio.wait_for(login, settings.timeout)
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()
        except (aiosmtplib.SMTPResponseException, *_NETWORK_ERRORS) as exc:
            if not isinstance(exc, aiosmtplib.SMTPAuthenticationError):
                raise  # classified by reply code or as a network failure, below
            _log_setup_failure(where, settings.user, exc)
            raise TemporaryDeliveryError(f"SMTP {where}: {exc}") from exc
        except aiosmtplib.SMTPException as exc:
            # STARTTLS configured but not offered, AUTH not offered: our setup, not this
            # message — and never a reason to send in clear text or unauthenticated.
            _log_setup_failure(where, settings.user, exc)
            raise TemporaryDeliveryError(f"SMTP {where}: {exc}") from exc

        options = []
        if client.supports_extension("8bitmime") and any(b > 0x7F for b in raw):
            options.append("BODY=8BITMIME")
        if not all(a.isascii() for a in (envelope_from, *envelope_to)):
            # aiosmtplib raises SMTPNotSupported when the server lacks SMTPUTF8: that
            # address can never pass this smarthost, hence permanent below.
            options.append("SMTPUTF8")
        try:
            refused, reply = await client.sendmail(
                envelope_from, envelope_to, raw, mail_options=options
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            every = {r.recipient: (r.code, r.message) for r in exc.recipients}
            detail = "; ".join(f"<{a}> {c} {m}" for a, (c, m) in every.items())
            if any(400 <= c < 500 for c, _ in every.values()):
                raise TemporaryDeliveryError(f"SMTP {where}: recipients refused: {detail}") from exc
            raise PermanentDeliveryError(f"SMTP {where}: recipients refused: {detail}") from exc
        except aiosmtplib.SMTPNotSupported as exc:
            raise PermanentDeliveryError(f"SMTP {where}: {exc}") from exc
        except ValueError as exc:  # an address aiosmtplib will not put on a command line
            raise PermanentDeliveryError(f"SMTP {where}: {exc}") from exc

        out = {address: (r.code, r.message) for address, r in refused.items()}
        if out:
            event(
                log,
                "smtp-partly-refused",
                logging.WARNING,
                server=where,
                accepted=len(envelope_to) - len(out),
                refused=",".join(f"{a}:{c}" for a, (c, _) in out.items()),
            )
        event(log, "smtp-sent", server=where, rcpts=len(envelope_to), reply=reply)
        transport = client.transport  # quit() forgets it; the finally clause still needs it
        with contextlib.suppress(*_NETWORK_ERRORS, aiosmtplib.SMTPResponseException):
            await client.quit()  # the message is accepted; a lost goodbye changes nothing
        # aiosmtplib gives the text of the reply to DATA; its code was a 2xx.
        final = reply if _HAS_CODE.match(reply) else f"250 {reply}"
        if out:
            final += "; refused: " + "; ".join(f"<{a}> {c} {m}" for a, (c, m) in out.items())
        return SmtpResult(out, final)
    except aiosmtplib.SMTPResponseException as exc:  # greeting, STARTTLS, MAIL FROM, DATA
        raise _classify(exc.code, exc.message, f"SMTP {where}") from exc
    except _NETWORK_ERRORS as exc:
        raise TemporaryDeliveryError(f"SMTP {where}: {exc}") from exc
    finally:
        transport = client.transport or transport
        client.close()
        if isinstance(transport, asyncio.WriteTransport):
            # After QUIT or a failure there is nothing left to say: abort rather than wait
            # for a TLS close_notify that a peer may never send, so the socket is really
            # closed when we return (else: ResourceWarning when the caller's loop closes).
            transport.abort()
        await asyncio.sleep(0)  # the transport closes its socket in the next loop turn


def _log_setup_failure(where: str, user: str | None, exc: Exception) -> None:
    event(log, "smtp-setup-failed", logging.ERROR, server=where, user=user, error=str(exc))


def _classify(
    code: int, message: str, what: str
) -> TemporaryDeliveryError | PermanentDeliveryError:
    if 500 <= code < 600:
        return PermanentDeliveryError(f"{what}: {code} {message}")
    return TemporaryDeliveryError(f"{what}: {code} {message}")
