"""Fuzzing what reads client and upstream bytes: random and mutated inputs, split anywhere.

Targets: the SSE decoder, the JSON-array splitter, request inspection (each dialect) and the
response usage parser. Properties: no exception escapes (for the parser and the inspection,
whose own safety nets would hide one, the net must not have been used either); the same events
however the bytes are split (and, where a simple model exists, the events the model gives);
results of the documented types; and work linear in the input.

Linear work is shown without a clock: ``workmeter`` counts, for an input of size n and the
same shape at 8n, the calls made (Python and C), the bytes of every bytes/str object whose
method was called, and the bytes allocated. Linear code grows about 8 times, quadratic code
about 64; the tests allow 12. The counts are deterministic, so the test does not depend on the
machine's load, and the meter's own tests below show it catching each kind of quadratic work
(a loop per byte, a re-scan per byte, a copy per byte). Each shape is one a quadratic
implementation would choke on (a long line fed byte by byte, CR storms, deep brackets, long
model names...), plus random units repeated n and 8n times.

Hypothesis settings (:func:`fuzz`): ``derandomize=True``, so the examples are a fixed
function of each test: a CI run is reproducible, and a failure in CI fails the same way on a
laptop instead of depending on a seed or on an example database (none is kept).
``deadline=None``: the machine is shared, and time is checked by the work counts instead.
``max_examples`` is sized so this module runs in a few seconds. For a longer hunt with fresh
random inputs, set ``FUZZ_EXAMPLES`` (examples per test), e.g.
``FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_fuzz.py``; hypothesis then prints
the ``@reproduce_failure`` line for anything it finds.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import Headers
from workmeter import assert_linear, measure

# The code under test, imported here only: the one place to change when the modules move.
from llmproxy.exchange import RequestInfo
from llmproxy.providers import DIALECTS as _DIALECTS
from llmproxy.providers import response_reader
from llmproxy.streams.jsonarray import JSONArraySplitter
from llmproxy.streams.reader import ResponseReader
from llmproxy.streams.sse import SSEDecoder

#: The logger the reader and the dialects report swallowed exceptions to (and its children).
PARSER_LOGGER = "llmproxy"


def make_parser(dialect: str, path: str, ctype: str | None,
                encoding: str | None) -> ResponseReader:
    return response_reader(_DIALECTS[dialect], path, ctype, encoding)


def inspect_request(dialect: str, method: str, path: str, query: str,
                    headers: dict[str, str] | Headers, body: bytes | None) -> RequestInfo:
    return _DIALECTS[dialect].inspect(method, path, query, headers, body)

STREAMS = Path(__file__).parent / "fixtures" / "streams"
SSE_CT = "text/event-stream; charset=utf-8"
JSON_CT = "application/json; charset=UTF-8"
DIALECTS = ("openai", "anthropic", "gemini")

# (fixture, dialect, upstream path, content type)
PARSER_FIXTURES = [
    ("openai_chat_include_usage.sse", "openai", "/v1/chat/completions", SSE_CT),
    ("openai_responses.sse", "openai", "/v1/responses", SSE_CT),
    ("anthropic_messages.sse", "anthropic", "/v1/messages", SSE_CT),
    ("gemini_stream.sse", "gemini",
     "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", SSE_CT),
    ("gemini_stream.json", "gemini",
     "/v1beta/models/gemini-2.5-flash:streamGenerateContent", JSON_CT),
]
FIXTURE_BYTES = {name: (STREAMS / name).read_bytes() for name, *_ in PARSER_FIXTURES}
SSE_FIXTURES = [data for name, data in FIXTURE_BYTES.items() if name.endswith(".sse")]

_EXAMPLES = os.environ.get("FUZZ_EXAMPLES")


def fuzz(examples: int) -> settings:
    """Settings for one property test: ``examples`` per run unless FUZZ_EXAMPLES is set."""
    return settings(
        max_examples=int(_EXAMPLES) if _EXAMPLES else examples,
        derandomize=not _EXAMPLES,
        database=None,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ----------------------------------------------------------------------------- strategies

# Bytes that mean something to one of the readers; mutations insert them.
TOKENS = [
    b"\r", b"\n", b"\r\n", b"\n\n", b"\r\r", b":", b"data:", b"data: ", b"event:", b"event: error",
    b": ping", b"\xef\xbb\xbf", b'"', b"\\", b'\\"', b"{", b"}", b"[", b"]", b",", b"\x00",
    b"\xff", b"\x80", b'"usage":', b'"usage": null', b'"error"', b'"finish_reason":"stop"',
    b"null", b"1e999", b"-1", b"[DONE]", b'{"type":"message_delta"', b"usageMetadata",
]

# Keys that the inspection and the usage handlers look for, so random documents reach them.
KEYS = [
    "model", "messages", "content", "text", "type", "tool_result", "stream", "user", "metadata",
    "user_id", "max_tokens", "max_completion_tokens", "max_output_tokens", "prompt", "input",
    "instructions", "output", "contents", "parts", "systemInstruction", "system_instruction",
    "generationConfig", "generation_config", "maxOutputTokens", "system", "role", "usage",
    "choices", "finish_reason", "id", "error", "message", "delta", "stop_reason", "candidates",
    "usageMetadata", "promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount",
    "totalTokenCount", "cachedContentTokenCount", "modelVersion", "responseId", "finishReason",
    "promptFeedback", "blockReason", "prompt_tokens", "completion_tokens", "total_tokens",
    "input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
    "prompt_tokens_details", "input_tokens_details", "cached_tokens",
    "completion_tokens_details", "output_tokens_details", "reasoning_tokens", "response",
    "object", "status", "incomplete_details", "reason", "code", "totalTokens",
]

texts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "\ud800", "\udfff", "\U0001f600", "tool_result", "text", "response",
                     "message_start", "error", "stop", "text/event-stream", "null", "\\", '"']),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 2**63, 10**400, 1.0, -0.0, 1e308]),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=6))


def json_values(leaves: st.SearchStrategy[Any] = scalars, max_leaves: int = 25
                ) -> st.SearchStrategy[Any]:
    """Any JSON value, keys mostly from KEYS."""
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=5),
            st.dictionaries(keys, children, max_size=6),
        ),
        max_leaves=max_leaves,
    )


small_values = json_values(max_leaves=4)


def hostile(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The expected shape, or a value of any other type in its place."""
    return st.one_of(strategy, strategy, scalars, small_values)


# A request body with every dialect's fields (each dialect ignores the others'), any of which
# may hold the wrong type.
part = st.fixed_dictionaries({}, optional={
    "type": hostile(st.sampled_from(["text", "tool_result", "image"])),
    "text": hostile(texts),
    "content": hostile(st.one_of(texts, st.lists(
        st.fixed_dictionaries({}, optional={"type": hostile(texts), "text": hostile(texts)}),
        max_size=3))),
})
parts = st.lists(st.one_of(part, texts), max_size=4)
message = st.fixed_dictionaries({}, optional={
    "role": hostile(texts), "content": hostile(st.one_of(texts, parts)),
    "text": hostile(texts), "output": hostile(texts), "parts": hostile(parts),
})
counts = hostile(st.integers(min_value=-5, max_value=2**40))
request_docs = st.fixed_dictionaries({}, optional={
    "model": hostile(texts),
    "stream": hostile(st.booleans()),
    "user": hostile(texts),
    "metadata": hostile(st.fixed_dictionaries({}, optional={"user_id": hostile(texts)})),
    "messages": hostile(st.lists(message, max_size=4)),
    "system": hostile(st.one_of(texts, parts)),
    "prompt": hostile(st.one_of(texts, st.lists(texts, max_size=3))),
    "input": hostile(st.one_of(texts, st.lists(st.one_of(texts, message), max_size=3))),
    "instructions": hostile(texts),
    "contents": hostile(st.one_of(message, st.lists(message, max_size=3))),
    "systemInstruction": hostile(message),
    "system_instruction": hostile(message),
    "generationConfig": hostile(st.fixed_dictionaries({}, optional={
        "maxOutputTokens": counts, "max_output_tokens": counts})),
    "generation_config": hostile(st.fixed_dictionaries({}, optional={
        "maxOutputTokens": counts})),
    "max_tokens": counts,
    "max_completion_tokens": counts,
    "max_output_tokens": counts,
})


@st.composite
def encoded(draw: st.DrawFn, values: st.SearchStrategy[Any]) -> bytes:
    """A JSON document as a client could send it: any layout, any JSON encoding."""
    doc = draw(values)
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()),
                      indent=draw(st.sampled_from([None, None, 0, 2])))
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-32"]))
    return text.encode(encoding, "surrogatepass")


@st.composite
def mutated(draw: st.DrawFn, sources: Sequence[bytes]) -> bytes:
    """One of ``sources`` with a few bytes flipped, inserted, deleted, duplicated or cut."""
    buf = bytearray(draw(st.sampled_from(sources)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "repeat", "cut"]))
        pos = draw(st.integers(0, len(buf)))
        end = min(len(buf), pos + draw(st.integers(0, 24)))
        if op == "flip" and pos < len(buf):
            buf[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            buf[pos:pos] = draw(st.one_of(st.sampled_from(TOKENS), st.binary(max_size=4)))
        elif op == "delete":
            del buf[pos:end]
        elif op == "repeat":
            buf[pos:pos] = buf[pos:end] * draw(st.integers(1, 4))
        elif op == "cut":
            del buf[pos:]
    return bytes(buf)


def token_soup(max_tokens: int = 40) -> st.SearchStrategy[bytes]:
    """Random bytes made mostly of the tokens the readers care about."""
    return st.lists(st.one_of(st.sampled_from(TOKENS), st.binary(max_size=3)),
                    max_size=max_tokens).map(b"".join)


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at random places (empty chunks included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=24)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# ------------------------------------------------------------------------------- helpers

Event = tuple[str, bytes]


def sse_events(chunks: Sequence[bytes], **kwargs: int) -> tuple[list[Event], SSEDecoder]:
    dec = SSEDecoder(**kwargs)
    events: list[Event] = []
    for chunk in chunks:
        events += dec.feed(chunk)
    events += dec.close()
    return events, dec


def reference_sse(data: bytes) -> list[Event]:
    """The event-stream rules applied to the whole body at once (plus the decoder's one
    deliberate extra: a last event without its blank line still counts)."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    lines = re.split(rb"\r\n|\r|\n", data)
    if lines[-1] == b"":
        lines.pop()  # the body ended with a line break
    events: list[Event] = []
    name, buf = "", []
    for line in [*lines, b""]:
        if not line:
            if buf:
                events.append((name, b"\n".join(buf)))
            name, buf = "", []
            continue
        if line.startswith(b":"):
            continue
        field, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            buf.append(value)
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    return events


def array_elements(chunks: Sequence[bytes], **kwargs: int) -> tuple[list[bytes], int]:
    splitter = JSONArraySplitter(**kwargs)
    out: list[bytes] = []
    for chunk in chunks:
        out += splitter.feed(chunk)
    return out, splitter.dropped


@contextmanager
def swallowed_errors() -> Iterator[list[logging.LogRecord]]:
    """Exceptions the parser caught: it never raises, it logs them and stops parsing."""
    caught: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info:
                caught.append(record)

    logger = logging.getLogger(PARSER_LOGGER)
    handler = Collect()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield caught
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def describe_caught(caught: list[logging.LogRecord]) -> str:
    return "; ".join(logging.Formatter().formatException(r.exc_info) for r in caught if r.exc_info)


def parse(dialect: str, path: str, ctype: str | None, chunks: Sequence[bytes],
          encoding: str | None = None) -> tuple[dict[str, Any], bool, bytes]:
    """Meta, at_boundary and terminator after feeding ``chunks`` (before close) and closing."""
    parser = make_parser(dialect, path, ctype, encoding)
    for chunk in chunks:
        parser.feed(chunk)
    boundary, terminator = parser.at_boundary, parser.terminator
    parser.close()
    meta = dataclasses.asdict(parser.meta)
    usage = meta.pop("usage")
    meta["upstream_error"] = meta.pop("error")
    return {**meta, **usage}, boundary, terminator


def check_meta(meta: dict[str, Any]) -> None:
    for key in ("model", "finish_reason", "response_id", "upstream_error"):
        value = meta[key]
        assert value is None or (isinstance(value, str) and value), (key, value)
    assert meta["upstream_error"] is None or len(meta["upstream_error"]) <= 1000
    for key in ("input_tokens", "output_tokens", "total_tokens", "cached_tokens",
                "reasoning_tokens", "cache_creation_tokens"):
        value = meta[key]
        assert value is None or (type(value) is int and value >= 0), (key, value)


def compress(data: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.compress(data)
    if encoding == "deflate":
        return zlib.compress(data)
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)  # "deflate" sent without its zlib header
    return raw.compress(data) + raw.flush()


# -------------------------------------------------------------------------------- SSE


@fuzz(30)
@given(st.data(), st.one_of(mutated(SSE_FIXTURES), token_soup()))
def test_sse_matches_the_rules_however_split(data: st.DataObject, body: bytes) -> None:
    chunks = data.draw(splits(body))
    events, dec = sse_events(chunks)
    assert events == reference_sse(body)
    assert dec.dropped == 0
    whole = SSEDecoder()
    whole.feed(body)
    split = SSEDecoder()
    for chunk in chunks:
        split.feed(chunk)
    assert (split.at_boundary, split.terminator) == (whole.at_boundary, whole.terminator)


@fuzz(30)
@given(st.data(), st.one_of(mutated(SSE_FIXTURES), token_soup(80)), st.integers(1, 300))
def test_sse_cap_bounds_memory_and_events(data: st.DataObject, body: bytes, cap: int) -> None:
    dec = SSEDecoder(max_event_bytes=cap)
    events: list[Event] = []
    for chunk in data.draw(splits(body)):
        events += dec.feed(chunk)
        assert dec.buffered_bytes <= cap
    events += dec.close()
    assert all(len(payload) <= cap for _, payload in events)
    # Within the cap nothing is lost: the same events as without one.
    if dec.dropped == 0:
        assert events == reference_sse(body)


cut_points = st.lists(st.integers(0, 1 << 16), max_size=24)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` cut at ``points`` (each taken modulo ``len(data) + 1``)."""
    bounds = [0, *sorted(p % (len(data) + 1) for p in points), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@fuzz(30)
@example(body=b"data: usage\n: keep-alive padding padding\n\n", cap=16, points=[20])
@given(body=st.one_of(mutated(SSE_FIXTURES), token_soup(80)), cap=st.integers(1, 300),
       points=cut_points)
def test_sse_cap_drops_the_same_events_however_split(body: bytes, cap: int,
                                                     points: list[int]) -> None:
    whole, whole_dec = sse_events([body], max_event_bytes=cap)
    split, split_dec = sse_events(cut(body, points), max_event_bytes=cap)
    assert (split, split_dec.dropped) == (whole, whole_dec.dropped)


# ------------------------------------------------------------------------- JSON array

array_items = json_values(st.one_of(st.none(), st.booleans(), st.integers(), texts,
                                    st.floats(allow_nan=False)), max_leaves=10)


@fuzz(20)
@given(st.data(), st.lists(array_items, max_size=8), st.sampled_from([None, 0, 1]),
       st.sampled_from([(",", ":"), (",\r\n", ": "), ("\n,\n", ":")]))
def test_jsonarray_yields_the_array_items(data: st.DataObject, items: list[Any],
                                          indent: int | None, seps: tuple[str, str]) -> None:
    text = json.dumps(items, indent=indent, separators=seps, ensure_ascii=False)
    body = text.encode("utf-8", "surrogatepass")
    elements, dropped = array_elements(data.draw(splits(body)))
    parsed = [json.loads(e.decode("utf-8", "surrogatepass")) for e in elements]
    assert parsed == [x for x in items if isinstance(x, (dict, list))]
    assert dropped == 0


@fuzz(30)
@given(st.data(), st.one_of(mutated([FIXTURE_BYTES["gemini_stream.json"]]), token_soup()))
def test_jsonarray_same_elements_however_split(data: st.DataObject, body: bytes) -> None:
    whole = array_elements([body])
    assert array_elements(data.draw(splits(body))) == whole
    for element in whole[0]:
        assert element[:1] in (b"{", b"[") and element[-1:] in (b"}", b"]")


@fuzz(30)
@given(st.data(), st.one_of(mutated([FIXTURE_BYTES["gemini_stream.json"]]), token_soup(80)),
       st.integers(1, 300))
def test_jsonarray_cap_bounds_memory(data: st.DataObject, body: bytes, cap: int) -> None:
    splitter = JSONArraySplitter(max_element_bytes=cap)
    for chunk in data.draw(splits(body)):
        splitter.feed(chunk)
        assert splitter.buffered_bytes <= cap


@fuzz(30)
@example(body=b'[{"a":"0123456789abcdef"}]', cap=10, points=[14])
@given(body=st.one_of(mutated([FIXTURE_BYTES["gemini_stream.json"]]), token_soup(80)),
       cap=st.integers(1, 300), points=cut_points)
def test_jsonarray_cap_drops_the_same_elements_however_split(body: bytes, cap: int,
                                                             points: list[int]) -> None:
    whole = array_elements([body], max_element_bytes=cap)
    assert array_elements(cut(body, points), max_element_bytes=cap) == whole


# ------------------------------------------------------------------- request inspection

GEMINI_MODEL_NAME = st.text(st.sampled_from("abcxyz019.-_"), min_size=1, max_size=20)
header_text = st.text(st.characters(blacklist_characters="\r\n\x00"), max_size=12)  # as parsed
header_names = st.one_of(st.sampled_from(["Accept", "accept", "ACCEPT", "Content-Type",
                                          "X-User-ID", "Authorization"]), header_text)
accept_values = st.one_of(st.sampled_from(["text/event-stream", "TEXT/Event-Stream; q=1",
                                           "application/json", "*/*", ""]), header_text)


@st.composite
def request_headers(draw: st.DrawFn) -> dict[str, str] | Headers:
    pairs = draw(st.lists(st.tuples(header_names, accept_values), max_size=6))
    seen: set[str] = set()
    unique = []  # at most one header per case-insensitive name, as after HTTP parsing
    for name, value in pairs:
        if name.lower() not in seen:
            seen.add(name.lower())
            unique.append((name, value))
    return Headers(unique) if draw(st.booleans()) else dict(unique)


@st.composite
def request_paths(draw: st.DrawFn) -> tuple[str, str | None]:
    """A path, and the Gemini model it names when it is built to name one."""
    name = draw(GEMINI_MODEL_NAME)
    method = draw(st.sampled_from(["generateContent", "streamGenerateContent", "countTokens"]))
    return draw(st.one_of(
        st.just((f"/v1beta/models/{name}:{method}", name)),
        st.just((f"/v1/tunedModels/{name}:{method}", f"tunedModels/{name}")),
        st.sampled_from(["/v1/chat/completions", "/v1/messages", "/v1/responses",
                         "/v1/completions/", "/v1/embeddings"]).map(lambda p: (p, None)),
        st.text(max_size=30).map(lambda p: (p, None)),
    ))


def body_is_object(body: bytes | None) -> bool:
    if not body:
        return False
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return False


def check_inspection(dialect: str, method: str, path: str, query: str,
                     headers: dict[str, str] | Headers, body: bytes | None,
                     gemini_model: str | None = None) -> None:
    """Inspect and check the result against what the request says. inspect_request answers
    an empty RequestInfo when it caught an exception, which these checks notice."""
    info = inspect_request(dialect, method, path, query, headers, body)
    assert info == inspect_request(dialect, method, path, query, headers, body)
    assert isinstance(info.streaming, bool)
    for value in (info.model, info.user):
        assert value is None or (isinstance(value, str) and value)
    if body_is_object(body):
        assert type(info.text_chars) is int and 0 <= info.text_chars <= len(body or b"")
    else:
        assert info.text_chars is None
    mot = info.max_output_tokens
    assert mot is None or (type(mot) is int and mot >= 0)
    accept = [v for k, v in headers.items() if k.lower() == "accept"]
    if accept and "text/event-stream" in accept[0].lower():
        assert info.streaming
    if dialect == "gemini" and gemini_model is not None:
        assert info.model == gemini_model


@fuzz(30)
@given(st.sampled_from(DIALECTS), st.sampled_from(["POST", "post", "GET", "PUT", ""]),
       request_paths(), st.sampled_from(["", "alt=sse", "key=x&alt=sse", "alt=json", "%zz&&="]),
       request_headers(), st.one_of(encoded(request_docs), encoded(json_values()), st.none()))
def test_inspect_request_any_document(dialect: str, method: str, path: tuple[str, str | None],
                                      query: str, headers: dict[str, str] | Headers,
                                      body: bytes | None) -> None:
    check_inspection(dialect, method, path[0], query, headers, body, path[1])


@st.composite
def deep(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(1, 5000))
    opener = draw(st.sampled_from([b"[", b'{"messages":', b'{"a":[', b'{"contents":[{"parts":']))
    closer = {b"[": b"]", b'{"messages":': b"}", b'{"a":[': b"]}",
              b'{"contents":[{"parts":': b"}]}"}[opener]
    inner = draw(st.sampled_from([b"1", b'"x"', b"{}", b'{"text":"t"}']))
    return b'{"m":' + opener * depth + inner + closer * draw(st.integers(0, depth)) + b"}"


@fuzz(30)
@given(st.sampled_from(DIALECTS), request_headers(),
       st.one_of(mutated([json.dumps({"model": "m", "messages": [{"content": "hi"}]}).encode(),
                          json.dumps({"contents": [{"parts": [{"text": "x"}]}]}).encode()]),
                 deep(), token_soup(), st.binary(max_size=64)))
def test_inspect_request_hostile_bytes(dialect: str, headers: dict[str, str] | Headers,
                                       body: bytes) -> None:
    check_inspection(dialect, "POST", "/v1beta/models/m:generateContent", "", headers, body, "m")


def test_inspection_check_notices_a_swallowed_exception() -> None:
    class Broken(dict[str, str]):
        def items(self) -> Any:
            raise RuntimeError("inspection bug")

    with pytest.raises(AssertionError):  # inspect_request returns defaults: no text_chars
        check_inspection("openai", "POST", "/v1/chat/completions", "", Broken(), b'{"a": 1}')


# ------------------------------------------------------------------------ usage parser

FOR_EACH_FIXTURE = pytest.mark.parametrize(
    ("name", "dialect", "path", "ctype"), PARSER_FIXTURES, ids=[f[0] for f in PARSER_FIXTURES])


@FOR_EACH_FIXTURE
@fuzz(8)
@given(data=st.data())
def test_parser_same_result_however_split(data: st.DataObject, name: str, dialect: str,
                                          path: str, ctype: str) -> None:
    body = data.draw(mutated([FIXTURE_BYTES[name]]))
    encoding = data.draw(st.sampled_from([None, None, "gzip", "deflate", "raw-deflate"]))
    wire = body if encoding is None else compress(body, encoding)
    header = "deflate" if encoding == "raw-deflate" else encoding
    with swallowed_errors() as caught:
        whole = parse(dialect, path, ctype, [body])
        split = parse(dialect, path, ctype, data.draw(splits(wire)), header)
    assert not caught, describe_caught(caught)
    check_meta(whole[0])
    assert split == whole


@st.composite
def event_streams(draw: st.DrawFn) -> tuple[str, str, str | None, bytes]:
    """Random documents framed as the upstream would: SSE, a JSON array, or one body."""
    dialect = draw(st.sampled_from(DIALECTS))
    docs = draw(st.lists(json_values(max_leaves=10), min_size=1, max_size=4))
    framing = draw(st.sampled_from(["sse", "array", "body"]))
    if framing == "sse":
        names = st.sampled_from(["", "message_start", "message_delta", "error", "ping"])
        body = b"".join(
            (b"event: " + draw(names).encode() + b"\n" if draw(st.booleans()) else b"")
            + b"data: " + json.dumps(doc).encode() + b"\n\n" for doc in docs)
        return dialect, "/v1beta/models/m:streamGenerateContent?alt=sse", SSE_CT, body
    if framing == "array":
        body = json.dumps(docs).encode()
        return dialect, "/v1beta/models/m:streamGenerateContent", JSON_CT, body
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/messages/count_tokens",
                                 "/v1beta/models/m:countTokens", "/v1/embeddings"]))
    return dialect, path, draw(st.sampled_from([JSON_CT, None])), json.dumps(docs[0]).encode()


@fuzz(20)
@given(st.data(), event_streams())
def test_parser_random_documents(data: st.DataObject,
                                 stream: tuple[str, str, str | None, bytes]) -> None:
    dialect, path, ctype, body = stream
    with swallowed_errors() as caught:
        whole = parse(dialect, path, ctype, [body])
        split = parse(dialect, path, ctype, data.draw(splits(body)))
    assert not caught, describe_caught(caught)
    check_meta(whole[0])
    assert split == whole


def test_parser_check_notices_a_swallowed_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("parser bug")

    monkeypatch.setattr(json, "loads", broken)
    with swallowed_errors() as caught:
        parse("openai", "/v1/chat/completions", JSON_CT, [b'{"model": "m"}'])
    assert caught


# ------------------------------------------------------------------------ linear work
#
# Each case builds an input of size n (bytes, or items for the inspection) with a shape that a
# quadratic implementation would choke on, and workmeter.assert_linear compares the counted
# work for n and 8n.


def feed_all(make: Callable[[], Any], chunks: list[bytes], finish: str | None = None
             ) -> Callable[[], None]:
    def job() -> None:
        reader = make()
        for chunk in chunks:
            reader.feed(chunk)
        if finish:
            getattr(reader, finish)()
    return job


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


SSE_SHAPES: dict[str, tuple[Callable[[int], bytes], int]] = {
    "one long line": (lambda n: b"data: " + b"x" * n, 7),
    "a long line byte by byte": (lambda n: b"data: " + b"x" * n, 1),
    "CR storm": (lambda n: b"\r" * (n // 2), 3),
    "CRLF split across chunks": (lambda n: b"data:x\r\n" * (n // 8), 7),
    "tiny events": (lambda n: b"data:x\n\n" * (n // 8), 64),
    "one event, many data lines": (lambda n: b"data:x\n" * (n // 7) + b"\n", 64),
    "comment flood": (lambda n: b":" * n + b"\n", 5),
    "field name without colon": (lambda n: b"e" * n + b"\n\n", 5),
}


@pytest.mark.parametrize("shape", list(SSE_SHAPES))
def test_sse_work_is_linear(shape: str) -> None:
    make_body, size = SSE_SHAPES[shape]
    n = 64 if size == 1 else 256
    assert_linear(lambda k: feed_all(SSEDecoder, chunked(make_body(k), size), "close"), n,
                  shape)


ARRAY_SHAPES: dict[str, tuple[Callable[[int], bytes], int]] = {
    "open brackets": (lambda n: b"[" * n, 5),
    "close brackets": (lambda n: b"]" * n, 5),
    "tiny elements": (lambda n: b"[" + b"{}," * (n // 3) + b"{}]", 64),
    "escaped quotes split at every byte": (lambda n: b'[{"a":"' + b'\\"' * (n // 2) + b'"}]', 1),
    "deep element": (lambda n: b"[" + b'{"a":' * (n // 5) + b"1" + b"}" * (n // 5) + b"]", 16),
    "unterminated string": (lambda n: b'[{"a":"' + b"x" * n, 7),
}


@pytest.mark.parametrize("shape", list(ARRAY_SHAPES))
def test_jsonarray_work_is_linear(shape: str) -> None:
    make_body, size = ARRAY_SHAPES[shape]
    n = 64 if size == 1 else 256
    assert_linear(lambda k: feed_all(JSONArraySplitter, chunked(make_body(k), size)), n, shape)


Request = tuple[str, str, dict[str, str], bytes]  # path, query, headers, body

# (shape, dialects whose code reads that part) -> request of size k
INSPECT_SHAPES: dict[tuple[str, tuple[str, ...]], Callable[[int], Request]] = {
    ("long model and user", DIALECTS): lambda k: ("/v1/x", "", {}, json.dumps(
        {"model": "x" + "-001" * k, "user": "u" * k,
         "metadata": {"user_id": "u" * k}}).encode()),
    ("many messages", ("openai", "anthropic")): lambda k: ("/v1/x", "", {}, json.dumps(
        {"messages": [{"role": "user", "content": "hi"}] * k}).encode()),
    ("many parts", ("openai", "anthropic")): lambda k: ("/v1/x", "", {}, json.dumps(
        {"messages": [{"content": [
            {"type": "tool_result", "content": [{"text": "a"}]}] * k}]}).encode()),
    ("many contents", ("gemini",)): lambda k: ("/v1/x", "", {}, json.dumps(
        {"contents": [{"parts": [{"text": "a"}] * 2}] * k}).encode()),
    ("escaped text", ("openai",)): lambda k: ("/v1/x", "", {}, json.dumps(
        {"input": "\u00e9\U0001f600" * k}, ensure_ascii=True).encode()),
    ("many headers, none of them Accept", ("openai",)): lambda k: (
        "/v1/x", "", {f"x-h{i}": "v" * 8 for i in range(k)}, b"{}"),
    ("long path", ("gemini",)): lambda k: (
        "/v1beta/" + "models/" * k + "m:generateContent", "", {}, b"{}"),
    ("percent-encoded path", ("gemini",)): lambda k: (
        "/v1beta/models/" + "%2F%3A" * k, "", {}, b"{}"),
    ("long query", ("gemini",)): lambda k: ("/v1/x", "alt=x&" * k, {}, b"{}"),
    ("deep nesting", DIALECTS): lambda k: (
        "/v1/x", "", {}, b'{"messages":' + b"[" * k + b"]" * k + b"}"),
}
INSPECT_CASES = [(shape, dialect) for (shape, dialects) in INSPECT_SHAPES
                 for dialect in dialects]


@pytest.mark.parametrize(("shape", "dialect"), INSPECT_CASES)
def test_inspect_request_work_is_linear(shape: str, dialect: str) -> None:
    make = next(f for (name, _), f in INSPECT_SHAPES.items() if name == shape)

    def prepare(k: int) -> Callable[[], object]:
        path, query, headers, body = make(k)
        return lambda: inspect_request(dialect, "POST", path, query, headers, body)

    assert_linear(prepare, 128, f"{dialect}: {shape}")


def _openai_stream(k: int) -> bytes:
    delta = b'data: {"id":"c","model":"m","choices":[{"delta":{"content":"tok"}}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    return delta * k + usage + b"data: [DONE]\n\n"


def _anthropic_stream(k: int) -> bytes:
    delta = (b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\","
             b"\"delta\":{\"type\":\"text_delta\",\"text\":\"\\\"usage\\\": 1\"}}\n\n")
    return delta * k + (b"event: message_delta\ndata: {\"type\":\"message_delta\","
                        b"\"usage\":{\"output_tokens\":5}}\n\n")


def _gemini_array(k: int) -> bytes:
    element = {"candidates": [{"content": {"parts": [{"text": "t"}]}}], "modelVersion": "g"}
    return json.dumps([element] * k + [{"usageMetadata": {"promptTokenCount": 1}}]).encode()


# name -> (dialect, path, content type, encoding, body of size k)
PARSER_SHAPES: dict[str, tuple[str, str, str, str | None, Callable[[int], bytes]]] = {
    "openai text deltas": ("openai", "/v1/chat/completions", SSE_CT, None, _openai_stream),
    "openai, every event with usage": ("openai", "/v1/chat/completions", SSE_CT, None,
        lambda k: b'data: {"usage":{"prompt_tokens":1},"model":"m"}\n\n' * k),
    "gzip openai stream": ("openai", "/v1/chat/completions", SSE_CT, "gzip",
                           lambda k: gzip.compress(_openai_stream(k))),
    "anthropic deltas": ("anthropic", "/v1/messages", SSE_CT, None, _anthropic_stream),
    "gemini JSON array": ("gemini", "/v1beta/models/g:streamGenerateContent", JSON_CT, None,
                          _gemini_array),
    "JSON body": ("openai", "/v1/chat/completions", JSON_CT, None, lambda k: json.dumps(
        {"choices": [{"message": {"content": "xy"}}] * k, "usage": {"total_tokens": 1}}
    ).encode()),
    "usage key then a run of spaces": ("openai", "/v1/chat/completions", SSE_CT, None,
        lambda k: b'data: {"usage"' + b" " * (64 * k) + b"}\n\n"),
}


@pytest.mark.parametrize("shape", list(PARSER_SHAPES))
def test_parser_work_is_linear(shape: str) -> None:
    dialect, path, ctype, encoding, make_body = PARSER_SHAPES[shape]

    def prepare(k: int) -> Callable[[], None]:
        chunks = chunked(make_body(k), 61)
        return feed_all(lambda: make_parser(dialect, path, ctype, encoding), chunks, "close")

    assert_linear(prepare, 16, shape)


READERS: dict[str, Callable[[], Any]] = {
    "sse": SSEDecoder,
    "jsonarray": JSONArraySplitter,
    "openai parser": lambda: make_parser("openai", "/v1/chat/completions", SSE_CT, None),
    "anthropic parser": lambda: make_parser("anthropic", "/v1/messages", SSE_CT, None),
    "gemini array parser": lambda: make_parser(
        "gemini", "/v1beta/models/g:streamGenerateContent", JSON_CT, None),
    "JSON body parser": lambda: make_parser("openai", "/v1/embeddings", JSON_CT, None),
}


@fuzz(3)
@given(st.sampled_from(list(READERS)), st.lists(st.sampled_from(TOKENS), min_size=1,
                                                 max_size=8).map(b"".join), st.integers(4, 64))
def test_random_repeated_input_work_is_linear(reader: str, unit: bytes, size: int) -> None:
    """A random unit repeated to about 256 bytes, then 2 KB, fed in chunks of a random size."""
    repeats = max(1, 256 // len(unit))
    make = READERS[reader]
    finish = None if reader == "jsonarray" else "close"
    assert_linear(lambda k: feed_all(make, chunked(unit * k, size), finish), repeats,
                  f"{reader}: {unit!r} in chunks of {size}")


# The meter itself: linear work passes, each kind of quadratic work is caught.
TOY = (__file__,)


def _linear(k: int) -> Callable[[], None]:
    data = b"x" * k

    def job() -> None:
        buf = bytearray()
        for i in range(0, len(data), 4):
            buf += data[i : i + 4]
    return job


def _quadratic_copy(k: int) -> Callable[[], None]:
    data = b"x" * k

    def job() -> None:
        buf = b""
        for i in range(0, len(data), 4):
            buf = buf + data[i : i + 4]
    return job


def _quadratic_partial_line(k: int) -> Callable[[], None]:
    """What a decoder that re-copied its partial line on every chunk would do."""
    chunks = [b"x" * 7] * (k // 7)

    def job() -> None:
        line = b""
        for chunk in chunks:
            line = line + chunk
    return job


def _quadratic_scan(k: int) -> Callable[[], None]:
    data = b"x" * k

    def job() -> None:
        for _ in range(0, len(data), 4):
            data.find(b"y")
    return job


def _quadratic_calls(k: int) -> Callable[[], None]:
    def job() -> None:
        for i in range(k // 64):
            for j in range(k // 64):
                abs(i - j)
    return job


def test_meter_passes_linear_work() -> None:
    assert_linear(_linear, 2048, "linear", watch=TOY)


@pytest.mark.parametrize(("job", "n"), [(_quadratic_copy, 512), (_quadratic_scan, 512),
                                        (_quadratic_calls, 512), (_quadratic_partial_line, 256)])
def test_meter_catches_quadratic_work(job: Callable[[int], Callable[[], None]], n: int) -> None:
    # At the sizes the tests above use, so that the floors do not hide the growth.
    with pytest.raises(AssertionError, match="work grew"):
        assert_linear(job, n, job.__name__, watch=TOY)


def test_meter_counts_are_deterministic() -> None:
    chunks = chunked(_openai_stream(50), 61)
    job = feed_all(lambda: make_parser("openai", "/v1/chat/completions", SSE_CT, None), chunks,
                   "close")
    assert measure(job).calls == measure(job).calls
