"""The Gemini (Generative Language API) wire format, every API version (v1, v1beta, v1alpha).

Requests: ``x-goog-api-key`` or ``?key=``; the model is in the path
(``models/<m>:generateContent``); ``:streamGenerateContent`` streams, as SSE with
``alt=sse``, else as one JSON array sent element by element. Responses: ``usageMetadata``
on the last frame; thinking tokens are billed as output and added to it here.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from ..exchange import RequestInfo, ResponseMeta
from .base import (
    Dialect,
    HeadersLike,
    UsageHandler,
    accepts_event_stream,
    choices,
    count,
    error_message,
    first,
    keep,
    loads,
    output_cap,
    parts_chars,
    query_has,
    relayed_text,
    text,
    text_fields,
)
from .openai import OPERATIONS as OPENAI_OPERATIONS

# "models/<m>:method" or "tunedModels/<m>:method"; the model ends at ":" or "/" or the end.
_MODEL = re.compile(r"(?:^|/)(models|tunedModels)/([^/:]+)")
_PART_TEXT = text_fields("text")  # generated text (thought summaries included) in a frame


class GeminiUsage(UsageHandler):
    """generateContent, streamGenerateContent (SSE and JSON array) and countTokens."""

    __slots__ = ("counting",)

    def __init__(self, meta: ResponseMeta, counting: bool) -> None:
        super().__init__(meta)
        self.counting = counting

    def element(self, data: bytes) -> None:
        self.meta.output_chars += relayed_text(_PART_TEXT, data)
        if (
            b"usageMetadata" in data
            or b"finishReason" in data
            or b'"error"' in data
            or b"blockReason" in data
            or self._probe()
        ):
            self.apply(loads(data))

    def apply(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        meta = self.meta
        if "error" in obj:
            meta.error = error_message(obj.get("error")) or meta.error
        if self.counting:
            keep(meta.usage, "input_tokens", count(obj.get("totalTokens")))
            keep(meta.usage, "cached_tokens", count(obj.get("cachedContentTokenCount")))
            return
        keep(meta, "model", text(obj.get("modelVersion")))
        keep(meta, "response_id", text(obj.get("responseId")))
        candidates = obj.get("candidates")
        if isinstance(candidates, list) and candidates and isinstance(candidates[0], dict):
            keep(meta, "finish_reason", text(candidates[0].get("finishReason")))
        feedback = obj.get("promptFeedback")
        if isinstance(feedback, dict):  # a blocked prompt has no candidates, only this
            keep(meta, "finish_reason", text(feedback.get("blockReason")))
        usage = obj.get("usageMetadata")
        if isinstance(usage, dict):
            self._usage(usage)

    def _usage(self, raw: dict[str, Any]) -> None:
        u = self.meta.usage
        prompt = count(raw.get("promptTokenCount"))
        candidates = count(raw.get("candidatesTokenCount"))
        thoughts = count(raw.get("thoughtsTokenCount"))
        total = count(raw.get("totalTokenCount"))
        cached = count(raw.get("cachedContentTokenCount"))
        if prompt is not None:
            u.input_tokens = prompt
        if candidates is not None or thoughts is not None:
            # Thinking is billed as output; keep output_tokens meaning "all generated tokens".
            u.output_tokens = (candidates or 0) + (thoughts or 0)
        if thoughts is not None:
            u.reasoning_tokens = thoughts
        if total is not None:
            u.total_tokens = total
        if cached is not None:
            u.cached_tokens = cached


def _model(path: str) -> str | None:
    m = _MODEL.search(unquote(path))
    if m is None:
        return None
    kind, name = m.groups()
    return name if kind == "models" else f"{kind}/{name}"


def _parts(parts: object) -> int:
    # Gemini parts are always a list of Part objects; a bare string is not valid there.
    return parts_chars(parts) if isinstance(parts, list) else 0


def _prompt_chars(doc: dict[str, Any]) -> int:
    total = 0
    contents = doc.get("contents")
    if isinstance(contents, dict):  # a single Content is accepted too
        contents = [contents]
    if isinstance(contents, list):
        for content in contents:
            if isinstance(content, dict):
                total += _parts(content.get("parts"))
    system = first(doc, "systemInstruction", "system_instruction")
    if isinstance(system, dict):
        total += _parts(system.get("parts"))
    return total


class Gemini(Dialect):
    """``{"error": {"code", "message", "status"}}``; ``x-goog-api-key`` or ``?key=``."""

    name = "gemini"
    credential_headers = ("Authorization", "x-goog-api-key")
    credential_params = ("key",)
    error_types = {
        400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
        404: "NOT_FOUND", 405: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT",
        429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 501: "UNIMPLEMENTED", 502: "UNAVAILABLE",
        503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
    }
    default_error_type = "UNKNOWN"
    # Its own routes, then its OpenAI-compatible ones.
    operations = ((":generateContent", "generate_content"),
                  (":streamGenerateContent", "generate_content"),
                  (":embedContent", "embeddings"), (":batchEmbedContents", "embeddings"),
                  (":countTokens", "count_tokens"), *OPENAI_OPERATIONS)

    def credential_header(self, key: str) -> tuple[str, str]:
        return "x-goog-api-key", key

    def _inspect(self, method: str, path: str, query: str, headers: HeadersLike,
                 body: bytes | None) -> RequestInfo:
        info = RequestInfo(streaming=accepts_event_stream(headers), model=_model(path))
        if ":streamGenerateContent" in path.rstrip("/") or query_has(query, "alt", "sse"):
            info.streaming = True
        doc = loads(body)
        if not isinstance(doc, dict):
            return info
        if info.model is None:  # e.g. batch endpoints name the model in the body
            model = text(doc.get("model"))
            info.model = model.removeprefix("models/") if model else None
        info.text_chars = _prompt_chars(doc)
        config = first(doc, "generationConfig", "generation_config")
        if isinstance(config, dict):
            info.choices = choices(first(config, "candidateCount", "candidate_count"))
            cap = output_cap(first(config, "maxOutputTokens", "max_output_tokens"))
            info.max_output_tokens = cap * info.choices if cap is not None else None
        return info

    def usage_handler(self, meta: ResponseMeta, route: str) -> UsageHandler:
        return GeminiUsage(meta, counting=self.is_token_count(route))

    def json_array_stream(self, route: str, query: str) -> bool:
        return ":streamGenerateContent" in route and "alt=sse" not in query.split("&")

    def error_payload(self, status: int, message: str, code: str | None) -> object:
        return {"error": {"code": status, "message": message, "status": self.error_type(status)}}

    def is_token_count(self, route: str) -> bool:
        return route.endswith(":countTokens")


DIALECT = Gemini()
