"""The request path of proxy keys (``auth.mode`` keys or mixed), called from inbound.prepare.

:meth:`KeyGuard.authenticate` runs before the body is read: it finds a proxy key in the
dialect's credential slots, looks it up through the worker's cache and answers 401 (no key
where one is required; unknown, revoked or expired key) or 503 (the key store cannot say);
:meth:`KeyGuard.authorize` runs once the model is known and answers 403 for a provider or
model the key does not allow. Every answer is in the provider's own error shape, so the SDKs
raise their usual exceptions, and none of them repeats the key. On success the exchange
carries the key's id, team, user and limits, never its secret.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone

from flask import Response

from ..config import LIMIT_KEYS, Settings
from ..errors import error_response
from ..exchange import ErrorKind, Exchange
from ..providers import Dialect
from ..providers.base import HeadersLike
from .cache import KeyCache, KeyLookupUnavailable
from .credentials import find_proxy_key
from .model import ProxyKey, looks_like_proxy_key
from .store import KeyStore, KeyStoreError

log = logging.getLogger("llmproxy.keys")

#: ``on_refused(reason)``: missing | unknown | revoked | expired | forbidden | unavailable.
RefusedListener = Callable[[str], None]
_MAX_MODEL_CHARS = 100


class KeyGuard:
    """Checks proxy keys on provider calls; one per worker, over the worker's key cache."""

    def __init__(self, cache: KeyCache, *, required: bool, limits_enforced: bool,
                 on_refused: RefusedListener | None = None) -> None:
        self.cache = cache
        self.required = required  # auth.mode keys: a call without a proxy key is refused
        self._limits_enforced = limits_enforced
        self._on_refused = on_refused
        self._warned_limits = False

    def authenticate(self, ex: Exchange, dialect: Dialect, headers: HeadersLike,
                     query: str) -> ProxyKey | Response | None:
        """The call's proxy key, an error response, or None (mixed mode, no proxy key)."""
        secret = find_proxy_key(headers, query, dialect.credential_headers,
                                dialect.credential_params)
        if secret is None:
            if not self.required:
                return None
            return self._refuse(ex, 401, "missing", "A proxy key is required: send it where "
                                "the SDK sends the provider's API key.")
        ex.api_key = ex.key_fingerprint = None  # the secret goes no further than this
        try:
            key = self.cache.get(secret) if looks_like_proxy_key(secret) else None
        except KeyLookupUnavailable:
            return self._refuse(ex, 503, "unavailable", "Proxy keys cannot be checked right "
                                "now; try again shortly.", {"Retry-After": "1"})
        if key is None:
            return self._refuse(ex, 401, "unknown", "Invalid proxy key.")
        ex.key_id, ex.team, ex.key_budget = key.id, key.team, key.budgets
        if key.revoked:
            return self._refuse(ex, 401, "revoked", "This proxy key has been revoked.")
        if not key.usable(datetime.now(timezone.utc)):
            return self._refuse(ex, 401, "expired", "This proxy key has expired.")
        if key.limits:
            ex.key_limits = tuple(sorted((k, v) for k, v in key.limits.items()
                                         if k in LIMIT_KEYS))
            if not self._limits_enforced and not self._warned_limits:
                self._warned_limits = True
                log.warning("proxy key %s has its own rate limits, but rate limiting is off "
                            "(features.rate_limiting.enabled): they are not enforced", key.id)
        return key

    def authorize(self, ex: Exchange, key: ProxyKey) -> Response | None:
        """The key's identity on the exchange; 403 if it may not call this provider/model."""
        if key.user is not None:  # the key's user wins over any header, path or body
            ex.user, ex.user_source = key.user, "key"
        provider = ex.provider or ""
        if not key.allows(provider, ex.model):
            if key.providers and provider not in key.providers:
                message = f"This proxy key may not call {provider}."
            elif ex.model is None:
                message = "This proxy key is limited to some models, and this call names none."
            else:
                message = f"This proxy key may not use the model {ex.model[:_MAX_MODEL_CHARS]}."
            return self._refuse(ex, 403, "forbidden", message)
        self.cache.note_used(key.id)
        return None

    def _refuse(self, ex: Exchange, status: int, reason: str, message: str,
                headers: dict[str, str] | None = None) -> Response:
        ex.status = status
        ex.error_kind = {401: ErrorKind.UNAUTHENTICATED, 403: ErrorKind.FORBIDDEN}.get(
            status, ErrorKind.KEY_STORE_UNAVAILABLE)
        if self._on_refused is not None:
            self._on_refused(reason)
        code = {401: "invalid_api_key", 403: "permission_denied"}.get(status)
        return error_response(ex.dialect, status, message, request_id=ex.request_id,
                              code=code, headers=headers)


def open_guard(store: KeyStore, settings: Settings,
               on_refused: RefusedListener | None = None) -> KeyGuard:
    """The worker's guard over its key store (auth.mode keys or mixed)."""
    cache = KeyCache(store, settings.auth.key_cache_seconds, store_errors=(KeyStoreError,))
    cache.close_at_exit()
    return KeyGuard(cache, required=settings.auth.mode == "keys",
                    limits_enforced=settings.ratelimit.enabled, on_refused=on_refused)
