"""Generated text counted off stream events as they pass (the basis of an aborted stream's
output estimate), and Anthropic's placeholder output count never taken for the real one."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from llmproxy.exchange import ResponseMeta
from llmproxy.providers import DIALECTS, response_reader
from llmproxy.providers.base import relayed_text, text_fields

STREAMS = Path(__file__).parents[1] / "fixtures" / "streams"
SSE = "text/event-stream"


def read(dialect: str, path: str, data: bytes, ctype: str = SSE) -> ResponseMeta:
    parser = response_reader(DIALECTS[dialect], path, ctype, None)
    parser.feed(data)
    parser.close()
    return parser.meta


def escaped(text: str) -> int:
    """Bytes of ``text`` as a JSON string value, quotes excluded."""
    return len(json.dumps(text, ensure_ascii=False).encode()) - 2


def events(data: bytes) -> list[Any]:
    return [json.loads(line[5:]) for line in data.splitlines()
            if line.startswith(b"data:") and line[5:].strip() not in (b"", b"[DONE]")]


def test_openai_chat_counts_every_delta_and_nothing_else() -> None:
    data = (STREAMS / "openai_chat_include_usage.sse").read_bytes()
    want = sum(escaped(c["delta"]["content"]) for e in events(data) for c in e["choices"]
               if isinstance(c.get("delta", {}).get("content"), str))
    meta = read("openai", "/v1/chat/completions", data)
    assert want > 0 and meta.output_chars == want
    assert not meta.output_estimated  # its usage came: nothing to estimate


def test_openai_responses_counts_only_the_deltas() -> None:
    """Its ``.done`` events and the final response repeat the text: counted once."""
    data = (STREAMS / "openai_responses.sse").read_bytes()
    want = sum(escaped(e["delta"]) for e in events(data)
               if str(e.get("type", "")).endswith(".delta") and isinstance(e.get("delta"), str))
    assert want > 0
    assert read("openai", "/v1/responses", data).output_chars == want


def test_legacy_completions_and_tool_arguments() -> None:
    legacy = b'data: {"id":"c","choices":[{"text":"Hello there","index":0}]}\n\n'
    assert read("openai", "/v1/completions", legacy).output_chars == len("Hello there")
    tool = (b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":'
            b'{"arguments":"{\\"city\\": \\"Par"}}]}}]}\n\n')
    assert read("openai", "/v1/chat/completions", tool).output_chars == \
        escaped('{"city": "Par')


def test_gemini_counts_part_text() -> None:
    data = (STREAMS / "gemini_stream.sse").read_bytes()
    want = sum(escaped(p["text"]) for e in events(data) for c in e.get("candidates", [])
               for p in c.get("content", {}).get("parts", []) if "text" in p)
    path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert want > 0 and read("gemini", path, data).output_chars == want


def test_anthropic_counts_text_deltas() -> None:
    data = (STREAMS / "anthropic_messages.sse").read_bytes()
    want = sum(escaped(e["delta"]["text"]) for e in events(data)
               if e.get("type") == "content_block_delta")
    meta = read("anthropic", "/v1/messages", data)
    assert meta.output_chars == want and meta.usage.output_tokens == 15


def test_anthropic_placeholder_output_is_never_the_count() -> None:
    """A stream cut after message_start: its output_tokens (a placeholder) is not kept."""
    data = (STREAMS / "anthropic_messages.sse").read_bytes()
    cut = data[:data.index(b"event: message_delta")]
    meta = read("anthropic", "/v1/messages", cut)
    assert meta.usage.input_tokens == 472 and meta.usage.output_tokens is None
    assert meta.usage.total_tokens == 472 + 120 + 2048  # what was reported
    meta.estimate_output(3.0)
    assert meta.output_estimated and meta.usage.output_tokens == -(-meta.output_chars // 3)
    assert meta.usage.total_tokens == 472 + 120 + 2048 + meta.usage.output_tokens


def test_anthropic_non_streamed_body_keeps_its_output() -> None:
    body = json.dumps({"type": "message", "model": "m", "id": "x", "content": [],
                       "usage": {"input_tokens": 3, "output_tokens": 9}}).encode()
    meta = read("anthropic", "/v1/messages", body, "application/json")
    assert meta.usage.output_tokens == 9


def test_signature_deltas_are_not_text() -> None:
    sig = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
           b'"delta":{"type":"signature_delta","signature":"EqQBCgIYAhIM1gbcDa9GJwZA"}}\n\n')
    think = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
             b'"delta":{"type":"thinking_delta","thinking":"Let me see"}}\n\n')
    assert read("anthropic", "/v1/messages", sig + think).output_chars == len("Let me see")


@pytest.mark.parametrize("value", [
    'He said "hi"\n', "back\\slash\\", "\\\"", "unicode: é ☃", '"content": "fake key"',
])
def test_escapes_and_fake_keys_inside_text(value: str) -> None:
    fields = text_fields("content")
    doc = json.dumps({"delta": {"content": value}, "other": {"x": value}},
                     ensure_ascii=False).encode()
    assert relayed_text(fields, doc) == escaped(value)


@pytest.mark.parametrize("piece", [b"\\a", b'"content":"', b'\\"'])
def test_hostile_events_are_scanned_in_linear_time(piece: bytes) -> None:
    """An unterminated value, keys without values, escaped quotes: ten times the size costs
    about ten times the work (a quadratic scan would take a hundred times as long)."""
    fields = text_fields("content", "arguments")

    def cost(repeat: int) -> float:  # CPU time, best of five: other processes barely count
        data = b'{"content":"' + piece * repeat
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            relayed_text(fields, data)
            best = min(best, time.process_time() - started)
        return best

    assert cost(400_000) < 50 * max(cost(40_000), 1e-4)
