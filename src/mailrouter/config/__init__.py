"""Typed, frozen settings read once from a TOML file, with errors that name file, line and key.

``settings`` holds the dataclasses and their defaults; ``loader`` reads and checks the file.
"""

from mailrouter.config.loader import ConfigError, load, load_from_text
from mailrouter.config.settings import (
    DEFAULT_STATE_DIR,
    PACKAGED_TEMPLATES,
    AccountSettings,
    DeliverySettings,
    HttpSettings,
    ImapWatchSettings,
    ListenerSettings,
    NotifySettings,
    OutboundSettings,
    OutboxSettings,
    Secret,
    Settings,
    TransferSettings,
    client_ssl_context,
    describe,
)

__all__ = [
    "DEFAULT_STATE_DIR",
    "PACKAGED_TEMPLATES",
    "AccountSettings",
    "ConfigError",
    "DeliverySettings",
    "HttpSettings",
    "ImapWatchSettings",
    "ListenerSettings",
    "NotifySettings",
    "OutboundSettings",
    "OutboxSettings",
    "Secret",
    "Settings",
    "TransferSettings",
    "client_ssl_context",
    "describe",
    "load",
    "load_from_text",
]
