"""The proxy-key record, its secret, and the checks on fields a caller may set.

A secret is ``llmp-`` + 43 URL-safe characters (256 random bits). It is shown once, at
creation; what is kept is its SHA-256 (to look it up) and its first characters (to show).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from typing import Any

from ..budgets.model import Budget, BudgetValidationError, parse_budget
from ..config import LIMIT_KEYS

KEY_PREFIX = "llmp-"
SECRET_BYTES = 32  # token_urlsafe(32) -> 43 characters
DISPLAY_CHARS = 12  # "llmp-" + 7 random characters: enough to tell keys apart in a listing
KEY_ID_PREFIX = "key_"

MAX_NAME_CHARS = 200
MAX_PATTERNS = 100
MAX_METADATA_BYTES = 16 * 1024
_KEY_ID_RE = re.compile(r"^key_[0-9a-f]{16}$")
# What a secret looks like: the prefix, then URL-safe base64 only (nothing to inject anywhere).
_SECRET_RE = re.compile(r"^llmp-[A-Za-z0-9_-]{32,128}$")

#: Fields a caller may set (``name`` is required at creation).
FIELDS = ("name", "user", "team", "providers", "models", "limits", "expires_at", "metadata",
          "budgets")


class KeyValidationError(ValueError):
    """A field a caller gave is invalid; the message names the field, never a secret."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.problem = problem


def generate_secret() -> str:
    """A new proxy-key secret: the prefix and 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def new_key_id() -> str:
    """A key's public id: safe to log, to show and to put in records and metrics."""
    return KEY_ID_PREFIX + secrets.token_hex(8)


def is_key_id(value: str) -> bool:
    return bool(_KEY_ID_RE.match(value))


def hash_secret(secret: str) -> str:
    """Hex SHA-256 of ``secret``: what the database holds and lookups are done by.

    A plain fast hash is right here, unlike for passwords: the secret carries 256 random bits,
    so there is nothing to guess that a salt or a slow hash would protect, and a lookup by
    hash must stay one cheap indexed query.
    """
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def display_prefix(secret: str) -> str:
    """The first characters of a secret, shown in listings to recognise a key."""
    return secret[:DISPLAY_CHARS]


def looks_like_proxy_key(value: str) -> bool:
    """Whether ``value`` has the shape of a proxy-key secret (it may still be unknown)."""
    return bool(_SECRET_RE.match(value))


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(timezone.utc).isoformat()


@dataclass(frozen=True, slots=True)
class ProxyKey:
    """One proxy key as stored, without its secret."""

    id: str
    prefix: str
    name: str
    user: str | None = None
    team: str | None = None
    providers: tuple[str, ...] = ()  # empty: every provider
    models: tuple[str, ...] = ()  # glob patterns; empty: every model
    limits: dict[str, int] = field(default_factory=dict)  # the rate limiter's LIMIT_KEYS
    expires_at: datetime | None = None  # aware, UTC
    revoked: bool = False
    created_at: datetime = field(default_factory=utcnow)
    last_used_at: datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    budgets: Budget | None = None  # the key's own spend budget in USD

    def usable(self, now: datetime) -> bool:
        """Not revoked and not expired at ``now`` (aware)."""
        return not self.revoked and (self.expires_at is None or now < self.expires_at)

    def allows(self, provider: str, model: str | None) -> bool:
        """Whether this key may call ``provider`` with ``model``.

        A key restricted to some models allows only calls whose model is known: a call the
        proxy cannot attribute to a model could be for any of them.
        """
        if self.providers and provider not in self.providers:
            return False
        if not self.models:
            return True
        return model is not None and any(fnmatchcase(model, p) for p in self.models)

    def public(self) -> dict[str, Any]:
        """JSON-safe fields for listings and the admin API: never the secret or its hash."""
        return {
            "id": self.id,
            "prefix": self.prefix,
            "name": self.name,
            "user": self.user,
            "team": self.team,
            "providers": list(self.providers),
            "models": list(self.models),
            "limits": dict(self.limits),
            "expires_at": _iso(self.expires_at),
            "revoked": self.revoked,
            "created_at": _iso(self.created_at),
            "last_used_at": _iso(self.last_used_at),
            "metadata": dict(self.metadata),
            "budgets": None if self.budgets is None else self.budgets.public(),
        }


# --------------------------------------------------------------------- caller-given fields


def _text(value: Any, name: str, *, optional: bool) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise KeyValidationError(name, "must be a non-empty string"
                                       + (" or null" if optional else ""))
    if len(value) > MAX_NAME_CHARS:
        raise KeyValidationError(name, f"must be at most {MAX_NAME_CHARS} characters")
    # str.isprintable(): no control (C0, DEL, C1), format (zero-width, bidi), private-use or
    # unassigned characters, no separator but the ASCII space (not NBSP, not U+2028), no lone
    # surrogate. A user's or team's name keys its budget counters and is a ledger identity;
    # the ledger keeps printable characters only, so any other would make the two disagree.
    if not value.isprintable():
        raise KeyValidationError(name, "must be printable characters only (no control, "
                                       "format or zero-width characters, no space but U+0020)")
    return value.strip()


def _names(value: Any, name: str, known: Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or len(value) > MAX_PATTERNS:
        raise KeyValidationError(name, f"must be a list of at most {MAX_PATTERNS} strings")
    out: list[str] = []
    for item in value:
        text = _text(item, name, optional=False)
        assert text is not None
        if text not in out:
            out.append(text)
    if known is not None:
        allowed = set(known)
        unknown = [p for p in out if p not in allowed]
        if unknown:
            raise KeyValidationError(name, f"unknown provider {unknown[0]!r} "
                                           f"(configured: {', '.join(sorted(allowed))})")
    return tuple(out)


def _limits(value: Any) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise KeyValidationError("limits", "must be an object")
    out: dict[str, int] = {}
    for key, limit in value.items():
        if key not in LIMIT_KEYS:
            raise KeyValidationError(f"limits.{key}",
                                     f"unknown limit (allowed: {', '.join(LIMIT_KEYS)})")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise KeyValidationError(f"limits.{key}", "must be an integer >= 0")
        out[str(key)] = limit
    return out


def parse_time(value: Any, name: str = "expires_at") -> datetime | None:
    """An ISO 8601 time (``Z`` or an offset; without one, UTC) as an aware UTC datetime."""
    if value is None:
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise KeyValidationError(name, "must be an ISO 8601 time, "
                                           "e.g. 2030-01-31T00:00:00Z") from None
    else:
        raise KeyValidationError(name, "must be an ISO 8601 time string or null")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        return parsed.astimezone(timezone.utc)
    except OverflowError:  # 9999-12-31T23:00-05:00 is past the last day a datetime holds
        raise KeyValidationError(name, "is out of range") from None


def _metadata(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise KeyValidationError("metadata", "must be an object")
    try:
        encoded = json.dumps(dict(value), allow_nan=False)
    except (TypeError, ValueError):
        raise KeyValidationError("metadata", "must be plain JSON") from None
    if len(encoded.encode()) > MAX_METADATA_BYTES:
        raise KeyValidationError("metadata", f"must be at most {MAX_METADATA_BYTES} bytes")
    loaded: dict[str, Any] = json.loads(encoded)
    return loaded


def _budgets(value: Any) -> Budget | None:
    if isinstance(value, Budget):  # from code (the CLI): already checked by its maker
        value = value.public()
    try:
        return parse_budget(value, "budgets")
    except BudgetValidationError as exc:
        raise KeyValidationError(exc.field, exc.problem) from None


#: Scope kinds a budget of its own table belongs to (a key's is in the key's record).
BUDGET_SCOPE_KINDS = ("user", "team")


def parse_scope(text: Any, kinds: Iterable[str] = BUDGET_SCOPE_KINDS) -> tuple[str, str]:
    """``user:NAME`` or ``team:NAME`` (``kinds``) as ``(kind, name)``.

    The name follows the rules of a key's ``user`` and ``team``. Something shaped like a
    proxy-key secret is refused: it was pasted by mistake, and would be logged as a scope.
    """
    allowed = tuple(kinds)
    usage = f"must be {' or '.join(k + ':NAME' for k in allowed)}"
    if not isinstance(text, str):
        raise KeyValidationError("scope", usage)
    kind, sep, name = text.partition(":")
    if not sep or kind not in allowed:
        raise KeyValidationError("scope", usage)
    if looks_like_proxy_key(name.strip()):
        raise KeyValidationError("scope", "the name looks like a proxy key; " + usage)
    checked = _text(name, "scope", optional=False)
    assert checked is not None
    return kind, checked


def validate_fields(data: Mapping[str, Any], *, partial: bool = False,
                    providers: Iterable[str] | None = None) -> dict[str, Any]:
    """Check and normalise caller-given key fields (admin API body, CLI options).

    ``partial``: an update, where every field is optional. ``providers``: the configured
    provider names, when known, to refuse a key for a provider that does not exist.
    Returns only the fields given, as the store takes them.
    """
    if not isinstance(data, Mapping):
        raise KeyValidationError("body", "must be a JSON object")
    for key in data:
        if key not in FIELDS:
            raise KeyValidationError(str(key), f"unknown field (allowed: {', '.join(FIELDS)})")
    if not partial and "name" not in data:
        raise KeyValidationError("name", "is required")
    out: dict[str, Any] = {}
    if "name" in data:
        out["name"] = _text(data["name"], "name", optional=False)
    for name in ("user", "team"):
        if name in data:
            out[name] = _text(data[name], name, optional=True)
    if "providers" in data:
        out["providers"] = _names(data["providers"], "providers", providers)
    if "models" in data:
        out["models"] = _names(data["models"], "models", None)
    if "limits" in data:
        out["limits"] = _limits(data["limits"])
    if "expires_at" in data:
        out["expires_at"] = parse_time(data["expires_at"])
    if "metadata" in data:
        out["metadata"] = _metadata(data["metadata"])
    if "budgets" in data:
        out["budgets"] = _budgets(data["budgets"])
    return out
