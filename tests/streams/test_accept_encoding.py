"""The Accept-Encoding sent upstream names only codings the usage reader decodes."""

from __future__ import annotations

import gzip
import zlib

import pytest

from llmproxy.exchange import ResponseMeta
from llmproxy.providers import DIALECTS, response_reader
from llmproxy.streams.reader import DECODED_CODINGS, readable_accept_encoding


@pytest.mark.parametrize(("offered", "asked"), [
    ("gzip, deflate, br, zstd", "gzip, deflate"),  # what browsers and SDKs send
    ("br", "identity"),
    ("zstd;q=1, br;q=0.9", "identity"),
    ("br;q=1.0, gzip;q=0.5", "gzip;q=0.5"),
    ("GZip", "GZip"),
    ("x-gzip, compress", "x-gzip"),
    ("*", "gzip, deflate"),
    ("*;q=0.3, br", "gzip;q=0.3, deflate;q=0.3"),
    ("*, gzip;q=0", "deflate"),
    ("*;q=0", "identity"),
    ("gzip;q=0, br", "identity"),  # nothing acceptable left: an uncompressed answer
    ("zstd, identity;q=0", "identity"),
    ("identity", "identity"),
    ("gzip;q=abc, deflate", "deflate"),  # an entry it cannot read is no offer
    ("gzip;q=2", "identity"),
    ("", "identity"),
    (" , ,", "identity"),
])
def test_offers_are_cut_to_what_the_reader_decodes(offered: str, asked: str) -> None:
    assert readable_accept_encoding(offered) == asked


def test_whatever_is_asked_for_is_read() -> None:
    """Every coding the proxy may ask for, the reader inflates (usage comes out)."""
    body = b'{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":4}}'
    coded = {"gzip": gzip.compress(body), "x-gzip": gzip.compress(body),
             "deflate": zlib.compress(body), "identity": body}
    assert set(coded) == DECODED_CODINGS
    for coding, data in coded.items():
        meta = ResponseMeta()
        parser = response_reader(DIALECTS["openai"], "/v1/chat/completions",
                                 "application/json", coding)
        parser.feed(data)
        parser.close()
        assert parser.meta.usage.output_tokens == 4, coding
        assert meta is not parser.meta


def test_a_long_header_costs_linear_time() -> None:
    offered = ", ".join(["br;q=0.5", "gzip;q=0.1"] * 2000)
    assert readable_accept_encoding(offered).count("gzip") == 2000
