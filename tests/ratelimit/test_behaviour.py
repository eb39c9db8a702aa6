"""The limiter inside the real app (in-process Flask client, fake upstream), on both backends."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from services import RedisServer, closed_port

from llmproxy.config import ConfigError
from llmproxy.identity import fingerprint
from llmproxy.observe import metrics
from llmproxy.ratelimit import get_ratelimit
from llmproxy.ratelimit.redis import RedisStore

from .conftest import FakeClock

KEY = "sk-test-key-0001"
OTHER_KEY = "sk-test-key-0002"
AppFactory = Callable[..., Flask]


@pytest.fixture
def limited_app(make_app: Callable[..., Flask], backend: str, clock: FakeClock,
                request: pytest.FixtureRequest) -> Iterator[AppFactory]:
    """limited_app(**rate_limiting) -> app with the limiter on the parametrized backend."""
    made: list[Flask] = []

    def factory(**settings: Any) -> Flask:
        cfg: dict[str, Any] = {"enabled": True, **settings,
                               **backend_config(backend, request, settings.get("redis", {}))}
        app = make_app({"features": {"rate_limiting": cfg}})
        limiter = get_ratelimit(app)
        assert limiter is not None
        limiter.store.clock = clock  # type: ignore[attr-defined]
        made.append(app)
        return app

    yield factory
    for app in made:
        limiter = get_ratelimit(app)
        if limiter is not None:
            limiter.store.close()


def backend_config(backend: str, request: pytest.FixtureRequest,
                   redis: dict[str, Any] | None = None) -> dict[str, Any]:
    """The rate_limiting keys that select ``backend`` (redis_deferred: redis whose corrections
    wait for the next reservation; the timer is set far beyond any test)."""
    if backend == "memory":
        return {"backend": "memory"}
    server: RedisServer = request.getfixturevalue("redis_server")
    delay = 10_000 if backend == "redis_deferred" else 0
    return {"backend": "redis", "redis": {"url": server.url, "timeout_ms": 1000,
                                          "reconcile_delay_ms": delay, **(redis or {})}}


ROUTES = {
    "openai": ("/openai/v1/chat/completions", "Authorization", f"Bearer {KEY}"),
    "anthropic": ("/anthropic/v1/messages", "x-api-key", KEY),
    "gemini": ("/gemini/v1beta/models/gemini-pro:generateContent", "x-goog-api-key", KEY),
}


def call(client: FlaskClient, dialect: str = "openai", *, key: str = KEY, text: str = "hello",
         max_tokens: int | None = None, stream: bool = False,
         headers: dict[str, str] | None = None) -> Any:
    """One provider call; the response body is read and closed (terminal event fired)."""
    path, header, _ = ROUTES[dialect]
    value = f"Bearer {key}" if header == "Authorization" else key
    body: dict[str, Any]
    if dialect == "gemini":
        body = {"contents": [{"parts": [{"text": text}]}]}
        if max_tokens:
            body["generationConfig"] = {"maxOutputTokens": max_tokens}
    else:
        body = {"model": "fake-model-1", "messages": [{"role": "user", "content": text}]}
        if max_tokens:
            body["max_tokens"] = max_tokens
        if stream:
            body["stream"] = True
            if dialect == "openai":
                body["stream_options"] = {"include_usage": True}
    resp = client.post(path, json=body, headers={header: value, **(headers or {})})
    resp.get_data()
    resp.close()
    return resp


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "gemini"])
def test_denial_is_provider_shaped_with_exact_retry_after(
        limited_app: AppFactory, fake_upstream: Any, clock: FakeClock, dialect: str) -> None:
    app = limited_app(limits={"requests_per_minute": 100},
                      overrides={"per_key": {KEY: {"requests_per_minute": 2}}})
    client = app.test_client()
    first_bucket = math.floor(clock.now)
    assert call(client, dialect).status_code == 200
    clock.advance(7.1)
    assert call(client, dialect).status_code == 200
    clock.advance(3.2)
    resp = call(client, dialect, headers={"Origin": "https://app.example"})
    assert resp.status_code == 429
    assert len(fake_upstream.requests) == 2  # refused before any upstream call
    wait = first_bucket + 61 - clock.now
    assert resp.headers["Retry-After"] == str(math.ceil(wait))
    assert abs(int(resp.headers["Retry-After-Ms"]) - wait * 1000) <= 2
    assert resp.headers["X-RateLimit-Scope"] == f"key:{fingerprint(KEY)}"
    assert resp.headers["X-RateLimit-Metric"] == "requests"
    assert resp.headers["X-RateLimit-Window"] == "minute"
    assert resp.headers["X-RateLimit-Limit"] == "2"
    assert resp.headers["X-RateLimit-Remaining"] == "0"
    assert "requests_per_minute" in resp.headers["X-RateLimit-Reason"]
    assert resp.headers["Access-Control-Allow-Origin"] in ("*", "https://app.example")
    body = resp.get_json()
    if dialect == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    elif dialect == "gemini":
        assert body["error"]["code"] == 429 and body["error"]["status"] == "RESOURCE_EXHAUSTED"
    else:
        assert body["error"]["type"] == "rate_limit_error"
    assert KEY not in resp.get_data(as_text=True) and KEY not in str(resp.headers)
    # another key is not affected, and the key passes again once its window moved on
    assert call(client, dialect, key=OTHER_KEY).status_code == 200
    clock.advance(wait - 0.05)
    assert call(client, dialect).status_code == 429
    clock.advance(0.05)
    assert call(client, dialect).status_code == 200


def test_health_preflights_and_unknown_routes_are_never_limited(limited_app: AppFactory) -> None:
    app = limited_app(limits={"requests_per_minute": 1})
    client = app.test_client()
    for _ in range(3):
        assert client.get("/health").status_code == 200
        preflight = client.options("/openai/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200
        assert client.get("/nowhere").status_code == 404
    assert call(client).status_code == 200
    assert call(client).status_code == 429


def test_allowed_responses_name_the_tightest_policy(limited_app: AppFactory, fake_upstream: Any,
                                                    clock: FakeClock) -> None:
    from fake_upstream import respond

    app = limited_app(limits={"requests_per_minute": 100, "tokens_per_day": 1_000_000},
                      overrides={"per_key": {fingerprint(KEY): {"requests_per_minute": 3}}})
    client = app.test_client()
    resp = call(client, stream=True)
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    assert resp.headers["RateLimit-Policy"] == '"key-requests-per-minute";q=3;w=60'
    reset = math.ceil(math.floor(clock.now) + 61 - clock.now)
    assert resp.headers["RateLimit"] == f'"key-requests-per-minute";r=2;t={reset}'
    provider_headers = [("x-ratelimit-remaining-requests", "4999"),
                        ("anthropic-ratelimit-tokens-remaining", "123")]
    fake_upstream.script(respond(200, {"ok": True}, provider_headers))
    resp = call(client)
    assert resp.headers["RateLimit"].startswith('"key-requests-per-minute";r=1;')
    assert resp.headers["x-ratelimit-remaining-requests"] == "4999"
    assert resp.headers["anthropic-ratelimit-tokens-remaining"] == "123"


@pytest.mark.parametrize("stream", [True, False])
def test_real_usage_replaces_the_estimate(limited_app: AppFactory, fake_upstream: Any,
                                          stream: bool) -> None:
    app = limited_app(count_tokens="total", limits={"tokens_per_minute": 10_000})
    fake_upstream.scenario.input_tokens = 400
    fake_upstream.scenario.output_tokens = 100
    client = app.test_client()

    def remaining(resp: Any) -> int:
        return int(resp.headers["RateLimit"].split(";r=")[1].split(";")[0])

    first = call(client, text="x" * 50, max_tokens=20, stream=stream)
    assert first.status_code == 200
    estimate = 10_000 - remaining(first)
    assert estimate >= 20 + 10  # the output cap plus about 50 chars / 5 chars per token
    assert estimate != 500
    second = call(client, text="x" * 50, max_tokens=20, stream=stream)
    assert remaining(second) == 10_000 - 500 - estimate  # the first now counts its real 500
    third = call(client, text="x" * 50, max_tokens=20, stream=stream)
    assert remaining(third) == 10_000 - 1000 - estimate


def test_failed_upstream_calls_are_refunded(limited_app: AppFactory, fake_upstream: Any) -> None:
    from fake_upstream import error

    app = limited_app(overrides={"per_key": {KEY: {"requests_per_minute": 1,
                                                   "tokens_per_minute": 1000}}})
    client = app.test_client()
    fake_upstream.script(error("openai", 500))
    for _ in range(3):  # the provider failed: nothing consumed, nothing counted
        assert call(client, text="y" * 2000).status_code == 500
    fake_upstream.script(error("openai", 400))
    assert call(client).status_code == 400  # an answered request counts (its tokens do not)
    assert call(client).status_code == 429


def test_unreachable_upstream_is_refunded(backend: str, request: pytest.FixtureRequest,
                                          make_app: Callable[..., Flask]) -> None:
    with closed_port() as port:
        dead = f"http://127.0.0.1:{port}"
        cfg: dict[str, Any] = {"enabled": True, "limits": {"requests_per_minute": 1},
                               **backend_config(backend, request)}
        app = make_app({"providers": {"openai": {"base_url": dead}},
                        "features": {"rate_limiting": cfg}})
        client = app.test_client()
        for _ in range(3):
            assert call(client).status_code == 502
    limiter = get_ratelimit(app)
    assert limiter is not None
    limiter.store.close()


def test_optimistic_first_request(limited_app: AppFactory) -> None:
    app = limited_app(count_tokens="input", limits={"tokens_per_minute": 10})
    client = app.test_client()
    assert call(client, text="z" * 4000).status_code == 200  # far above 10, window empty
    resp = call(client, text="z")
    assert resp.status_code == 429
    assert resp.headers["X-RateLimit-Metric"] == "tokens"


def test_denials_reach_the_metrics_hooks(limited_app: AppFactory,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, ...]] = []
    monkeypatch.setattr(metrics, "record_ratelimit_denial", lambda *args: seen.append(args))
    app = limited_app(scope_limits={"user": {"requests_per_day": 1}})
    client = app.test_client()
    assert call(client).status_code == 200
    assert call(client).status_code == 429
    assert seen == [("user", "requests", "day")]


# -- Redis only -----------------------------------------------------------------------------

def redis_app(make_app: Callable[..., Flask], server: RedisServer, **settings: Any) -> Flask:
    redis_cfg = {"url": server.url, "timeout_ms": 200, **settings.pop("redis", {})}
    return make_app({"features": {"rate_limiting": {
        "enabled": True, "backend": "redis", "redis": redis_cfg, **settings}}})


def test_redis_holds_fingerprints_never_keys(make_app: Callable[..., Flask],
                                             redis_server: RedisServer) -> None:
    app = redis_app(make_app, redis_server, limits={"requests_per_minute": 5})
    call(app.test_client())
    client = redis_server.client()
    keys = [k.decode() for k in client.keys("*")]
    dump = json.dumps([keys] + [[k.decode() for k in client.hkeys(key)] for key in keys])
    client.close()
    assert f"key:{fingerprint(KEY)}:requests:minute" in dump
    assert KEY not in dump


@pytest.mark.redis
def test_redis_down_open_lets_through_then_enforces_again(
        make_app: Callable[..., Flask], redis_server: RedisServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    failures: list[tuple[str, ...]] = []
    monkeypatch.setattr(metrics, "record_ratelimit_backend_error",
                        lambda *args: failures.append(args))
    app = redis_app(make_app, redis_server, limits={"requests_per_minute": 1},
                    redis={"on_error": "open"})
    client = app.test_client()
    assert call(client).status_code == 200
    assert call(client).status_code == 429
    redis_server.kill()
    for _ in range(3):
        resp = call(client)
        assert resp.status_code == 200
        assert "RateLimit" not in resp.headers  # nothing was reserved
    assert failures == [("reserve", "open")] * 3
    redis_server.start()  # empty: the old counts are gone with the crashed server
    assert call(client).status_code == 200
    assert call(client).status_code == 429


@pytest.mark.redis
def test_redis_down_closed_answers_503(make_app: Callable[..., Flask],
                                       redis_server: RedisServer) -> None:
    app = redis_app(make_app, redis_server, limits={"requests_per_minute": 5},
                    redis={"on_error": "closed"})
    client = app.test_client()
    redis_server.kill()
    resp = call(client, "anthropic")
    assert resp.status_code == 503
    assert resp.get_json()["type"] == "error"
    assert resp.headers["Retry-After"] == "1"
    redis_server.start()
    assert call(client, "anthropic").status_code == 200


def test_store_is_redis_when_configured(make_app: Callable[..., Flask],
                                        redis_server: RedisServer) -> None:
    app = redis_app(make_app, redis_server, limits={"requests_per_minute": 5})
    limiter = get_ratelimit(app)
    assert limiter is not None and isinstance(limiter.store, RedisStore)
    limiter.store.close()


# -- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "key"), [
    ({"backend": "mongo"}, "features.rate_limiting.backend"),
    ({"limits": {"requests_per_minute": -1}}, "features.rate_limiting.limits.requests_per_minute"),
    ({"limits": {"requests_per_hour": 5}}, "features.rate_limiting.limits.requests_per_hour"),
    ({"count_tokens": "both"}, "features.rate_limiting.count_tokens"),
    ({"redis": {"on_error": "maybe"}}, "features.rate_limiting.redis.on_error"),
    ({"redis": {"reconcile_delay_ms": 10_001}}, "features.rate_limiting.redis.reconcile_delay_ms"),
    ({"redis": {"reconcile_delay_ms": -1}}, "features.rate_limiting.redis.reconcile_delay_ms"),
    ({"estimation": {"chars_per_token": 0}}, "features.rate_limiting.estimation.chars_per_token"),
    ({"overrides": {"per_key": {KEY: {"rpm": 1}}}},
     "features.rate_limiting.overrides.per_key[0].rpm"),
])
def test_invalid_settings_fail_at_start_up(make_app: Callable[..., Flask],
                                           settings: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_app({"features": {"rate_limiting": {"enabled": True, **settings}}})
    assert info.value.key == key
    assert KEY not in str(info.value)


def test_disabled_installs_nothing(make_app: Callable[..., Flask]) -> None:
    app = make_app({"features": {"rate_limiting": {"enabled": False,
                                                   "limits": {"requests_per_minute": 1}}}})
    assert get_ratelimit(app) is None
    client = app.test_client()
    assert call(client).status_code == 200 and call(client).status_code == 200
