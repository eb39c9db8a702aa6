"""The OpenAI wire format: OpenAI itself and every OpenAI-compatible provider (Groq, vLLM, ...).

Requests: ``Authorization: Bearer``; a POST body with ``"stream": true`` to a chat, legacy
completions or Responses route streams. Responses: ``data:`` SSE ending in ``[DONE]``; usage
as ``prompt_tokens``/``completion_tokens`` (chat, completions, embeddings) or
``input_tokens``/``output_tokens`` (Responses API, inside ``response.completed``), taken from
any chunk, the last non-null one winning; cached and reasoning tokens are parts of them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ..exchange import RequestInfo, ResponseMeta
from .base import (
    Dialect,
    HeadersLike,
    UsageHandler,
    accepts_event_stream,
    choices,
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

_STREAM_ROUTES = ("/chat/completions", "/completions", "/responses")
#: GenAI operation names of the OpenAI routes (Anthropic and Gemini also serve these).
OPERATIONS = (("/chat/completions", "chat"), ("/completions", "text_completion"),
              ("/responses", "chat"), ("/embeddings", "embeddings"),
              ("/images/generations", "generate_content"), ("/images/edits", "generate_content"),
              ("/audio/speech", "generate_content"))
# A chunk is worth parsing only for a non-null usage or finish_reason, or an error. Text
# deltas escape their quotes (\"usage\"), so generated text cannot match these keys.
_INTERESTING = re.compile(rb'"(?:usage|finish_reason)"\s*:\s*(?!null)|"error"')
# Generated text in stream events, per kind of route: chat deltas (content, tool-call
# arguments, refusals, the reasoning text of compatible providers), legacy completions
# ("text"), and the Responses API, where every kind of delta is a "delta" string (its
# ".done" events repeat the text under other keys, so only the deltas are counted).
_CHAT_TEXT = text_fields("content", "arguments", "refusal", "reasoning_content", "reasoning")
_COMPLETION_TEXT = text_fields("text")
_RESPONSES_TEXT = text_fields("delta")


class OpenAIUsage(UsageHandler):
    """Chat completions, legacy completions, Responses API, embeddings (and compatibles)."""

    __slots__ = ("embeddings", "text_fields")

    def __init__(self, meta: ResponseMeta, embeddings: bool,
                 text_fields: re.Pattern[bytes] = _CHAT_TEXT) -> None:
        super().__init__(meta)
        self.embeddings = embeddings
        self.text_fields = text_fields

    def event(self, name: str, data: bytes) -> None:
        if data == b"[DONE]":
            return
        self.meta.output_chars += relayed_text(self.text_fields, data)
        if name == "error" or _INTERESTING.search(data) is not None or self._probe():
            self.apply(loads(data))

    def element(self, data: bytes) -> None:
        self.event("", data)

    def apply(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        meta = self.meta
        inner = obj.get("response")  # Responses API stream events wrap the response object
        if isinstance(inner, dict):
            self._apply_object(inner)
        self._apply_object(obj)
        if obj.get("type") == "error":  # Responses API "error" event: message at top level
            meta.error = error_message(obj) or meta.error

    def _apply_object(self, obj: dict[str, Any]) -> None:
        meta = self.meta
        keep(meta, "model", text(obj.get("model")))
        keep(meta, "response_id", text(obj.get("id")))
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._usage(usage)
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    reason = text(choice.get("finish_reason"))
                    if reason is not None:
                        meta.finish_reason = reason
                        break
        if obj.get("object") == "response":
            # Responses API: why it stopped is the incomplete reason, else its final status.
            details = obj.get("incomplete_details")
            reason = text(details.get("reason")) if isinstance(details, dict) else None
            status = text(obj.get("status"))
            if reason is not None:
                meta.finish_reason = reason
            elif status is not None and status not in ("queued", "in_progress"):
                meta.finish_reason = status
        err = obj.get("error")
        if err is not None:
            meta.error = error_message(err) or meta.error

    def _usage(self, raw: dict[str, Any]) -> None:
        u = self.meta.usage
        inp = count(raw.get("prompt_tokens"))
        if inp is None:
            inp = count(raw.get("input_tokens"))
        out = count(raw.get("completion_tokens"))
        if out is None:
            out = count(raw.get("output_tokens"))
        total = count(raw.get("total_tokens"))
        details = raw.get("prompt_tokens_details") or raw.get("input_tokens_details")
        cached = count(details.get("cached_tokens")) if isinstance(details, dict) else None
        details = raw.get("completion_tokens_details") or raw.get("output_tokens_details")
        reasoning = count(details.get("reasoning_tokens")) if isinstance(details, dict) else None
        if inp is not None:
            u.input_tokens = inp
        if out is not None:
            u.output_tokens = out
        elif self.embeddings and inp is not None:
            u.output_tokens = 0  # embeddings generate no tokens; 0, not "unknown"
        if total is not None:
            u.total_tokens = total
        elif u.input_tokens is not None and u.output_tokens is not None:
            u.total_tokens = u.input_tokens + u.output_tokens
        if cached is not None:
            u.cached_tokens = cached
        if reasoning is not None:
            u.reasoning_tokens = reasoning


def _prompt_chars(doc: dict[str, Any]) -> int:
    total = 0
    messages = doc.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                total += parts_chars(message.get("content"))
    prompt = doc.get("prompt")  # legacy completions: a string or a list of strings
    if isinstance(prompt, (str, list)):
        total += parts_chars(prompt)
    instructions = doc.get("instructions")  # Responses API
    if isinstance(instructions, str):
        total += len(instructions)
    items = doc.get("input")  # Responses API: a string or a list of items
    if isinstance(items, str):
        total += len(items)
    elif isinstance(items, list):
        for item in items:
            if isinstance(item, str):
                total += len(item)
            elif isinstance(item, dict):
                total += parts_chars(item.get("content"))
                if isinstance(item.get("text"), str):
                    total += len(item["text"])
                if isinstance(item.get("output"), str):  # function_call_output
                    total += len(item["output"])
    return total


class OpenAI(Dialect):
    """``{"error": {"message", "type", "param", "code"}}``; ``Authorization: Bearer``."""

    name = "openai"
    credential_headers = ("Authorization",)
    error_types = {
        400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
        404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
        429: "rate_limit_error", 500: "server_error", 501: "invalid_request_error",
        502: "server_error", 503: "server_error", 504: "timeout_error",
    }
    default_error_type = "server_error"
    operations = OPERATIONS

    def _inspect(self, method: str, path: str, query: str, headers: HeadersLike,
                 body: bytes | None) -> RequestInfo:
        info = RequestInfo(streaming=accepts_event_stream(headers))
        doc = loads(body)
        if not isinstance(doc, dict):
            return info
        info.model = text(doc.get("model"))
        if method == "POST" and doc.get("stream") is True:
            info.streaming = info.streaming or path.rstrip("/").endswith(_STREAM_ROUTES)
        info.user = text(doc.get("user"))
        info.text_chars = _prompt_chars(doc)
        # n (and the legacy best_of) completions each write up to the cap
        info.choices = max(choices(doc.get("n")), choices(doc.get("best_of")))
        for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            cap = output_cap(doc.get(key))
            if cap is not None:
                info.max_output_tokens = cap * info.choices
                break
        return info

    def usage_handler(self, meta: ResponseMeta, route: str) -> UsageHandler:
        if route.endswith("/responses"):
            fields = _RESPONSES_TEXT
        elif route.endswith("/completions") and not route.endswith("/chat/completions"):
            fields = _COMPLETION_TEXT
        else:
            fields = _CHAT_TEXT
        return OpenAIUsage(meta, embeddings=route.endswith("/embeddings"), text_fields=fields)

    def error_payload(self, status: int, message: str, code: str | None) -> object:
        kind = self.error_type(status)
        return {"error": {"message": message, "type": kind, "param": None, "code": code or kind}}

    def quota_error_body(self, message: str) -> bytes:
        # OpenAI's own answer when credit runs out: type and code both insufficient_quota.
        return json.dumps({"error": {"message": message, "type": "insufficient_quota",
                                     "param": None, "code": "insufficient_quota"}},
                          separators=(",", ":")).encode()


DIALECT = OpenAI()
