"""Request inspection: streaming detection, model, user, prompt size, output cap."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llmproxy.exchange import RequestInfo
from llmproxy.providers import DIALECTS
from llmproxy.providers.base import MAX_CHOICES, MAX_OUTPUT_TOKENS


def inspect_request(dialect: str, method: str, path: str, query: str,
                    headers: dict[str, str], body: bytes | None) -> RequestInfo:
    return DIALECTS.get(dialect, DIALECTS["openai"]).inspect(method, path, query, headers, body)


def inspect(
    dialect: str,
    path: str,
    doc: object = None,
    *,
    method: str = "POST",
    query: str = "",
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> RequestInfo:
    body = raw if raw is not None else (None if doc is None else json.dumps(doc).encode())
    return inspect_request(dialect, method, path, query, headers or {}, body)


# ------------------------------------------------------------------------------ streaming

GEM = "/v1beta/models/gemini-2.5-flash"


@pytest.mark.parametrize(
    ("dialect", "path", "doc", "method", "query", "headers", "streaming"),
    [
        ("openai", "/v1/chat/completions", {"stream": True}, "POST", "", {}, True),
        ("openai", "/v1/chat/completions", {"stream": False}, "POST", "", {}, False),
        ("openai", "/v1/chat/completions", {"stream": "true"}, "POST", "", {}, False),
        ("openai", "/v1/completions", {"stream": True}, "POST", "", {}, True),
        ("openai", "/v1/responses", {"stream": True}, "POST", "", {}, True),
        ("openai", "/openai/v1/chat/completions/", {"stream": True}, "POST", "", {}, True),
        ("openai", "/v1/embeddings", {"stream": True}, "POST", "", {}, False),
        ("openai", "/v1/models", None, "GET", "", {"Accept": "text/event-stream"}, True),
        ("openai", "/v1/x", None, "GET", "", {"accept": "TEXT/EVENT-STREAM; q=1"}, True),
        ("anthropic", "/v1/messages", {"stream": True}, "POST", "", {}, True),
        ("anthropic", "/v1/messages", {}, "POST", "", {}, False),
        ("anthropic", "/v1/messages/count_tokens", {"stream": True}, "POST", "", {}, False),
        ("gemini", GEM + ":streamGenerateContent", {}, "POST", "", {}, True),
        ("gemini", GEM + ":generateContent", {}, "POST", "alt=sse", {}, True),
        ("gemini", GEM + ":generateContent", {}, "POST", "key=k", {}, False),
        ("groq", "/v1/chat/completions", {"stream": True}, "POST", "", {}, True),
    ],
)
def test_streaming(
    dialect: str,
    path: str,
    doc: object,
    method: str,
    query: str,
    headers: dict[str, str],
    streaming: bool,
) -> None:
    info = inspect(dialect, path, doc, method=method, query=query, headers=headers)
    assert info.streaming is streaming


def test_gemini_streaming_known_without_body() -> None:
    info = inspect("gemini", "/v1/models/gemini-2.0-flash:streamGenerateContent", None)
    assert info.streaming and info.model == "gemini-2.0-flash"
    assert info.text_chars is None


# ------------------------------------------------------------------------- model and user


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/v1beta/models/gemini-2.5-flash:generateContent", "gemini-2.5-flash"),
        ("/v1/models/gemini-2.5-pro:countTokens", "gemini-2.5-pro"),
        ("/v1beta/models/gemini%2D2.5-flash%3AstreamGenerateContent", "gemini-2.5-flash"),
        ("/v1beta/tunedModels/my-tuned-1:generateContent", "tunedModels/my-tuned-1"),
        ("/v1beta/models/embedding-001", "embedding-001"),
        ("/v1beta/models", None),
        ("/v1beta/files", None),
    ],
)
def test_gemini_model_from_path(path: str, model: str | None) -> None:
    assert inspect("gemini", path, None).model == model


def test_gemini_model_from_body_when_path_has_none() -> None:
    info = inspect("gemini", "/v1beta/batches", {"model": "models/gemini-2.5-flash"})
    assert info.model == "gemini-2.5-flash"


def test_openai_model_and_user() -> None:
    info = inspect("openai", "/v1/chat/completions", {"model": "gpt-4o", "user": "alice"})
    assert (info.model, info.user) == ("gpt-4o", "alice")


def test_anthropic_model_and_user() -> None:
    doc = {"model": "claude-sonnet-4-5", "metadata": {"user_id": "u-42"}, "user": "ignored"}
    info = inspect("anthropic", "/v1/messages", doc)
    assert (info.model, info.user) == ("claude-sonnet-4-5", "u-42")


# ---------------------------------------------------------------------------- text_chars


def test_openai_chat_text_chars() -> None:
    doc = {
        "messages": [
            {"role": "system", "content": "abcde"},  # 5
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "0123456789"},  # 10
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
            {"role": "assistant", "content": None, "tool_calls": []},
            {"role": "tool", "content": "xyz"},  # 3
        ]
    }
    assert inspect("openai", "/v1/chat/completions", doc).text_chars == 18


@pytest.mark.parametrize(("prompt", "chars"), [("hello", 5), (["ab", "cde"], 5), ([1, 2], 0)])
def test_openai_legacy_prompt(prompt: Any, chars: int) -> None:
    assert inspect("openai", "/v1/completions", {"prompt": prompt}).text_chars == chars


def test_openai_responses_input() -> None:
    doc = {
        "instructions": "be brief",  # 8
        "input": [
            {"role": "user", "content": "hello"},  # 5
            {"role": "user", "content": [{"type": "input_text", "text": "four"}]},  # 4
            {"type": "function_call_output", "call_id": "c", "output": "42"},  # 2
            {"type": "input_image", "image_url": "https://example.invalid/x.png"},
        ],
    }
    assert inspect("openai", "/v1/responses", doc).text_chars == 19
    assert inspect("openai", "/v1/responses", {"input": "just text"}).text_chars == 9


def test_anthropic_text_chars_include_system_and_tool_results() -> None:
    doc = {
        "system": [{"type": "text", "text": "sys"}],  # 3
        "messages": [
            {"role": "user", "content": "hello"},  # 5
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "ab"},  # 2
                    {
                        "type": "tool_result",
                        "tool_use_id": "t",
                        "content": [{"type": "text", "text": "result"}],  # 6
                    },
                    {"type": "tool_result", "tool_use_id": "u", "content": "done"},  # 4
                    {"type": "image", "source": {"type": "base64", "data": "AAAA"}},
                ],
            },
        ],
    }
    assert inspect("anthropic", "/v1/messages", doc).text_chars == 20
    assert inspect("anthropic", "/v1/messages", {"system": "abc"}).text_chars == 3


def test_gemini_text_chars() -> None:
    doc = {
        "systemInstruction": {"parts": [{"text": "sys"}]},  # 3
        "contents": [
            {"role": "user", "parts": [{"text": "hello"}, {"inlineData": {"data": "AA"}}]},  # 5
            {"role": "model", "parts": [{"text": "hi"}]},  # 2
        ],
    }
    assert inspect("gemini", "/v1beta/models/m:generateContent", doc).text_chars == 10
    snake = {"system_instruction": {"parts": [{"text": "abcd"}]}, "contents": {"parts": []}}
    assert inspect("gemini", "/v1beta/models/m:generateContent", snake).text_chars == 4


def test_unicode_counts_characters_not_bytes() -> None:
    doc = {"messages": [{"role": "user", "content": "héllo 中文"}]}
    assert inspect("openai", "/v1/chat/completions", doc).text_chars == 8


# ---------------------------------------------------------------------- max_output_tokens


@pytest.mark.parametrize(
    ("dialect", "doc", "expected"),
    [
        ("openai", {"max_tokens": 100}, 100),
        ("openai", {"max_completion_tokens": 200, "max_tokens": 100}, 200),
        ("openai", {"max_output_tokens": 300}, 300),
        ("openai", {"max_tokens": "100"}, None),
        ("openai", {"max_tokens": True}, None),
        ("openai", {"max_tokens": -5}, None),
        ("anthropic", {"max_tokens": 1024}, 1024),
        ("gemini", {"generationConfig": {"maxOutputTokens": 512}}, 512),
        ("gemini", {"generation_config": {"max_output_tokens": 64}}, 64),
        ("gemini", {"generationConfig": "x"}, None),
    ],
)
def test_max_output_tokens(dialect: str, doc: dict[str, Any], expected: int | None) -> None:
    assert inspect(dialect, "/v1/x", doc).max_output_tokens == expected


HUGE = 10**400  # valid JSON, and Python's json parses it


@pytest.mark.parametrize(
    ("dialect", "doc", "choices", "cap"),
    [
        ("openai", {"max_tokens": HUGE}, 1, MAX_OUTPUT_TOKENS),
        ("openai", {"max_completion_tokens": HUGE, "n": HUGE}, MAX_CHOICES,
         MAX_OUTPUT_TOKENS * MAX_CHOICES),
        ("openai", {"max_tokens": 10, "best_of": HUGE}, MAX_CHOICES, 10 * MAX_CHOICES),
        ("anthropic", {"max_tokens": HUGE}, 1, MAX_OUTPUT_TOKENS),
        ("gemini", {"generationConfig": {"maxOutputTokens": HUGE}}, 1, MAX_OUTPUT_TOKENS),
        ("gemini", {"generationConfig": {"maxOutputTokens": 10, "candidateCount": HUGE}},
         MAX_CHOICES, 10 * MAX_CHOICES),
        ("gemini", {"generation_config": {"max_output_tokens": HUGE, "candidate_count": 3}},
         3, MAX_OUTPUT_TOKENS * 3),
    ],
)
def test_huge_caps_and_choice_counts_are_clamped(dialect: str, doc: dict[str, Any],
                                                 choices: int, cap: int) -> None:
    info = inspect(dialect, "/v1/x", raw=json.dumps(doc).encode())
    assert (info.choices, info.max_output_tokens) == (choices, cap)


# -------------------------------------------------------------------------------- hostile


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "gemini"])
@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[1, 2, 3]",
        b'"string"',
        b"[" * 200000 + b"]" * 200000,
        b'{"a":' * 100000 + b"1" + b"}" * 100000,
        b'{"max_tokens": ' + b"9" * 10000 + b"}",
    ],
)
def test_hostile_bodies_never_raise(dialect: str, raw: bytes) -> None:
    info = inspect(dialect, "/v1/chat/completions", raw=raw)
    assert info.text_chars is None
    assert info.text_chars is None
    assert info.max_output_tokens is None


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "gemini"])
def test_wrong_types_everywhere(dialect: str) -> None:
    doc = {
        "model": ["x"],
        "user": {"id": 1},
        "stream": 1,
        "metadata": "m",
        "messages": {"content": "x"},
        "system": 5,
        "prompt": {"a": 1},
        "input": 3.5,
        "instructions": ["x"],
        "contents": [None, 1, {"parts": "text"}, {"parts": [None, {"text": 5}]}],
        "systemInstruction": [],
    }
    info = inspect(dialect, "/v1beta/models/:generateContent", doc)
    assert info.text_chars is not None
    assert info.text_chars == 0
    assert info.user is None
    assert info.streaming is False


def test_request_info_defaults_when_body_missing() -> None:
    info = inspect("openai", "/v1/chat/completions", None)
    assert info == RequestInfo(
        model=None,
        streaming=False,
        user=None,
        text_chars=None,
        max_output_tokens=None,
    )


def test_werkzeug_headers_are_case_insensitive() -> None:
    from werkzeug.datastructures import Headers

    headers = Headers([("ACCEPT", "text/event-stream")])
    info = inspect_request("openai", "GET", "/v1/x", "", headers, None)
    assert info.streaming
