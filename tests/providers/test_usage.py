"""Usage parsers: every provider, every framing, split anywhere, compressed, hostile input."""

from __future__ import annotations

import gzip
import json
import random
import sys
import tracemalloc
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from llmproxy.exchange import ResponseMeta
from llmproxy.providers import DIALECTS, anthropic, base, response_reader
from llmproxy.streams import reader
from llmproxy.streams.reader import ResponseReader

STREAMS = Path(__file__).parents[1] / "fixtures" / "streams"
SSE = "text/event-stream; charset=utf-8"
JSON = "application/json; charset=UTF-8"

OPENAI_CHAT = {
    "model": "o4-mini-2025-04-16",
    "response_id": "chatcmpl-BjQXZ4mLf8qT2vYc3",
    "finish_reason": "stop",
    "upstream_error": None,
    "input_tokens": 1117,
    "output_tokens": 236,
    "total_tokens": 1353,
    "cached_tokens": 1024,
    "reasoning_tokens": 192,
    "cache_creation_tokens": None,
}
OPENAI_RESPONSES = {
    "model": "gpt-4.1-2025-04-14",
    "response_id": "resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654",
    "finish_reason": "completed",
    "upstream_error": None,
    "input_tokens": 2937,
    "output_tokens": 118,
    "total_tokens": 3055,
    "cached_tokens": 2816,
    "reasoning_tokens": 64,
    "cache_creation_tokens": None,
}
ANTHROPIC = {
    "model": "claude-sonnet-4-5-20250929",
    "response_id": "msg_01Xq2uJ9dT3tWv1vjAHKvF8s",
    "finish_reason": "end_turn",
    "upstream_error": None,
    "input_tokens": 472,
    "output_tokens": 15,  # the last cumulative message_delta value, not 2 + 10 + 15
    "total_tokens": 472 + 120 + 2048 + 15,
    "cached_tokens": 2048,
    "reasoning_tokens": None,
    "cache_creation_tokens": 120,
}
GEMINI = {
    "model": "gemini-2.5-flash",
    "response_id": "mL5ZaM-xCYqNjMcP5v2bkQ4",
    "finish_reason": "STOP",
    "upstream_error": None,
    "input_tokens": 9,
    "output_tokens": 42 + 984,  # candidates + thoughts
    "total_tokens": 1035,
    "cached_tokens": 4,
    "reasoning_tokens": 984,
    "cache_creation_tokens": None,
}

# (fixture, dialect, upstream path, content type, expected meta)
FIXTURES = [
    ("openai_chat_include_usage.sse", "openai", "/v1/chat/completions", SSE, OPENAI_CHAT),
    ("openai_responses.sse", "openai", "/v1/responses", SSE, OPENAI_RESPONSES),
    ("anthropic_messages.sse", "anthropic", "/v1/messages", SSE, ANTHROPIC),
    (
        "gemini_stream.sse",
        "gemini",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        SSE,
        GEMINI,
    ),
    (
        "gemini_stream.json",
        "gemini",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        JSON,
        GEMINI,
    ),
]
FOR_EACH_FIXTURE = pytest.mark.parametrize(
    ("name", "dialect", "path", "ctype", "expected"), FIXTURES, ids=[f[0] for f in FIXTURES]
)


def make_parser(dialect: str, path: str, ctype: str | None,
                encoding: str | None) -> ResponseReader:
    return response_reader(DIALECTS.get(dialect, DIALECTS["openai"]), path, ctype, encoding)


def flat(meta: ResponseMeta) -> dict[str, Any]:
    """The meta as one flat dict, the way the tests state expectations."""
    u = meta.usage
    return {"model": meta.model, "response_id": meta.response_id,
            "finish_reason": meta.finish_reason, "upstream_error": meta.error,
            "input_tokens": u.input_tokens, "output_tokens": u.output_tokens,
            "total_tokens": u.total_tokens, "cached_tokens": u.cached_tokens,
            "reasoning_tokens": u.reasoning_tokens,
            "cache_creation_tokens": u.cache_creation_tokens}


def parse(
    dialect: str,
    path: str,
    ctype: str | None,
    chunks: Iterable[bytes],
    encoding: str | None = None,
) -> dict[str, Any]:
    parser = make_parser(dialect, path, ctype, encoding)
    for chunk in chunks:
        parser.feed(chunk)
    parser.close()
    return flat(parser.meta)


def line_variant(data: bytes, eol: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", eol)


def variants(name: str, data: bytes) -> list[bytes]:
    if not name.endswith(".sse"):
        return [data]
    return [data] + [line_variant(data, eol) for eol in (b"\n", b"\r\n", b"\r")]


@FOR_EACH_FIXTURE
def test_fixture_whole(
    name: str, dialect: str, path: str, ctype: str, expected: dict[str, Any]
) -> None:
    data = (STREAMS / name).read_bytes()
    for variant in variants(name, data):
        assert parse(dialect, path, ctype, [variant]) == expected


@FOR_EACH_FIXTURE
def test_fixture_split_at_every_byte(
    name: str, dialect: str, path: str, ctype: str, expected: dict[str, Any]
) -> None:
    for data in variants(name, (STREAMS / name).read_bytes()):
        for i in range(len(data) + 1):
            assert parse(dialect, path, ctype, [data[:i], data[i:]]) == expected, f"split {i}"
        assert parse(dialect, path, ctype, (data[i : i + 1] for i in range(len(data)))) == expected


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", _raw_deflate),  # what some servers send as "deflate"
    ],
)
@FOR_EACH_FIXTURE
def test_fixture_compressed_split_at_every_byte(
    encoding: str,
    compress: Any,
    name: str,
    dialect: str,
    path: str,
    ctype: str,
    expected: dict[str, Any],
) -> None:
    packed = compress((STREAMS / name).read_bytes())
    assert parse(dialect, path, ctype, [packed], encoding) == expected
    for i in range(len(packed) + 1):
        got = parse(dialect, path, ctype, [packed[:i], packed[i:]], encoding)
        assert got == expected, f"split {i}"
    bytewise = (packed[i : i + 1] for i in range(len(packed)))
    assert parse(dialect, path, ctype, bytewise, encoding) == expected


def test_concatenated_gzip_members() -> None:
    data = (STREAMS / "anthropic_messages.sse").read_bytes()
    half = len(data) // 2
    packed = gzip.compress(data[:half]) + gzip.compress(data[half:])
    assert parse("anthropic", "/v1/messages", SSE, [packed], "gzip") == ANTHROPIC


def test_highly_compressible_chunk_is_inflated_in_pieces() -> None:
    # 40 MB of padding in ~40 KB of gzip: parsed piecewise, never held at once.
    padding = b": " + b"p" * 1_000_000 + b"\n"
    data = (STREAMS / "openai_chat_include_usage.sse").read_bytes()
    packed = gzip.compress(padding * 40 + data)
    tracemalloc.start()
    try:
        meta = parse("openai", "/v1/chat/completions", SSE, [packed], "gzip")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert meta == OPENAI_CHAT
    assert peak < 8 * 1024 * 1024


# ------------------------------------------------------------------------- JSON bodies


def body(dialect: str, path: str, doc: object, ctype: str | None = JSON) -> dict[str, Any]:
    return parse(dialect, path, ctype, [json.dumps(doc).encode()])


def test_openai_chat_json() -> None:
    doc = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "length"}],
        "usage": {
            "prompt_tokens": 19,
            "completion_tokens": 10,
            "total_tokens": 29,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }
    meta = body("openai", "/v1/chat/completions", doc)
    assert meta["model"] == "gpt-4o-2024-08-06"
    assert meta["finish_reason"] == "length"
    assert (meta["input_tokens"], meta["output_tokens"], meta["total_tokens"]) == (19, 10, 29)
    assert (meta["cached_tokens"], meta["reasoning_tokens"]) == (0, 0)


def test_openai_legacy_completions_stream_with_usage_on_a_choice_chunk() -> None:
    # Some OpenAI-compatible servers put usage on a chunk that still has choices.
    stream = (
        b'data: {"id":"cmpl-1","object":"text_completion","model":"gpt-3.5-turbo-instruct",'
        b'"choices":[{"text":"Hi","index":0,"finish_reason":null}]}\n\n'
        b'data: {"id":"cmpl-1","object":"text_completion","model":"gpt-3.5-turbo-instruct",'
        b'"choices":[{"text":"!","index":0,"finish_reason":"stop"}],'
        b'"usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}\n\n'
        b"data: [DONE]\n\n"
    )
    meta = parse("openai", "/v1/completions", SSE, [stream])
    assert meta["model"] == "gpt-3.5-turbo-instruct"
    assert meta["finish_reason"] == "stop"
    assert (meta["input_tokens"], meta["output_tokens"], meta["total_tokens"]) == (5, 2, 7)


def test_openai_last_non_null_usage_wins() -> None:
    stream = (
        b'data: {"model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,'
        b'"total_tokens":6}}\n\n'
        b'data: {"model":"m","choices":[],"usage":null}\n\n'
        b'data: {"model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9,'
        b'"total_tokens":14}}\n\n'
    )
    meta = parse("openai", "/v1/chat/completions", SSE, [stream])
    assert (meta["input_tokens"], meta["output_tokens"], meta["total_tokens"]) == (5, 9, 14)


def test_openai_error_in_stream() -> None:
    stream = (
        b'data: {"id":"c","model":"gpt-4o","choices":[{"delta":{"content":"a"},'
        b'"finish_reason":null}]}\n\n'
        b'data: {"error":{"message":"The server had an error","type":"server_error"}}\n\n'
    )
    meta = parse("groq-is-openai", "/v1/chat/completions", SSE, [stream])
    assert meta["upstream_error"] == "The server had an error"
    assert meta["model"] == "gpt-4o"


def test_openai_responses_json() -> None:
    doc = {
        "id": "resp_1",
        "object": "response",
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
        "model": "o3-2025-04-16",
        "error": None,
        "usage": {
            "input_tokens": 100,
            "input_tokens_details": {"cached_tokens": 64},
            "output_tokens": 50,
            "output_tokens_details": {"reasoning_tokens": 50},
            "total_tokens": 150,
        },
    }
    meta = body("openai", "/v1/responses", doc)
    assert meta["finish_reason"] == "max_output_tokens"
    assert meta["response_id"] == "resp_1"
    assert (meta["input_tokens"], meta["cached_tokens"], meta["reasoning_tokens"]) == (100, 64, 50)
    assert meta["upstream_error"] is None


def test_openai_responses_failed_and_error_events() -> None:
    failed = (
        b"event: response.created\n"
        b'data: {"type":"response.created","response":{"id":"resp_2","object":"response",'
        b'"status":"in_progress","model":"gpt-4.1","usage":null,"error":null}}\n\n'
        b"event: response.failed\n"
        b'data: {"type":"response.failed","response":{"id":"resp_2","object":"response",'
        b'"status":"failed","model":"gpt-4.1","error":{"code":"server_error",'
        b'"message":"The model failed"},"usage":null}}\n\n'
    )
    meta = parse("openai", "/v1/responses", SSE, [failed])
    assert (meta["finish_reason"], meta["upstream_error"]) == ("failed", "The model failed")
    assert meta["input_tokens"] is None
    error_event = (
        b'event: error\ndata: {"type":"error","code":"ERR_SOMETHING",'
        b'"message":"Something went wrong","param":null,"sequence_number":1}\n\n'
    )
    meta = parse("openai", "/v1/responses", SSE, [error_event])
    assert meta["upstream_error"] == "Something went wrong"


def test_openai_responses_incomplete_event() -> None:
    stream = (
        b"event: response.incomplete\n"
        b'data: {"type":"response.incomplete","response":{"id":"r","object":"response",'
        b'"status":"incomplete","incomplete_details":{"reason":"content_filter"},"model":"m",'
        b'"usage":{"input_tokens":3,"output_tokens":4,"total_tokens":7}}}\n\n'
    )
    meta = parse("openai", "/v1/responses", SSE, [stream])
    assert (meta["finish_reason"], meta["total_tokens"]) == ("content_filter", 7)


def test_openai_embeddings_output_is_zero() -> None:
    doc = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
    meta = body("openai", "/v1/embeddings", doc)
    assert (meta["input_tokens"], meta["output_tokens"], meta["total_tokens"]) == (8, 0, 8)
    assert meta["model"] == "text-embedding-3-small"


def test_openai_error_body() -> None:
    doc = {"error": {"message": "Incorrect API key", "type": "invalid_request_error"}}
    assert body("openai", "/v1/chat/completions", doc)["upstream_error"] == "Incorrect API key"


def test_anthropic_message_json() -> None:
    doc = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-opus-4-1-20250805",
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "max_tokens",
        "usage": {
            "input_tokens": 10,
            "cache_creation_input_tokens": 5,
            "cache_read_input_tokens": 7,
            "output_tokens": 20,
        },
    }
    meta = body("anthropic", "/v1/messages", doc)
    assert (meta["model"], meta["finish_reason"]) == ("claude-opus-4-1-20250805", "max_tokens")
    assert (meta["input_tokens"], meta["cached_tokens"], meta["cache_creation_tokens"]) == (
        10,
        7,
        5,
    )
    assert meta["total_tokens"] == 10 + 5 + 7 + 20


def test_anthropic_count_tokens() -> None:
    meta = body("anthropic", "/v1/messages/count_tokens", {"input_tokens": 2095})
    assert meta["input_tokens"] == 2095
    assert meta["output_tokens"] is None and meta["total_tokens"] is None


def test_anthropic_error_event_mid_stream() -> None:
    data = (STREAMS / "anthropic_messages.sse").read_bytes()
    cut = data.index(b"event: content_block_stop")
    stream = data[:cut] + (
        b"event: error\n"
        b'data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    )
    meta = parse("anthropic", "/v1/messages", SSE, [stream])
    assert meta["upstream_error"] == "Overloaded"
    assert meta["output_tokens"] == 10
    assert meta["finish_reason"] is None


def test_anthropic_without_event_lines() -> None:
    data = (STREAMS / "anthropic_messages.sse").read_bytes()
    stripped = b"\n".join(line for line in data.split(b"\n") if not line.startswith(b"event:"))
    assert parse("anthropic", "/v1/messages", SSE, [stripped]) == ANTHROPIC


def test_gemini_generate_content_json() -> None:
    doc = {
        "candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": "MAX_TOKENS"}],
        "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 6, "totalTokenCount": 10},
        "modelVersion": "gemini-2.0-flash",
        "responseId": "abc",
    }
    meta = body("gemini", "/v1beta/models/gemini-2.0-flash:generateContent", doc)
    assert (meta["model"], meta["finish_reason"], meta["response_id"]) == (
        "gemini-2.0-flash",
        "MAX_TOKENS",
        "abc",
    )
    assert (meta["input_tokens"], meta["output_tokens"], meta["total_tokens"]) == (4, 6, 10)
    assert meta["reasoning_tokens"] is None


def test_gemini_blocked_prompt() -> None:
    doc = {
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
        "modelVersion": "gemini-2.5-pro",
    }
    meta = body("gemini", "/v1/models/gemini-2.5-pro:generateContent", doc)
    assert (meta["finish_reason"], meta["input_tokens"], meta["output_tokens"]) == (
        "SAFETY",
        8,
        None,
    )


def test_gemini_count_tokens() -> None:
    meta = body("gemini", "/v1beta/models/gemini-2.5-flash:countTokens", {"totalTokens": 31})
    assert meta["input_tokens"] == 31
    assert meta["total_tokens"] is None


def test_gemini_error_element_in_json_array() -> None:
    stream = b'[{"candidates": []}\n,\r\n{"error": {"code": 503, "message": "overloaded"}}\n]'
    meta = parse("gemini", "/v1beta/models/m:streamGenerateContent", JSON, [stream])
    assert meta["upstream_error"] == "overloaded"


def test_gemini_error_body_on_stream_path() -> None:
    doc = {"error": {"code": 400, "message": "API key not valid", "status": "INVALID_ARGUMENT"}}
    meta = body("gemini", "/v1beta/models/m:streamGenerateContent", doc)
    assert meta["upstream_error"] == "API key not valid"


# ----------------------------------------------------------------- framing and boundaries


def test_framing_follows_content_type() -> None:
    # An SSE stream labelled JSON is not SSE: nothing is parsed, nothing raises.
    data = (STREAMS / "openai_chat_include_usage.sse").read_bytes()
    assert parse("openai", "/v1/chat/completions", JSON, [data])["input_tokens"] is None
    # Binary responses are not held at all.
    parser = make_parser("openai", "/v1/audio/speech", "audio/mpeg", None)
    parser.feed(b"\xff\xfb" * 1000)
    parser.close()
    assert flat(parser.meta) == parse("openai", "/", "audio/mpeg", [])


def test_unsupported_encoding_is_passed_unparsed() -> None:
    data = (STREAMS / "openai_chat_include_usage.sse").read_bytes()
    meta = parse("openai", "/v1/chat/completions", SSE, [data], "br")
    assert meta["input_tokens"] is None


def test_at_boundary() -> None:
    parser = make_parser("openai", "/v1/chat/completions", SSE, None)
    assert parser.at_boundary
    parser.feed(b'data: {"a":')
    assert not parser.at_boundary
    assert parser.terminator == b"\n\n"
    parser.feed(b"1}\n\n")
    assert parser.at_boundary
    assert parser.terminator == b""
    json_parser = make_parser("openai", "/v1/chat/completions", JSON, None)
    json_parser.feed(b'{"a":')
    assert json_parser.at_boundary


def test_prefilter_skips_text_deltas(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = base.loads

    def counting(data: bytes) -> Any:
        calls.append(data)
        return real(data)

    for module in ("openai", "anthropic"):
        monkeypatch.setattr(sys.modules[f"llmproxy.providers.{module}"], "loads", counting)
    stream = _chat_stream(50)
    meta = parse("openai", "/v1/chat/completions", SSE, stream)
    assert meta["output_tokens"] == 50 and meta["model"] == "gpt-4o-mini"
    # First chunk (model, id), the finish_reason chunk, the usage chunk: 3 of 53 events.
    assert len(calls) == 3
    calls.clear()
    parse("anthropic", "/v1/messages", SSE, [(STREAMS / "anthropic_messages.sse").read_bytes()])
    assert len(calls) == 3  # message_start and two message_delta: no pings, no deltas


def _chat_stream(n: int) -> list[bytes]:
    head = b'data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,'
    head += b'"model":"gpt-4o-mini","system_fingerprint":"fp","choices":[{"index":0,'
    events = [
        head + b'"delta":{"content":"token %d "},"logprobs":null,"finish_reason":null}],'
        b'"usage":null}\n\n' % i
        for i in range(n)
    ]
    events.append(head + b'"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}\n\n')
    events.append(
        b'data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,'
        b'"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":12,'
        b'"completion_tokens":%d,"total_tokens":%d}}\n\n' % (n, n + 12)
    )
    events.append(b"data: [DONE]\n\n")
    return events


# ------------------------------------------------------------------- bounded and hostile


def test_huge_sse_event_is_dropped_and_memory_stays_bounded() -> None:
    parser = make_parser("openai", "/v1/chat/completions", SSE, None)
    stream = _chat_stream(3)
    piece = b"x" * 65536
    tracemalloc.start()
    try:
        parser.feed(stream[0])
        parser.feed(b'data: {"usage": {"prompt_tokens": 999999, "junk": "')
        for _ in range(17 * 16):  # 17 MiB in one event: over the 16 MiB cap
            parser.feed(piece)
        parser.feed(b'"}}\n\n')
        for event in stream[1:]:
            parser.feed(event)
        parser.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert parser.meta.usage.input_tokens == 12  # the oversized event never counted
    assert peak < 18 * 1024 * 1024  # at most one event's worth, not the whole stream


def test_json_body_over_cap_is_not_held() -> None:
    parser = make_parser("openai", "/v1/embeddings", JSON, None)
    parser.feed(b'{"data": [')
    for _ in range(reader.MAX_JSON_BODY // 65536 + 2):
        parser.feed(b"0.123456789," * 5461)
    parser.feed(b'0], "usage": {"prompt_tokens": 1, "total_tokens": 1}}')
    parser.close()
    assert parser.meta.usage.input_tokens is None
    assert parser._body is None


HOSTILE_DOCS: list[object] = [
    [],
    "string",
    123,
    None,
    {"usage": "lots", "choices": 5, "model": 7, "id": ["x"], "error": 3},
    {"usage": {"prompt_tokens": "5", "completion_tokens": -1, "total_tokens": True}},
    {"usage": {"prompt_tokens_details": [], "completion_tokens_details": "x"}},
    {"response": {"usage": {"input_tokens": 1e400}}, "type": "error", "message": 5},
    {"type": "message_start", "message": []},
    {"type": "message_delta", "delta": "x", "usage": []},
    {"candidates": [None, 1], "usageMetadata": {"promptTokenCount": {"a": 1}}},
    {"candidates": {}, "promptFeedback": [], "usageMetadata": None, "error": {"code": 1}},
]


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "gemini"])
def test_hostile_json_never_raises(dialect: str) -> None:
    nested = b"[" * 100000 + b"]" * 100000
    for ctype, path in (
        (SSE, "/v1/messages"),
        (JSON, "/v1/x:streamGenerateContent"),
        (JSON, "/v1/chat/completions"),
    ):
        for doc in HOSTILE_DOCS:
            raw = json.dumps(doc).encode()
            payload = b"data: " + raw + b"\n\n" if ctype == SSE else raw
            meta = parse(dialect, path, ctype, [payload])
            for key in ("input_tokens", "output_tokens", "total_tokens", "cached_tokens"):
                assert meta[key] is None, (doc, key)
        parse(dialect, path, ctype, [b"data: " + nested + b"\n\n", nested])
        parse(dialect, path, ctype, [b'data: {"usage": {"prompt_tokens": 1' + b"9" * 5000])


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "gemini"])
@pytest.mark.parametrize("encoding", [None, "gzip", "deflate"])
@pytest.mark.parametrize("ctype", [SSE, JSON, None])
def test_random_bytes_never_raise(dialect: str, encoding: str | None, ctype: str | None) -> None:
    rnd = random.Random(f"{dialect}{encoding}{ctype}")
    alphabet = b'data:event \r\n{}[]"\\usage\x00\xff\x1f\x8b'
    for _ in range(30):
        parser = make_parser(dialect, "/v1beta/models/m:streamGenerateContent", ctype, encoding)
        for _ in range(rnd.randint(0, 30)):
            parser.feed(bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 50))))
            assert isinstance(parser.at_boundary, bool)
        parser.close()
        parser.feed(b"after close")
        parser.close()


def test_feed_after_internal_failure_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = make_parser("anthropic", "/v1/messages", SSE, None)

    def boom(self: object, name: str, data: bytes) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(anthropic.AnthropicUsage, "event", boom)
    parser.feed(b"event: message_start\ndata: {}\n\n")  # must not raise
    parser.feed(b"data: more\n\n")
    parser.close()
    assert parser.meta.model is None
    assert parser.at_boundary is False  # unsure: the relay then adds a blank line


def test_make_parser_survives_bad_arguments() -> None:
    parser = make_parser("openai", None, None, None)  # type: ignore[arg-type]
    assert isinstance(parser, ResponseReader)
    parser.feed(b"{}")
    parser.close()


def test_boundary_is_unknown_when_the_body_cannot_be_decoded() -> None:
    parser = make_parser("openai", "/v1/chat/completions", SSE, "br")
    parser.feed(b"\x8b\x01\x80")
    assert parser.at_boundary is False
    assert parser.terminator == b"\n\n"


def test_boundary_after_close() -> None:
    parser = make_parser("anthropic", "/v1/messages", SSE, None)
    parser.feed(b"event: ping\ndata: {}")
    parser.close()
    assert parser.at_boundary
