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
_USER_RE = re.compile(r"[\w.@:+\-]{1,128}")  # the whole id (fullmatch: "$" allows "\n")


def fingerprint(key: str) -> str:
    """A stable, non-reversible id for an API key, safe to log and to put in config."""
    return "fp_" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


# A proxy key (llmproxy.keys.model.KEY_PREFIX) anywhere in a target: under an unexpected
# query parameter or pasted into the path, it must not reach records either.
_PROXY_KEY_RE = re.compile(r"\b(llmp-)[A-Za-z0-9_\-]{8,}")


def redact_query(target: str) -> str:
    """Replace credential values in a path's query string, and proxy keys anywhere in it,
    with ``REDACTED``."""
    if "llmp-" in target:
        target = _PROXY_KEY_RE.sub(r"\1REDACTED", target)
    if "=" not in target:
        return target
    return _KEY_PARAM_RE.sub(r"\1REDACTED", target)


class CredentialConflict(ValueError):
    """A request carries two different credentials for its provider."""


def _credential(slot: str, value: str) -> str | None:
    if slot != "authorization":
        return value.strip() or None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def api_key(headers: HeadersLike, query: str,
            header_names: tuple[str, ...] = ("Authorization", "x-api-key", "x-goog-api-key"),
            params: tuple[str, ...] = ("key",)) -> str | None:
    """The caller's provider credential, from the slots its dialect's SDKs use.

    ``headers`` and ``query`` must be what is forwarded (hop-by-hop headers already dropped),
    so the credential named is the one the provider authenticates. Every slot is read:
    two different values raise :class:`CredentialConflict`, since which one the provider
    honours is its own business. A repeated header arrives joined with commas, which no
    API key or bearer token contains.
    """
    slots = {name.lower() for name in header_names}
    found: set[str] = set()
    for name, value in headers.items():
        slot = name.lower()
        if slot in slots and value:
            for part in value.split(","):
                credential = _credential(slot, part)
                if credential:
                    found.add(credential)
    if params and "=" in query:
        for name, value in parse_qsl(query, keep_blank_values=False):
            if name in params and value:
                found.add(value)
    if len(found) > 1:
        raise CredentialConflict(f"{len(found)} different credentials")
    return next(iter(found), None)


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
    if isinstance(value, str) and _USER_RE.fullmatch(value):
        return value
    return None


#: Where a user id may come from (``server.user_sources``); see :func:`resolve_user`.
USER_SOURCES = ("path", "header", "body", "query", "key", "ip")
#: The order of precedence when none is configured.
DEFAULT_USER_SOURCES = ("path", "header", "body", "query", "ip")


def _query_user(query: str) -> str | None:
    if "llm_user_id=" in query:
        for name, value in parse_qsl(query):
            if name == "llm_user_id" and clean_user(value):
                return value
    return None


def resolve_user(
    path_user: str | None,
    headers: HeadersLike,
    body_user: str | None,
    query: str,
    ip: str,
    key_fingerprint: str | None = None,
    sources: tuple[str, ...] = DEFAULT_USER_SOURCES,
) -> tuple[str | None, str | None]:
    """User id and where it came from: the first of ``sources`` that names one.

    ``path`` (``/meta/<id>/``), ``header`` (``X-User-ID``), ``body`` (``user`` or
    ``metadata.user_id``) and ``query`` (``llm_user_id``) are whatever the client says;
    ``key`` is the credential's fingerprint, ``ip`` the client address. (None, None) when
    no source allowed names one.
    """
    for source in sources:
        if source == "ip":
            if ip:
                return ip, source
            continue
        if source == "path":
            value: object = path_user
        elif source == "header":
            value = headers.get("X-User-ID")
        elif source == "body":
            value = body_user
        elif source == "query":
            value = _query_user(query)
        else:  # "key"
            value = key_fingerprint
        user = clean_user(value)
        if user:
            return user, source
    return None, None
