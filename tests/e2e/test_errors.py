"""Errors: upstream ones pass through verbatim; the proxy's own are provider-shaped.

Each must make the official SDK raise its usual typed exception, and none may reveal an
internal address.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest
import requests
from conftest import ProxyLauncher, ProxyProcess, new_request_id
from fake_upstream import FakeUpstream, error, error_body
from google.genai import errors as genai_errors
from services import closed_port

from e2e.sdk import anthropic_client, gemini_client, openai_client

pytestmark = pytest.mark.e2e

MODEL = "fake-model-1"
MAX_BODY = 4096
READ_TIMEOUT = 0.5
RATE_HEADERS = [
    ("retry-after", "7"),
    ("x-ratelimit-limit-requests", "500"),
    ("x-ratelimit-remaining-requests", "0"),
    ("x-ratelimit-reset-requests", "6m0s"),
    ("anthropic-ratelimit-tokens-remaining", "0"),
]


@pytest.fixture(scope="module")
def dead_port() -> Iterator[int]:
    with closed_port() as port:
        yield port


@pytest.fixture(scope="module")
def edge_proxy(proxy_launcher: ProxyLauncher, dead_port: int) -> ProxyProcess:
    """One worker (so /health sees every failure), a short read timeout, a small body limit,
    and one provider per dialect whose upstream port is closed."""
    dead = f"http://127.0.0.1:{dead_port}"
    return proxy_launcher(config={
        "upstream": {"read_timeout": READ_TIMEOUT, "connect_timeout": 2,
                     "health_failure_threshold": 3},
        "server": {"max_body_bytes": MAX_BODY, "inspect_max_bytes": 1024},
        "providers": {"deadoa": {"base_url": dead, "dialect": "openai"},
                      "deadan": {"base_url": dead, "dialect": "anthropic"},
                      "deadge": {"base_url": dead, "dialect": "gemini"}},
    }, workers=1)


@pytest.fixture
def edge(edge_proxy: ProxyProcess, fake_upstream: FakeUpstream) -> Iterator[ProxyProcess]:
    assert edge_proxy.alive()
    yield edge_proxy
    assert edge_proxy.alive(), "the proxy died during the test"


def no_internal_address(text: str | bytes, *ports: int) -> None:
    blob = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    assert "127.0.0.1" not in blob, blob
    for port in ports:
        assert f":{port}" not in blob, blob


# -- upstream errors pass through ---------------------------------------------------------

OPENAI_ERRORS: list[tuple[int, type[Exception]]] = [
    (401, openai.AuthenticationError), (404, openai.NotFoundError),
    (429, openai.RateLimitError), (500, openai.InternalServerError)]
ANTHROPIC_ERRORS: list[tuple[int, type[Exception]]] = [
    (401, anthropic.AuthenticationError), (404, anthropic.NotFoundError),
    (429, anthropic.RateLimitError), (500, anthropic.InternalServerError)]
GEMINI_ERRORS: list[tuple[int, type[Exception]]] = [
    (401, genai_errors.ClientError), (404, genai_errors.ClientError),
    (429, genai_errors.ClientError), (500, genai_errors.ServerError)]


def script_error(fake: FakeUpstream, provider: str, status: int) -> dict[str, Any]:
    headers = [*RATE_HEADERS, ("x-request-id" if provider != "anthropic" else "request-id",
                               "req_upstream_err")]
    fake.script(error(provider, status, f"upstream says {status}", headers))
    return error_body(provider, status, f"upstream says {status}")


@pytest.mark.parametrize("status,exc", OPENAI_ERRORS)
def test_upstream_error_openai_sdk(proxy: ProxyProcess, fake_upstream: FakeUpstream,
                                   status: int, exc: type[Exception]) -> None:
    rid = new_request_id()
    body = script_error(fake_upstream, "openai", status)
    with pytest.raises(exc) as info:
        openai_client(proxy.url, rid).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}])
    err = info.value
    assert isinstance(err, openai.APIStatusError)
    assert err.status_code == status
    assert err.body == body["error"]  # verbatim
    assert err.request_id == "req_upstream_err"
    for name, value in RATE_HEADERS:
        assert err.response.headers.get(name) == value
    assert err.response.headers["x-proxy-request-id"] == rid
    assert len(fake_upstream.requests) == 1  # max_retries=0 and the proxy does not retry
    record = proxy.wait_record(rid)
    assert record["status"] == status


@pytest.mark.parametrize("status,exc", ANTHROPIC_ERRORS)
def test_upstream_error_anthropic_sdk(proxy: ProxyProcess, fake_upstream: FakeUpstream,
                                      status: int, exc: type[Exception]) -> None:
    rid = new_request_id()
    body = script_error(fake_upstream, "anthropic", status)
    with pytest.raises(exc) as info:
        anthropic_client(proxy.url, rid).messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    err = info.value
    assert isinstance(err, anthropic.APIStatusError)
    assert err.status_code == status
    assert err.body == body
    assert err.request_id == "req_upstream_err"
    assert err.response.headers["retry-after"] == "7"
    assert err.response.headers["anthropic-ratelimit-tokens-remaining"] == "0"


@pytest.mark.parametrize("status,exc", GEMINI_ERRORS)
def test_upstream_error_gemini_sdk(proxy: ProxyProcess, fake_upstream: FakeUpstream,
                                   status: int, exc: type[Exception]) -> None:
    rid = new_request_id()
    body = script_error(fake_upstream, "gemini", status)
    client = gemini_client(proxy.url, rid)
    with pytest.raises(exc) as info:
        client.models.generate_content(model=MODEL, contents="hi")
    err = info.value
    assert isinstance(err, genai_errors.APIError)
    assert err.code == status
    assert err.message == body["error"]["message"]
    assert err.status == body["error"]["status"]


def test_upstream_error_body_is_verbatim_bytes(proxy: ProxyProcess,
                                               fake_upstream: FakeUpstream) -> None:
    raw = b'{"error": {"message": "odd \\u00e9 spacing",   "type": "x"}}\n'
    fake_upstream.script(lambda rec, reply: reply.send(
        418, raw, [("retry-after", "3"), ("x-custom-upstream", "yes")]))
    resp = requests.post(f"{proxy.url}/openai/v1/chat/completions", json={"model": MODEL},
                         timeout=10)
    assert resp.status_code == 418
    assert resp.content == raw
    assert resp.headers["retry-after"] == "3"
    assert resp.headers["x-custom-upstream"] == "yes"


# -- errors made by the proxy -------------------------------------------------------------

def test_unreachable_upstream_is_502_openai(edge: ProxyProcess, dead_port: int) -> None:
    rid = new_request_id()
    with pytest.raises(openai.InternalServerError) as info:
        openai_client(edge.url, rid, prefix="deadoa").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}])
    err = info.value
    assert err.status_code == 502
    assert isinstance(err.body, dict) and err.body.get("message")
    assert err.response.headers["x-proxy-request-id"] == rid
    no_internal_address(err.response.content, dead_port)
    record = edge.wait_record(rid)
    assert (record["status"], record["outcome"]) == (502, "upstream_error")


def test_unreachable_upstream_is_502_anthropic(edge: ProxyProcess, dead_port: int) -> None:
    with pytest.raises(anthropic.InternalServerError) as info:
        anthropic_client(edge.url, new_request_id(), prefix="deadan").messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    err = info.value
    assert err.status_code == 502
    assert isinstance(err.body, dict) and err.body["type"] == "error"
    no_internal_address(err.response.content, dead_port)


def test_unreachable_upstream_is_502_gemini(edge: ProxyProcess, dead_port: int) -> None:
    client = gemini_client(edge.url, new_request_id(), prefix="deadge")
    with pytest.raises(genai_errors.ServerError) as info:
        client.models.generate_content(model=MODEL, contents="hi")
    assert info.value.code == 502
    no_internal_address(str(info.value.message), dead_port)
    no_internal_address(json.dumps(info.value.details), dead_port)


def test_health_reports_failing_provider_degraded(edge: ProxyProcess, dead_port: int) -> None:
    for _ in range(3):
        resp = requests.get(f"{edge.url}/deadoa/v1/models", timeout=10)
        assert resp.status_code == 502
    health = requests.get(f"{edge.url}/health", timeout=5).json()
    assert health["providers"]["deadoa"]["status"] == "degraded"
    assert health["providers"]["openai"]["status"] != "degraded"


SlowCall = Callable[[ProxyProcess, str], Any]


def _slow_openai(proxy: ProxyProcess, rid: str) -> Any:
    return openai_client(proxy.url, rid).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}])


def _slow_anthropic(proxy: ProxyProcess, rid: str) -> Any:
    return anthropic_client(proxy.url, rid).messages.create(
        model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}])


def _slow_gemini(proxy: ProxyProcess, rid: str) -> Any:
    client = gemini_client(proxy.url, rid)
    return client.models.generate_content(model=MODEL, contents="hi")


@pytest.mark.parametrize("call,exc", [
    (_slow_openai, openai.InternalServerError),
    (_slow_anthropic, anthropic.InternalServerError),
    (_slow_gemini, genai_errors.ServerError),
])
def test_upstream_timeout_is_504(edge: ProxyProcess, fake_upstream: FakeUpstream,
                                 call: SlowCall, exc: type[Exception]) -> None:
    rid = new_request_id()
    fake_upstream.script(fake_upstream.scripts.delayed(10))
    with pytest.raises(exc) as info:
        call(edge, rid)
    err: Any = info.value
    assert getattr(err, "status_code", getattr(err, "code", None)) == 504
    body = err.response.content if hasattr(err, "response") and hasattr(
        err.response, "content") else str(err)
    no_internal_address(body, fake_upstream.port)
    record = edge.wait_record(rid)
    assert (record["status"], record["outcome"]) == (504, "upstream_error")
    assert record["duration_ms"] < (READ_TIMEOUT + 2) * 1000


def test_body_over_limit_is_413(edge: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    with pytest.raises(openai.APIStatusError) as info:
        openai_client(edge.url, rid).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x" * (2 * MAX_BODY)}])
    assert info.value.status_code == 413
    assert isinstance(info.value.body, dict) and info.value.body.get("message")
    assert fake_upstream.requests == []

    with pytest.raises(anthropic.APIStatusError) as ainfo:
        anthropic_client(edge.url, new_request_id()).messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x" * 9000}])
    assert ainfo.value.status_code == 413
    assert fake_upstream.requests == []
    assert edge.wait_record(rid)["status"] == 413


def test_chunked_body_over_limit_never_reaches_upstream_whole(
        edge: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    """Without Content-Length the proxy may have started forwarding when the limit is hit;
    it must then abort the upstream request, never end it as if the (cut) body were whole:
    the provider would act on a truncated upload."""
    def body() -> Iterator[bytes]:
        for _ in range(16):
            yield b"x" * 1024

    resp = requests.post(f"{edge.url}/openai/v1/files", data=body(), timeout=10)
    assert resp.status_code == 413
    assert resp.json()["error"]["message"]
    whole = [(r.target, r.body_size) for r in fake_upstream.complete_requests()]
    assert whole == [], "the upstream received a complete (truncated) request body"


@pytest.mark.parametrize("path", ["/nothing/here", "/meta/alice/nosuch/v1/models",
                                  "/openaiX/v1/models", "/"])
def test_unknown_route_is_404(proxy: ProxyProcess, fake_upstream: FakeUpstream,
                              path: str) -> None:
    resp = requests.post(proxy.url + path, json={}, headers={"Origin": "http://app.example"},
                         timeout=5)
    assert resp.status_code == 404
    assert resp.headers["x-proxy-request-id"]
    assert resp.headers.get("access-control-allow-origin") in ("*", "http://app.example")
    assert resp.json()["error"]["message"]
    assert fake_upstream.requests == []


def test_unknown_route_typed_openai_error(proxy: ProxyProcess) -> None:
    client = openai.OpenAI(api_key="sk-x", base_url=f"{proxy.url}/nosuchprovider/v1",
                           max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.models.list()


def test_error_responses_carry_cors(edge: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    origin = {"Origin": "http://app.example"}
    responses = [
        requests.get(f"{edge.url}/deadoa/v1/models", headers=origin, timeout=10),  # 502
        requests.post(f"{edge.url}/openai/v1/chat/completions", data=b"x" * (MAX_BODY + 1),
                      headers=origin, timeout=10),  # 413
        requests.get(f"{edge.url}/nope", headers=origin, timeout=10),  # 404
    ]
    fake_upstream.script(error("openai", 429, "slow", RATE_HEADERS))
    responses.append(requests.get(f"{edge.url}/openai/v1/models", headers=origin, timeout=10))
    fake_upstream.reset()
    fake_upstream.script(fake_upstream.scripts.delayed(10))
    responses.append(requests.get(f"{edge.url}/openai/v1/models", headers=origin, timeout=10))
    assert [r.status_code for r in responses] == [502, 413, 404, 429, 504]
    for resp in responses:
        assert resp.headers.get("access-control-allow-origin") in ("*", "http://app.example"), \
            resp.status_code
        exposed = resp.headers.get("access-control-expose-headers", "").lower()
        assert "x-proxy-request-id" in exposed and "retry-after" in exposed, resp.status_code
