"""The Anthropic Messages wire format.

Requests: ``x-api-key`` (or ``Authorization: Bearer``); ``"stream": true`` on ``/messages``.
Responses: named SSE events; ``message_start`` carries input and cache usage,
``message_delta`` a CUMULATIVE ``output_tokens`` (the last value wins, never a sum). Anthropic's
``input_tokens`` excludes cache reads and writes, which are billed on top.
"""

from __future__ import annotations

import re
from typing import Any

from ..exchange import RequestInfo, ResponseMeta, Usage
from .base import (
    Dialect,
    HeadersLike,
    UsageHandler,
    accepts_event_stream,
    count,
    error_message,
    keep,
    loads,
    output_cap,
    parts_chars,
    relayed_text,
    text,
    text_fields,
)
from .openai import OPERATIONS as OPENAI_OPERATIONS

_TYPE = re.compile(rb'\s*\{\s*"type"\s*:\s*"([a-z_]+)"')
# Generated text in content_block_delta events: text, thinking and tool input (a thinking
# block's signature is not generated text).
_DELTA_TEXT = text_fields("text", "thinking", "partial_json")


class AnthropicUsage(UsageHandler):
    """Messages (JSON and SSE) and count_tokens."""

    __slots__ = ("counting",)

    def __init__(self, meta: ResponseMeta, counting: bool) -> None:
        super().__init__(meta)
        self.counting = counting

    def event(self, name: str, data: bytes) -> None:
        if not name:  # a server that omits "event:" lines: the type leads the payload
            m = _TYPE.match(data)
            name = m.group(1).decode() if m else ""
        if name == "content_block_delta":
            self.meta.output_chars += relayed_text(_DELTA_TEXT, data)
        elif name == "message_start":
            obj = loads(data)
            if isinstance(obj, dict):
                # Its output_tokens is a placeholder (1) until message_delta's real count:
                # never kept, or a stream cut before message_delta would be charged 1.
                self.apply(obj.get("message"), start=True)
        elif name == "message_delta":
            obj = loads(data)
            if isinstance(obj, dict):
                delta = obj.get("delta")
                if isinstance(delta, dict):
                    keep(self.meta, "finish_reason", text(delta.get("stop_reason")))
                usage = obj.get("usage")
                if isinstance(usage, dict):
                    self._usage(usage)
        elif name == "error":
            obj = loads(data)
            if isinstance(obj, dict):
                self.meta.error = error_message(obj.get("error")) or error_message(obj)
        # ping, content_block_*, message_stop carry nothing the proxy records.

    def element(self, data: bytes) -> None:
        self.body(data)

    def apply(self, obj: Any, *, start: bool = False) -> None:
        if not isinstance(obj, dict):
            return
        meta = self.meta
        if obj.get("type") == "error":
            meta.error = error_message(obj.get("error")) or error_message(obj)
            return
        if self.counting:
            keep(meta.usage, "input_tokens", count(obj.get("input_tokens")))
            return
        keep(meta, "model", text(obj.get("model")))
        keep(meta, "response_id", text(obj.get("id")))
        keep(meta, "finish_reason", text(obj.get("stop_reason")))
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._usage(usage, with_output=not start)

    def _usage(self, raw: dict[str, Any], with_output: bool = True) -> None:
        # Every field is a running value: the last non-null one wins (never add them up).
        u = self.meta.usage
        for key, attr in (
            ("input_tokens", "input_tokens"),
            ("output_tokens", "output_tokens" if with_output else ""),
            ("cache_creation_input_tokens", "cache_creation_tokens"),
            ("cache_read_input_tokens", "cached_tokens"),
        ):
            if not attr:
                continue
            value = count(raw.get(key))
            if value is not None:
                setattr(u, attr, value)
        _total(u)


def _total(u: Usage) -> None:
    """Anthropic reports no total: it is what is billed, input + cache + output."""
    if u.input_tokens is None and u.output_tokens is None:
        return
    u.total_tokens = (
        (u.input_tokens or 0)
        + (u.cache_creation_tokens or 0)
        + (u.cached_tokens or 0)
        + (u.output_tokens or 0)
    )


def _prompt_chars(doc: dict[str, Any]) -> int:
    total = parts_chars(doc.get("system"))
    messages = doc.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                total += parts_chars(message.get("content"))
    return total


class Anthropic(Dialect):
    """``{"type": "error", "error": {"type", "message"}}``; ``event: error`` in streams."""

    name = "anthropic"
    credential_headers = ("Authorization", "x-api-key")
    error_types = {
        400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
        404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
        429: "rate_limit_error", 500: "api_error", 501: "invalid_request_error",
        502: "api_error", 503: "overloaded_error", 504: "timeout_error",
    }
    default_error_type = "api_error"
    # Its own routes, then its OpenAI SDK compatibility routes.
    operations = (("/messages", "chat"), ("/messages/count_tokens", "count_tokens"),
                  ("/complete", "text_completion"), *OPENAI_OPERATIONS)

    def credential_header(self, key: str) -> tuple[str, str]:
        return "x-api-key", key

    def _inspect(self, method: str, path: str, query: str, headers: HeadersLike,
                 body: bytes | None) -> RequestInfo:
        info = RequestInfo(streaming=accepts_event_stream(headers))
        doc = loads(body)
        if not isinstance(doc, dict):
            return info
        info.model = text(doc.get("model"))
        if method == "POST" and doc.get("stream") is True:
            info.streaming = info.streaming or path.rstrip("/").endswith(("/messages",
                                                                          "/complete"))
        metadata = doc.get("metadata")
        if isinstance(metadata, dict):
            info.user = text(metadata.get("user_id"))
        info.text_chars = _prompt_chars(doc)
        info.max_output_tokens = output_cap(doc.get("max_tokens"))
        return info

    def usage_handler(self, meta: ResponseMeta, route: str) -> UsageHandler:
        return AnthropicUsage(meta, counting=self.is_token_count(route))

    def error_payload(self, status: int, message: str, code: str | None) -> object:
        return {"type": "error", "error": {"type": self.error_type(status), "message": message}}

    def stream_error_event(self, message: str) -> bytes:
        return b"event: error\ndata: " + self.error_body(502, message) + b"\n\n"

    def normalized_tokens(self, usage: Usage) -> dict[str, int]:
        tokens = super().normalized_tokens(usage)
        # input_tokens excludes cache reads and writes: the whole prompt is all three.
        cached = usage.cached_tokens or 0
        tokens["input"] += cached + tokens["cache_creation"]
        tokens["cached"] = min(cached, tokens["input"])
        return tokens

    def is_token_count(self, route: str) -> bool:
        return route.endswith("/count_tokens")


DIALECT = Anthropic()
