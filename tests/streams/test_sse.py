"""Incremental SSE decoding: line endings split anywhere, fields, comments, bounded memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmproxy.streams.sse import SSEDecoder

STREAMS = Path(__file__).parents[1] / "fixtures" / "streams"
SSE_FIXTURES = sorted(p.name for p in STREAMS.glob("*.sse"))


def decode(*chunks: bytes, **kwargs: int) -> list[tuple[str, bytes]]:
    dec = SSEDecoder(**kwargs)
    events = []
    for chunk in chunks:
        events += dec.feed(chunk)
    return events


def with_line_ending(data: bytes, eol: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", eol)


def test_basic_fields() -> None:
    stream = (
        b": comment\n"
        b"event: message_start\n"
        b'data: {"a":1}\n'
        b"\n"
        b"data:no-space\n"
        b"data:  two spaces\n"
        b"id: 7\n"
        b"retry: 100\n"
        b"\n"
        b"event: only-a-name\n"
        b"\n"
        b"data\n"
        b"\n"
        b"data: tail-without-blank-line\n"
    )
    assert decode(stream) == [
        ("message_start", b'{"a":1}'),
        ("", b"no-space\n two spaces"),  # one leading space is stripped, not two
        ("", b""),  # "data" with no colon is an empty data field: still dispatched
    ]


def test_event_name_resets_after_dispatch() -> None:
    assert decode(b"event: a\ndata: 1\n\ndata: 2\n\n") == [("a", b"1"), ("", b"2")]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol: bytes) -> None:
    stream = eol.join([b"event: e", b"data: x", b"data: y", b"", b"data: z", b"", b""])
    assert decode(stream) == [("e", b"x\ny"), ("", b"z")]


def test_crlf_split_between_chunks_is_one_line_break() -> None:
    # "\r" ends one chunk and "\n" starts the next: one break, not a blank line.
    assert decode(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [("", b"a\nb")]
    # And a lone "\r" chunk followed by "\n" chunk, at each step.
    assert decode(b"data: a", b"\r", b"\n", b"\r", b"\n") == [("", b"a")]


def test_cr_then_cr_is_a_blank_line() -> None:
    assert decode(b"data: a\r", b"\r") == [("", b"a")]


def test_bom_is_stripped_even_when_split() -> None:
    assert decode(b"\xef\xbb", b"\xbfdata: a\n\n") == [("", b"a")]
    # Only at the very start of the stream.
    assert decode(b"data: a\n\n\xef\xbb\xbfdata: b\n\n") == [("", b"a")]


@pytest.mark.parametrize("name", SSE_FIXTURES)
@pytest.mark.parametrize("eol", [None, b"\n", b"\r\n", b"\r"])
def test_fixture_split_at_every_byte(name: str, eol: bytes | None) -> None:
    data = (STREAMS / name).read_bytes()
    if eol is not None:
        data = with_line_ending(data, eol)
    whole = decode(data)
    assert len(whole) >= 3
    for i in range(len(data) + 1):
        assert decode(data[:i], data[i:]) == whole, f"split at {i}"
    assert decode(*(data[i : i + 1] for i in range(len(data)))) == whole


def test_line_endings_do_not_change_events() -> None:
    data = (STREAMS / "anthropic_messages.sse").read_bytes()
    variants = [decode(with_line_ending(data, eol)) for eol in (b"\n", b"\r\n", b"\r")]
    assert variants[0] == variants[1] == variants[2]


@pytest.mark.parametrize(
    ("chunks", "boundary"),
    [
        ([], True),
        ([b"data: a\n\n"], True),
        ([b"data: a\n"], False),  # field seen, event not dispatched
        ([b"data: a"], False),  # partial line
        ([b": ping\n"], True),  # a complete comment leaves nothing pending
        ([b": pi"], False),
        ([b"data: a\r"], False),
        ([b"data: a\r\r"], True),
        ([b"data: a\r\n\r"], True),
        ([b"data: a\r\n\r", b"\n"], True),  # the LF completes the CR: still a boundary
        ([b"event: x\n"], False),
    ],
)
def test_at_boundary_and_terminator(chunks: list[bytes], boundary: bool) -> None:
    dec = SSEDecoder()
    for chunk in chunks:
        dec.feed(chunk)
    assert dec.at_boundary is boundary
    assert (dec.terminator == b"") is boundary
    # Whatever the state, terminator + an injected event yields exactly that event next.
    injected = dec.feed(dec.terminator + b"event: error\ndata: {}\n\n")
    assert injected[-1] == ("error", b"{}")
    assert dec.at_boundary


def test_huge_event_is_dropped_without_being_held() -> None:
    cap = 1024
    dec = SSEDecoder(max_event_bytes=cap)
    assert dec.feed(b"data: small\n\n") == [("", b"small")]
    dec.feed(b"event: big\ndata: ")
    peak = 0
    for _ in range(200):  # 20 KB in one line, far over the cap
        assert dec.feed(b"x" * 100) == []
        peak = max(peak, dec.buffered_bytes)
    dec.feed(b"\ndata: more of the big event\n")
    peak = max(peak, dec.buffered_bytes)
    events = dec.feed(b"\ndata: after\n\n")
    assert events == [("", b"after")]
    assert dec.dropped == 1
    assert peak <= cap


def test_many_lines_over_cap_in_one_chunk_are_dropped() -> None:
    dec = SSEDecoder(max_event_bytes=100)
    big = b"".join(b"data: %d\n" % i for i in range(100)) + b"\n"
    assert dec.feed(big + b"data: ok\n\n") == [("", b"ok")]
    assert dec.dropped == 1


def test_close_returns_a_final_event_without_blank_line() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\n\ndata: b") == [("", b"a")]
    assert dec.close() == [("", b"b")]


def test_garbage_never_raises() -> None:
    import random

    rnd = random.Random(1234)
    dec = SSEDecoder(max_event_bytes=4096)
    for _ in range(2000):
        chunk = bytes(rnd.choice(b"data:event \r\n\x00\xff{}") for _ in range(rnd.randint(0, 40)))
        for name, data in dec.feed(chunk):
            assert isinstance(name, str)
            assert isinstance(data, bytes)
    dec.close()


@pytest.mark.parametrize("name", SSE_FIXTURES)
@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_agrees_with_the_openai_sdk_decoder(name: str, eol: bytes) -> None:
    from openai._streaming import SSEDecoder as SDKDecoder

    data = with_line_ending((STREAMS / name).read_bytes(), eol)
    chunks = [data[i : i + 7] for i in range(0, len(data), 7)]
    sdk = [(e.event or "", e.data.encode()) for e in SDKDecoder().iter_bytes(iter(chunks))]
    assert decode(*chunks) == sdk
