"""No API key ever appears in a log line or an error body, whatever happens to the request."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import requests
from conftest import ProxyLauncher, ProxyProcess
from fake_upstream import FakeUpstream, error
from services import closed_port

from e2e.rawhttp import send_raw

pytestmark = pytest.mark.e2e

MODEL = "fake-model-1"
MAX_BODY = 8192


def make_secret(shape: str) -> str:
    """A fresh key; some follow provider prefixes, some have no recognisable shape at all."""
    token = uuid.uuid4().hex
    return {"openai": f"sk-proj-{token}", "anthropic": f"sk-ant-api03-{token}",
            "gemini": f"AIzaSy{token[:33]}", "plain": f"Zq{token}xK"}[shape]


@pytest.fixture(scope="module", params=["json", "text"])
def scan_proxy(request: pytest.FixtureRequest, proxy_launcher: ProxyLauncher
               ) -> Iterator[ProxyProcess]:
    """Debug logging (the most talkative), a small body limit, a short read timeout and one
    unreachable provider per dialect."""
    with closed_port() as port:
        dead = f"http://127.0.0.1:{port}"
        yield proxy_launcher(config={
            "server": {"max_body_bytes": MAX_BODY},
            "upstream": {"read_timeout": 0.5},
            "providers": {"deadoa": {"base_url": dead, "dialect": "openai"},
                          "deadan": {"base_url": dead, "dialect": "anthropic"},
                          "deadge": {"base_url": dead, "dialect": "gemini"}},
        }, env={"LOG_LEVEL": "debug", "LOG_FORMAT": request.param,
                "GUNICORN_LOG_LEVEL": "debug"})




def test_no_secret_in_logs_or_error_bodies(scan_proxy: ProxyProcess,
                                           fake_upstream: FakeUpstream) -> None:
    url = scan_proxy.url
    secrets: list[str] = []
    bodies: list[bytes] = []

    def secret(shape: str) -> str:
        value = make_secret(shape)
        secrets.append(value)
        return value

    def call(method: str, path: str, **kwargs: object) -> requests.Response:
        resp = requests.request(method, url + path, timeout=10, **kwargs)  # type: ignore[arg-type]
        bodies.append(resp.content)
        bodies.append(str(resp.headers).encode())
        return resp

    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    stream_chat = {**chat, "stream": True, "stream_options": {"include_usage": True}}
    msg = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    gem = f"/v1beta/models/{MODEL}:generateContent"

    for shape in ("openai", "plain"):
        # successes, plain and streamed, in every credential position
        assert call("POST", "/openai/v1/chat/completions", json=chat,
                    headers={"Authorization": f"Bearer {secret(shape)}"}).status_code == 200
        assert fake_upstream.last.header("authorization") == f"Bearer {secrets[-1]}"
        assert call("POST", "/groq/v1/chat/completions", json=stream_chat,
                    headers={"Authorization": f"Bearer {secret(shape)}"}).status_code == 200
        assert call("POST", "/anthropic/v1/messages", json={**msg, "stream": True},
                    headers={"x-api-key": secret(shape),
                             "anthropic-version": "2023-06-01"}).status_code == 200
        assert call("POST", "/gemini" + gem, json={},
                    headers={"x-goog-api-key": secret(shape)}).status_code == 200
        assert call("POST", f"/gemini{gem}?key={secret(shape)}", json={}).status_code == 200
        assert call("GET", f"/meta/carol/gemini/v1beta/models?pageSize=5&key={secret(shape)}"
                    ).status_code == 200

        # failures made by the proxy: 502, 404, 413, 504
        assert call("POST", "/deadoa/v1/chat/completions", json=chat,
                    headers={"Authorization": f"Bearer {secret(shape)}"}).status_code == 502
        assert call("POST", "/deadan/v1/messages", json=msg,
                    headers={"x-api-key": secret(shape)}).status_code == 502
        assert call("POST", f"/deadge{gem}?key={secret(shape)}", json={}).status_code == 502
        assert call("GET", f"/nosuch/v1/models?key={secret(shape)}",
                    headers={"Authorization": f"Bearer {secret(shape)}"}).status_code == 404
        assert call("POST", "/openai/v1/chat/completions", data=b"x" * (MAX_BODY + 1),
                    headers={"Authorization": f"Bearer {secret(shape)}",
                             "Content-Type": "application/json"}).status_code == 413
        assert call("POST", f"/gemini{gem}?key={secret(shape)}", data=b"y" * (MAX_BODY + 1)
                    ).status_code == 413

        # failures from the upstream: an error status, a timeout, a stream that dies
        fake_upstream.script(error("openai", 401, "Incorrect API key provided"))
        assert call("POST", "/openai/v1/chat/completions", json=chat,
                    headers={"Authorization": f"Bearer {secret(shape)}"}).status_code == 401
        fake_upstream.script(fake_upstream.scripts.delayed(5))
        assert call("POST", f"/gemini{gem}?key={secret(shape)}", json={}).status_code == 504
        fake_upstream.reset()
        fake_upstream.script(fake_upstream.scripts.dying(after=2))
        assert call("POST", "/anthropic/v1/messages", json={**msg, "stream": True},
                    headers={"x-api-key": secret(shape)}).status_code == 200
        fake_upstream.reset()

        # requests gunicorn itself rejects, with the key in the request line
        key = secret(shape)
        bodies.append(send_raw(scan_proxy.port, f"GET /gemini{gem}?key={key} HTTP/1.1 junk\r\n"
                                           "\r\n".encode()))
        bodies.append(send_raw(scan_proxy.port, (
            f"GET /openai/v1/models?key={secret(shape)} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {secret(shape)}\r\nX-Big: {'a' * 70000}\r\n\r\n").encode()))

    assert scan_proxy.alive()
    requests.get(url + "/health", timeout=5)  # one more request: everything before is flushed
    log = scan_proxy.log_text()
    finished = [line for line in log.splitlines() if "request completed" in line]
    assert len(finished) >= 20, "the proxy wrote too few request records: the scan means little"
    leaks = [s for s in secrets if s in log]
    assert not leaks, f"{len(leaks)} of {len(secrets)} keys appear in the log"
    leaked_bodies = [s for s in secrets for body in bodies if s.encode() in body]
    assert not leaked_bodies, f"keys echoed in responses: {len(leaked_bodies)}"
    # Partial leaks count too (a key cut short by a formatter is still a key).
    assert not [s for s in secrets if s[:20] in log]
