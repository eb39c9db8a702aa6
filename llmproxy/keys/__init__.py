"""Proxy keys: keys the proxy issues to people and apps, swapped for the provider credential.

``model`` holds the key record and the secret helpers (no database, cheap to import);
``store`` the database behind it (SQLAlchemy Core); ``admin`` the /admin HTTP API and ``cli``
the ``python -m llmproxy keys`` commands, both over the same store.
"""

from __future__ import annotations

from .model import (
    KEY_PREFIX,
    KeyValidationError,
    ProxyKey,
    display_prefix,
    generate_secret,
    hash_secret,
    looks_like_proxy_key,
)

__all__ = [
    "KEY_PREFIX",
    "KeyValidationError",
    "ProxyKey",
    "display_prefix",
    "generate_secret",
    "hash_secret",
    "looks_like_proxy_key",
]
