"""Who is calling: API key (fingerprinted), user id and client IP."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from urllib.parse import parse_qsl

from werkzeug.datastructures import Headers

HeadersLike = Mapping[str, str] | Headers

_CREDENTIAL_PARAMS = ("key", "api_key", "api-key", "access_token")


def _any_encoding(word: str) -> str:
    """A pattern for ``word`` with any of its characters percent-encoded (``%6Bey``)."""
    return "".join(f"(?:{re.escape(c)}|%{ord(c):02x})" for c in word)


# Servers decode query names, so "?%6Bey=" authenticates exactly like "?key=".
CREDENTIAL_PARAM_RE = "|".join(_any_encoding(w) for w in _CREDENTIAL_PARAMS)
_KEY_PARAM_RE = re.compile(rf"(?i)([?&](?:{CREDENTIAL_PARAM_RE})=)[^&#\s]*")
_USER_RE = re.compile(r"^[\w.@:+\-]{1,128}$")


def fingerprint(key: str) -> str:
    """A stable, non-reversible id for an API key, safe to log and to put in config."""
    return "fp_" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def redact_query(target: str) -> str:
    """Replace credential values in a path's query string with ``REDACTED``."""
    if "=" not in target:
        return target
    return _KEY_PARAM_RE.sub(r"\1REDACTED", target)


def api_key(headers: HeadersLike, query: str,
            header_names: tuple[str, ...] = ("Authorization", "x-api-key", "x-goog-api-key"),
            params: tuple[str, ...] = ("key",)) -> str | None:
    """The caller's provider credential, from the slots its dialect's SDKs use."""
    for name in header_names:
        value = headers.get(name)
        if not value:
            continue
        if name.lower() == "authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            continue
        return value.strip()
    if params and "=" in query:
        for name, value in parse_qsl(query, keep_blank_values=False):
            if name in params and value:
                return value
    return None


def client_ip(remote_addr: str | None, forwarded_for: str | None, trusted_proxies: int) -> str:
    """The client address; ``X-Forwarded-For`` only counts through ``trusted_proxies`` hops."""
    addr = remote_addr or "unknown"
    if trusted_proxies > 0 and forwarded_for:
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        # Each trusted proxy appends the address it saw connect to it, so counting
        # `trusted_proxies` entries from the right gives the address the outermost trusted
        # proxy saw; anything further left was written by the client and can be forged.
        if hops:
            addr = hops[max(len(hops) - trusted_proxies, 0)]
    if addr.startswith("[") and "]" in addr:  # "[::1]:1234" -> "::1"
        return addr[1 : addr.index("]")]
    if addr.count(":") == 1:  # "1.2.3.4:5678" -> "1.2.3.4"; bare IPv6 has several colons
        return addr.split(":", 1)[0]
    return addr


def clean_user(value: object) -> str | None:
    """Accept a user id only if it is a short printable token (it becomes a limit scope)."""
    if isinstance(value, str) and _USER_RE.match(value):
        return value
    return None


def resolve_user(
    path_user: str | None,
    headers: HeadersLike,
    body_user: str | None,
    query: str,
    ip: str,
) -> tuple[str, str]:
    """User id and where it came from, in the documented order of precedence."""
    for source, value in (("path", path_user), ("header", headers.get("X-User-ID")),
                          ("body", body_user)):
        user = clean_user(value)
        if user:
            return user, source
    if "llm_user_id=" in query:
        for name, value in parse_qsl(query):
            if name == "llm_user_id" and clean_user(value):
                return value, "query"
    return ip, "ip"
