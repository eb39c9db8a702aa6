"""Incremental splitting of a streamed JSON array (Gemini streamGenerateContent without SSE)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llmproxy.streams.jsonarray import JSONArraySplitter

STREAMS = Path(__file__).parents[1] / "fixtures" / "streams"


def split(*chunks: bytes, **kwargs: int) -> list[bytes]:
    splitter = JSONArraySplitter(**kwargs)
    out = []
    for chunk in chunks:
        out += splitter.feed(chunk)
    return out


def test_fixture_elements_are_the_array_items() -> None:
    data = (STREAMS / "gemini_stream.json").read_bytes()
    elements = split(data)
    assert [json.loads(e) for e in elements] == json.loads(data)
    assert len(elements) == 3


def test_fixture_split_at_every_byte_and_bytewise() -> None:
    data = (STREAMS / "gemini_stream.json").read_bytes()
    whole = split(data)
    for i in range(len(data) + 1):
        assert split(data[:i], data[i:]) == whole, f"split at {i}"
    assert split(*(data[i : i + 1] for i in range(len(data)))) == whole


@pytest.mark.parametrize(
    "text",
    [
        'a "quoted" ]} [{ string',
        "backslash at end \\",
        '\\\\" mixed \\" escapes ]',
        "unicode \u00e9\u4e2d \U0001f600 and \\u005d",
    ],
)
def test_strings_with_structure_characters(text: str) -> None:
    items = [{"t": text, "n": [1, {"x": [text]}]}, {"t": text[::-1]}, [text]]
    data = ("[" + "\n,\r\n".join(json.dumps(i) for i in items) + "\n]").encode()
    for i in range(len(data) + 1):
        got = split(data[:i], data[i:])
        assert [json.loads(e) for e in got] == items


def test_bare_object_body_is_one_element() -> None:
    body = b'{"error": {"code": 429, "message": "Resource [exhausted]", "status": "X"}}'
    assert split(body[:10], body[10:]) == [body]


def test_scalars_and_empty_array_yield_nothing() -> None:
    assert split(b'[1, "two", true, null]') == []
    assert split(b"[]") == []
    assert split(b"") == []


def test_oversized_element_is_dropped_with_bounded_memory() -> None:
    splitter = JSONArraySplitter(max_element_bytes=1000)
    assert splitter.feed(b'[{"a": 1},\n{"big": "') == [b'{"a": 1}']
    for _ in range(100):
        assert splitter.feed(b"y" * 100) == []
        assert splitter.buffered_bytes <= 1000
    assert splitter.feed(b'"},\n{"b": 2}]') == [b'{"b": 2}']
    assert splitter.dropped == 1


def test_random_garbage_never_raises() -> None:
    rnd = random.Random(99)
    splitter = JSONArraySplitter(max_element_bytes=512)
    for _ in range(3000):
        chunk = bytes(rnd.choice(b'[]{}"\\, a\n') for _ in range(rnd.randint(0, 30)))
        for element in splitter.feed(chunk):
            assert element[:1] in (b"{", b"[")
