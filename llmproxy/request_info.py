"""What a request says about itself: model, streaming, user, prompt size, output cap.

Used by the relay (streaming detection, model for logs) and by the rate limiter (token
estimation from ``text_chars`` and ``max_output_tokens``). The body is parsed at most once,
only when the caller passes it (small enough to inspect), and nothing here raises: any type
may appear anywhere in a hostile body, and deep nesting makes ``json.loads`` recurse.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote

# "models/<m>:method" or "tunedModels/<m>:method"; the model ends at ":" or "/" or the end.
_GEMINI_MODEL = re.compile(r"(?:^|/)(models|tunedModels)/([^/:]+)")
_OPENAI_STREAM_ROUTES = ("/chat/completions", "/completions", "/responses")


class HeadersLike(Protocol):
    """A plain ``Mapping[str, str]`` or werkzeug's ``Headers`` (not a Mapping for mypy)."""

    def get(self, key: str, /) -> str | None: ...

    def items(self) -> Iterable[tuple[str, str]]: ...


@dataclass(slots=True)
class RequestInfo:
    """Facts read off one request; ``None`` means unknown."""

    model: str | None = None
    streaming: bool = False
    user: str | None = None
    text_chars: int | None = None  # characters of textual prompt content; None: not JSON
    max_output_tokens: int | None = None
    json_ok: bool = False  # the body was inspected and is a JSON object


def inspect_request(
    dialect: str,
    method: str,
    path: str,
    query: str,
    headers: HeadersLike,
    body: bytes | None,
) -> RequestInfo:
    """Inspect a request; ``body`` is None when it was too large to read."""
    try:
        return _inspect(dialect, method.upper(), path, query, headers, body)
    except Exception:  # a bug in inspection must never fail a request
        return RequestInfo()


def _inspect(
    dialect: str,
    method: str,
    path: str,
    query: str,
    headers: HeadersLike,
    body: bytes | None,
) -> RequestInfo:
    info = RequestInfo()
    doc = _load(body)
    if isinstance(doc, dict):
        info.json_ok = True
    else:
        doc = None
    route = path.rstrip("/")
    accept = _header(headers, "accept")
    if accept is not None and "text/event-stream" in accept.lower():
        info.streaming = True

    if dialect == "gemini":
        info.model = _gemini_model(path)
        if ":streamGenerateContent" in route or ("alt", "sse") in parse_qsl(query):
            info.streaming = True
        if doc is not None:
            if info.model is None:  # e.g. batch endpoints name the model in the body
                model = _text(doc.get("model"))
                info.model = model.removeprefix("models/") if model else None
            info.text_chars = _gemini_chars(doc)
            config = _first(doc, "generationConfig", "generation_config")
            if isinstance(config, dict):
                info.max_output_tokens = _count(
                    _first(config, "maxOutputTokens", "max_output_tokens")
                )
        return info

    if doc is None:
        return info
    info.model = _text(doc.get("model"))
    if method == "POST" and doc.get("stream") is True:
        if dialect == "anthropic":
            info.streaming = info.streaming or route.endswith(("/messages", "/complete"))
        else:
            info.streaming = info.streaming or route.endswith(_OPENAI_STREAM_ROUTES)
    if dialect == "anthropic":
        metadata = doc.get("metadata")
        if isinstance(metadata, dict):
            info.user = _text(metadata.get("user_id"))
        info.text_chars = _anthropic_chars(doc)
        info.max_output_tokens = _count(doc.get("max_tokens"))
    else:
        info.user = _text(doc.get("user"))
        info.text_chars = _openai_chars(doc)
        for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            info.max_output_tokens = _count(doc.get(key))
            if info.max_output_tokens is not None:
                break
    return info


# ----------------------------------------------------------------------------- helpers


def _load(body: bytes | None) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def _header(headers: HeadersLike, name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict is case-sensitive; werkzeug's Headers are not
        for key, val in headers.items():
            if isinstance(key, str) and key.lower() == name:
                return val if isinstance(val, str) else None
    return value if isinstance(value, str) else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _count(value: object) -> int | None:
    return value if type(value) is int and value >= 0 else None


def _first(doc: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        value = doc.get(key)
        if value is not None:
            return value
    return None


def _gemini_model(path: str) -> str | None:
    m = _GEMINI_MODEL.search(unquote(path))
    if m is None:
        return None
    kind, name = m.groups()
    return name if kind == "models" else f"{kind}/{name}"


def _parts_chars(content: object, nested: bool = False) -> int:
    """Text in a string, or in a list of parts/blocks that carry "text" (any part type)."""
    if isinstance(content, str):
        return len(content)
    total = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                total += len(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    total += len(text)
                elif not nested and part.get("type") == "tool_result":
                    # Anthropic tool results nest their text blocks exactly one level down.
                    total += _parts_chars(part.get("content"), nested=True)
    return total


def _openai_chars(doc: dict[str, Any]) -> int:
    total = 0
    messages = doc.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                total += _parts_chars(message.get("content"))
    prompt = doc.get("prompt")  # legacy completions: a string or a list of strings
    if isinstance(prompt, (str, list)):
        total += _parts_chars(prompt)
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
                total += _parts_chars(item.get("content"))
                if isinstance(item.get("text"), str):
                    total += len(item["text"])
                if isinstance(item.get("output"), str):  # function_call_output
                    total += len(item["output"])
    return total


def _anthropic_chars(doc: dict[str, Any]) -> int:
    total = _parts_chars(doc.get("system"))
    messages = doc.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                total += _parts_chars(message.get("content"))
    return total


def _gemini_chars(doc: dict[str, Any]) -> int:
    total = 0
    contents = doc.get("contents")
    if isinstance(contents, dict):  # a single Content is accepted too
        contents = [contents]
    if isinstance(contents, list):
        for content in contents:
            if isinstance(content, dict):
                total += _gemini_parts_chars(content.get("parts"))
    system = _first(doc, "systemInstruction", "system_instruction")
    if isinstance(system, dict):
        total += _gemini_parts_chars(system.get("parts"))
    return total


def _gemini_parts_chars(parts: object) -> int:
    # Gemini parts are always a list of Part objects; a bare string is not valid there.
    return _parts_chars(parts) if isinstance(parts, list) else 0
