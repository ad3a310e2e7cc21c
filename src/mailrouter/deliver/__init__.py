"""Stage 5: mail leaves — into an account's mailbox (Maildir, IMAP APPEND, LMTP) or out
to the customer (pickup directory or SMTP smarthost).

Every backend is an ``async`` callable that either returns (delivered) or raises a
:class:`~mailrouter.deliver.errors.DeliveryError` saying whether a retry can help.
"""

from mailrouter.deliver.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError

__all__ = ["DeliveryError", "PermanentDeliveryError", "TemporaryDeliveryError"]
