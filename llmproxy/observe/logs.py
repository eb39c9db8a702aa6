"""Logging set-up: text or JSON lines, one record per request, secrets scrubbed on the way out."""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

from ..exchange import Exchange
from ..identity import CREDENTIAL_PARAM_RE
from .records import record_of

ACCESS_LOGGER = "llmproxy.access"
access_log = logging.getLogger(ACCESS_LOGGER)
_QUIET_PATHS = ("/health", "/metrics")

# Last line of defence: whatever a message or traceback holds, these never leave the process.
# Each pattern comes with the plain substrings one of which any match must contain (lower
# case where the pattern ignores case), so that a line without them skips the regex: four
# regex scans cost ~50 µs on a request's log line, the substring tests ~1 µs.
_SECRET_RES: tuple[tuple[re.Pattern[str], str, tuple[str, ...], bool], ...] = (
    (re.compile(rf"(?i)([?&](?:{CREDENTIAL_PARAM_RE})=)[^&#\s\"'<>]+"), r"\1REDACTED",
     ("?", "&"), False),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=\-]{6,}"), r"\1REDACTED", ("bearer",), True),
    (re.compile(r"(?i)((?:x-api-key|x-goog-api-key|authorization)[\"']?\s*[:=]\s*[\"']?)"
                r"[^\s\"',}]{6,}"), r"\1REDACTED",
     ("x-api-key", "x-goog-api-key", "authorization"), True),
    (re.compile(r"\b(sk-(?:ant-)?|AIza)[A-Za-z0-9_\-]{8,}"), r"\1REDACTED", ("sk-", "AIza"),
     False),
    # proxy keys (llmproxy.keys.model.KEY_PREFIX), e.g. pasted into a URL path
    (re.compile(r"\b(llmp-)[A-Za-z0-9_\-]{8,}"), r"\1REDACTED", ("llmp-",), False),
)


def scrub(text: str) -> str:
    # The substring shortcut only for ASCII text: there lower() is exactly what (?i) ignores,
    # while Unicode case folding has exceptions (e.g. "İ" matches "i" but lowers to two
    # characters), so any other text gets every regex.
    ascii_only = text.isascii()
    lowered = text.lower() if ascii_only else text
    for pattern, repl, needles, folded in _SECRET_RES:
        if ascii_only:
            haystack = lowered if folded else text
            if not any(n in haystack for n in needles):
                continue
        text = pattern.sub(repl, text)
    return text


class _ScrubbingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class JSONFormatter(logging.Formatter):
    """One JSON object per line; a request record's fields are top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return scrub(json.dumps(entry, default=str, separators=(",", ":")))


def _text_value(value: object) -> str:
    """A field value that cannot break the line: anything but plain ASCII is JSON-quoted
    (a model name from a request body could otherwise forge a log line)."""
    text = str(value)
    # printable ASCII without space or quote (0x21-0x7e minus '"'), tested with C string
    # methods: this runs for some twenty fields of every access record
    if text and text.isascii() and text.isprintable() and " " not in text and '"' not in text:
        return text
    return json.dumps(text)


class TextFormatter(logging.Formatter):
    """``time level logger message key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        line = super().format(record)
        if isinstance(fields, dict):
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items()
                                   if v is not None)
        return scrub(line)


def configure(level: str, fmt: str) -> None:
    """Send every ``llmproxy`` logger (and gunicorn's error log) through one scrubbing handler."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("llmproxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    for other in logging.getLogger("gunicorn.error").handlers:
        if not isinstance(other.formatter, (JSONFormatter, TextFormatter, _ScrubbingFormatter)):
            other.setFormatter(_ScrubbingFormatter(
                other.formatter._fmt if other.formatter else None))  # noqa: SLF001


def log_exchange(ex: Exchange) -> None:
    """Terminal-event listener: exactly one access record per request."""
    # Liveness probes and scrapes arrive every few seconds: keep them out of INFO.
    quiet = ex.provider is None and ex.path.startswith(_QUIET_PATHS) and ex.status == 200
    level = logging.DEBUG if quiet else logging.INFO
    if access_log.isEnabledFor(level):
        access_log.log(level, "request completed", extra={"fields": record_of(ex)})
