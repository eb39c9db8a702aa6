"""The proxy-key hook on the request path, in-process over a fake key store."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from fake_upstream import FakeUpstream

from llmproxy.exchange import Exchange
from llmproxy.keys.cache import KeyCache
from llmproxy.keys.guard import KeyGuard
from llmproxy.keys.model import generate_secret
from llmproxy.state import get_state

from .test_cache import Down, FakeStore

SERVER = {"openai": ("Authorization", "Bearer sk-server-openai"),
          "anthropic": ("x-api-key", "sk-ant-server"),
          "gemini": ("x-goog-api-key", "AIza-server")}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


class Harness:
    def __init__(self, app: Any, store: FakeStore) -> None:
        self.app = app
        self.client = app.test_client()
        self.store = store
        self.finished: list[Exchange] = []
        self.refusals: list[str] = []
        get_state(app).on_finish(self.finished.append)

    def post(self, path: str, **kwargs: Any) -> Any:
        """The whole response, closed: the exchange's terminal event has fired."""
        resp = self.client.post(path, **kwargs)
        resp.get_data()
        resp.close()
        return resp


@pytest.fixture
def harness(make_app: Callable[..., Any]) -> Callable[..., Harness]:
    def build(required: bool = False, limits_enforced: bool = True) -> Harness:
        app = make_app()
        store = FakeStore()
        h = Harness(app, store)
        state = get_state(app)
        state.keys = KeyGuard(KeyCache(store, 5.0, store_errors=(Down,)), required=required,
                              limits_enforced=limits_enforced, on_refused=h.refusals.append)
        for name, credential in SERVER.items():
            state.providers[name].credential = credential
        return h

    return build


def test_a_proxy_key_is_swapped_for_the_providers_key(harness: Callable[..., Harness],
                                                      fake_upstream: FakeUpstream) -> None:
    h = harness()
    secret, key = h.store.add(user="alice", team="ml", limits={"requests_per_minute": 7})
    resp = h.post("/openai/v1/chat/completions?x=1", json=CHAT,
                         headers={"Authorization": f"Bearer {secret}", "X-User-ID": "mallory",
                                  "x-api-key": "sk-stray", "X-Note": secret})
    assert resp.status_code == 200
    rec = fake_upstream.last
    assert rec.header("authorization") == "Bearer sk-server-openai"
    assert rec.header("x-api-key") is None and rec.header("x-note") is None
    assert rec.target == "/v1/chat/completions?x=1"
    (ex,) = h.finished
    assert (ex.key_id, ex.team, ex.user, ex.user_source) == (key.id, "ml", "alice", "key")
    assert ex.api_key is None and ex.key_fingerprint is None
    assert ex.key_limits == (("requests_per_minute", 7),)


def test_gemini_query_key_is_removed_from_the_forwarded_target(
        harness: Callable[..., Harness], fake_upstream: FakeUpstream) -> None:
    h = harness()
    secret, _ = h.store.add()
    resp = h.post(f"/gemini/v1beta/models/gemini-2.5-flash:generateContent?key={secret}"
                         "&alt=sse", json={"contents": []})
    assert resp.status_code == 200
    assert fake_upstream.last.target == "/v1beta/models/gemini-2.5-flash:generateContent?alt=sse"
    assert fake_upstream.last.header("x-goog-api-key") == "AIza-server"
    assert "REDACTED" in h.finished[0].path and secret not in h.finished[0].path


@pytest.mark.parametrize(("provider", "path", "headers", "shape"), [
    ("openai", "/openai/v1/chat/completions", {}, ("error", "type", "authentication_error")),
    ("anthropic", "/anthropic/v1/messages", {"anthropic-version": "2023-06-01"},
     ("error", "type", "authentication_error")),
    ("gemini", "/gemini/v1beta/models/m:generateContent", {},
     ("error", "status", "UNAUTHENTICATED")),
])
def test_refusals_are_in_the_providers_shape(harness: Callable[..., Harness],
                                             fake_upstream: FakeUpstream, provider: str,
                                             path: str, headers: dict[str, str],
                                             shape: tuple[str, str, str]) -> None:
    h = harness()
    secret = generate_secret()
    slot = {"openai": ("Authorization", f"Bearer {secret}"), "anthropic": ("x-api-key", secret),
            "gemini": ("x-goog-api-key", secret)}[provider]
    resp = h.post(path, json=CHAT, headers={**headers, slot[0]: slot[1]})
    assert resp.status_code == 401
    body = resp.get_json()
    assert body[shape[0]][shape[1]] == shape[2]
    assert secret not in resp.get_data(as_text=True)
    assert h.refusals == ["unknown"]
    assert fake_upstream.complete_requests() == []


def test_revoked_expired_malformed_and_missing(harness: Callable[..., Harness]) -> None:
    h = harness(required=True)
    revoked, _ = h.store.add(key_id="key_00000000000000a1", revoked=True)
    expired, _ = h.store.add(key_id="key_00000000000000a2",
                             expires_at=datetime.now(timezone.utc) - timedelta(seconds=1))
    cases = [(revoked, "revoked"), (expired, "expired"), ("llmp-x", "unknown"),
             ("sk-not-a-proxy-key", "missing")]
    for secret, reason in cases:
        resp = h.post("/openai/v1/chat/completions", json=CHAT,
                             headers={"Authorization": f"Bearer {secret}"})
        assert resp.status_code == 401, reason
        assert h.refusals[-1] == reason
    assert [ex.error_kind for ex in h.finished] == ["unauthenticated"] * 4
    assert [ex.key_id for ex in h.finished[:2]] == ["key_00000000000000a1",
                                                   "key_00000000000000a2"]
    assert len(h.store.lookups) == 2  # the malformed key was never looked up


def test_a_provider_or_model_not_allowed_is_403(harness: Callable[..., Harness],
                                               fake_upstream: FakeUpstream) -> None:
    h = harness()
    secret, _ = h.store.add(providers=("openai",), models=("gpt-4o*",))
    ok = h.post("/openai/v1/chat/completions", json=CHAT,
                       headers={"Authorization": f"Bearer {secret}"})
    assert ok.status_code == 200
    for path, body in (("/openai/v1/chat/completions", {**CHAT, "model": "o3"}),
                       ("/anthropic/v1/messages", CHAT)):
        resp = h.post(path, json=body, headers={"x-api-key": secret,
                                                       "Authorization": f"Bearer {secret}"})
        assert resp.status_code == 403
        assert resp.get_json()["error"]["type"] == "permission_error"
    assert h.refusals == ["forbidden", "forbidden"]
    assert len(fake_upstream.complete_requests()) == 1


def test_an_unreachable_store_is_503_for_unknown_keys_only(harness: Callable[..., Harness],
                                                           fake_upstream: FakeUpstream) -> None:
    h = harness()
    secret, _ = h.store.add()
    headers = {"Authorization": f"Bearer {secret}"}
    assert h.post("/openai/v1/chat/completions", json=CHAT,
                         headers=headers).status_code == 200
    h.store.down = True
    assert h.post("/openai/v1/chat/completions", json=CHAT,
                         headers=headers).status_code == 200
    resp = h.post("/openai/v1/chat/completions", json=CHAT,
                         headers={"Authorization": f"Bearer {generate_secret()}"})
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    assert h.refusals == ["unavailable"]
    assert h.finished[-1].error_kind == "key_store_unavailable"


def test_mixed_mode_passes_other_credentials_through(harness: Callable[..., Harness],
                                                     fake_upstream: FakeUpstream) -> None:
    h = harness()
    resp = h.post("/anthropic/v1/messages", json=CHAT,
                         headers={"x-api-key": "sk-ant-client", "anthropic-version": "x"})
    assert resp.status_code == 200
    assert fake_upstream.last.header("x-api-key") == "sk-ant-client"
    assert h.finished[0].key_id is None and h.finished[0].key_fingerprint
    assert h.store.lookups == [] and h.refusals == []
