"""Scopes, estimation, settings and reconciliation rules, without a server."""

from __future__ import annotations

from typing import Any

import pytest

from llmproxy.config import Limits
from llmproxy.config import parse_ratelimit as parse
from llmproxy.exchange import Exchange, Outcome, RequestInfo, Usage
from llmproxy.identity import fingerprint
from llmproxy.ratelimit import memory_worker_warning
from llmproxy.ratelimit.memory import MemoryStore
from llmproxy.ratelimit.policy import (
    Limiter,
    Reservation,
    actual_tokens,
    estimate,
    safe_id,
    scopes_for,
)

from .conftest import FakeClock


def settings(**rl: Any) -> Any:
    return parse({"features": {"rate_limiting": {"enabled": True, **rl}}}, environ={})


def exchange(provider: str = "openai", dialect: str = "openai", *, text_chars: int | None = 100,
             max_output: int | None = None, request_bytes: int = 300,
             info: bool = True) -> Exchange:
    ex = Exchange("rid", "POST", "/x", provider=provider, dialect=dialect, model="m1",
                  user="alice", key_fingerprint=fingerprint("sk-1"), api_key="sk-1")
    ex.request_bytes = request_bytes
    if info:
        ex.request_info = RequestInfo(model="m1", text_chars=text_chars,
                                      max_output_tokens=max_output)
    return ex


def test_scopes_cover_global_provider_model_key_and_user() -> None:
    names = [s.name for s in scopes_for(exchange())]
    assert names == ["global", "provider:openai", "model:m1", f"key:{fingerprint('sk-1')}",
                     "user:alice"]
    odd = exchange()
    odd.model = "a model with spaces\r\n"
    odd.api_key = odd.key_fingerprint = None
    names = [s.name for s in scopes_for(odd)]
    assert names[2].startswith("model:h_") and not any(n.startswith("key:") for n in names)
    assert safe_id("gpt-4o-mini") == "gpt-4o-mini"


@pytest.mark.parametrize(("provider", "dialect", "chars", "expected"), [
    ("openai", "openai", 100, 20),  # provider_chars_per_token.openai = 5
    ("anthropic", "anthropic", 100, 34),  # 3 chars per token, rounded up
    ("gemini", "gemini", 100, 25),  # default chars_per_token = 4
    ("groq", "openai", 100, 20),  # falls back to the dialect's divisor
])
def test_text_estimate_per_provider(provider: str, dialect: str, chars: int,
                                    expected: int) -> None:
    assert estimate(settings(), exchange(provider, dialect, text_chars=chars)) == (expected, 0)


def test_size_fallback_and_output_cap() -> None:
    s = settings()
    assert estimate(s, exchange(text_chars=None, request_bytes=401)) == (101, 0)  # not JSON
    assert estimate(s, exchange(info=False, request_bytes=4000)) == (1000, 0)  # not inspected
    big = exchange(text_chars=100, request_bytes=20_001)  # above max_sample_bytes
    assert estimate(s, big) == (math_ceil(20_001 / 4), 0)
    assert estimate(s, exchange(max_output=256)) == (20, 256)


def math_ceil(x: float) -> int:
    return -int(-x // 1)


@pytest.mark.parametrize(("mode", "usage", "expected"), [
    ("total", Usage(input_tokens=10, output_tokens=5, total_tokens=15), 15),
    ("input", Usage(input_tokens=10, output_tokens=5, total_tokens=15), 10),
    ("output", Usage(input_tokens=10, output_tokens=5, total_tokens=15), 5),
    # Anthropic: total includes cache reads/writes that input_tokens leaves out
    ("input", Usage(input_tokens=10, output_tokens=5, total_tokens=40, cached_tokens=25), 35),
    ("total", Usage(input_tokens=10), 10),  # an aborted stream: input known, output not
    ("output", Usage(input_tokens=10), 0),
    ("total", Usage(), None),
])
def test_actual_tokens(mode: str, usage: Usage, expected: int | None) -> None:
    assert actual_tokens(mode, usage) == expected


def reserve(limiter: Limiter, ex: Exchange) -> Reservation:
    res = limiter.reserve(ex)
    assert isinstance(res, Reservation)
    return res


# upstream: the status the provider answered with (None: no answer); sent: the request went
# to the provider (ex.forwarded)
@pytest.mark.parametrize(("outcome", "status", "upstream", "sent", "usage", "requests_delta",
                          "tokens_delta"), [
    (Outcome.COMPLETED, 200, 200, True, Usage(input_tokens=50, output_tokens=10,
                                              total_tokens=60), 0, 60 - 20),
    (Outcome.CLIENT_ABORTED, 200, 200, True, Usage(input_tokens=50), 0, 50 - 20),  # consumed
    (Outcome.CLIENT_ABORTED, 200, 200, True, Usage(), 0, 0),  # nothing seen: estimate stands
    (Outcome.SHUTDOWN, 200, 200, True, Usage(input_tokens=50), 0, 50 - 20),  # cut: alike
    (Outcome.SHUTDOWN, 200, 200, True, Usage(), 0, 0),
    (Outcome.SHUTDOWN, None, None, True, Usage(), 0, 0),  # cut before the answer: it may bill
    (Outcome.SHUTDOWN, None, None, False, Usage(), -1, -20),  # cut before sending: refunded
    (Outcome.UPSTREAM_ERROR, 504, None, True, Usage(), 0, 0),  # timed out: it may have run
    (Outcome.CLIENT_ABORTED, 499, None, True, Usage(), 0, 0),  # left while the provider ran
    (Outcome.CLIENT_ABORTED, 499, None, False, Usage(), 0, -20),  # left during the upload
    (Outcome.COMPLETED, 200, 200, True, Usage(), 0, 0),
    (Outcome.UPSTREAM_ERROR, 502, None, False, Usage(), -1, -20),  # unreachable: refunded
    (Outcome.COMPLETED, 503, 503, True, Usage(), -1, -20),
    (Outcome.COMPLETED, 400, 400, True, Usage(), 0, -20),  # answered, consumed no tokens
    (Outcome.UPSTREAM_ERROR, 200, 200, True, Usage(input_tokens=50, output_tokens=3,
                                                   total_tokens=53), 0, 33),
])
def test_reconciliation_rules(outcome: str, status: int | None, upstream: int | None,
                              sent: bool, usage: Usage, requests_delta: int,
                              tokens_delta: int) -> None:
    limiter = Limiter(settings(limits={"requests_per_minute": 10, "tokens_per_day": 1000}),
                      MemoryStore(FakeClock()))
    ex = exchange()
    res = reserve(limiter, ex)
    assert res.tokens == 20
    ex.outcome, ex.status, ex.meta.usage = Outcome(outcome), status, usage
    ex.upstream_status, ex.forwarded = upstream, sent
    adjustments = limiter.adjustments(ex, res)
    for metric, expected in (("requests", requests_delta), ("tokens", tokens_delta)):
        mine = [a for a in adjustments if a.key.split(":")[-2] == metric]
        # every scope (global, provider, model, key, user) is corrected alike, or none is
        assert [a.delta for a in mine] == ([expected] * 5 if expected else [])
        assert all(a.bucket == res.buckets[a.key] for a in mine)


def test_reconcile_runs_once() -> None:
    store = MemoryStore(FakeClock())
    limiter = Limiter(settings(limits={"tokens_per_minute": 100}), store)
    ex = exchange()
    res = reserve(limiter, ex)
    ex.status, ex.meta.usage = 200, Usage(input_tokens=90, output_tokens=0, total_tokens=90)
    limiter.reconcile(ex, res)
    limiter.reconcile(ex, res)  # a second terminal event must not charge again
    after = limiter.reserve(exchange(text_chars=10))
    assert isinstance(after, Reservation) and after.tightest is not None
    assert after.tightest[1] == 100 - 90 - 2


def test_limits_precedence_override_then_scope_kind_then_base() -> None:
    s = settings(limits={"requests_per_minute": 10, "tokens_per_minute": 1000},
                 scope_limits={"key": {"requests_per_minute": 5}},
                 overrides={"per_key": {"sk-raw": {"tokens_per_minute": 7}},
                            "per_model": {"m1": {"requests_per_day": 3}}})
    assert s.limits_for("global", "*") == Limits(10, 1000, 0, 0)
    assert s.limits_for("key", "fp_other") == Limits(5, 1000, 0, 0)
    assert s.limits_for("key", fingerprint("sk-raw")) == Limits(5, 7, 0, 0)
    assert "sk-raw" not in repr(s)  # raw keys are fingerprinted at start-up
    assert s.limits_for("model", "m1") == Limits(10, 1000, 3, 0)


def test_redis_url_from_env_and_from_the_go_shape() -> None:
    env = {"LLMPROXY_REDIS_URL": "redis://10.0.0.5:6380/2"}
    s = parse({"features": {"rate_limiting": {"backend": "redis"}}}, environ=env)
    assert s.redis.url == "redis://10.0.0.5:6380/2"
    legacy = parse({"features": {"rate_limiting": {"redis": {
        "address": "localhost:6379", "password": "p@ss", "db": 3}}}}, environ={})
    assert legacy.redis.url == "redis://:p%40ss@localhost:6379/3"


def test_seed_readme_example_is_accepted() -> None:
    s = settings(backend="memory", estimation={
        "max_sample_bytes": 20000, "bytes_per_token": 4, "chars_per_token": 4,
        "provider_chars_per_token": {"openai": 5, "anthropic": 3}},
        limits={"requests_per_minute": 0, "tokens_per_minute": 0})
    assert s.enabled and s.estimation.provider_chars_per_token == {"openai": 5.0,
                                                                   "anthropic": 3.0}


def test_multi_worker_warning_only_for_memory() -> None:
    assert memory_worker_warning(settings(), {"WEB_CONCURRENCY": "4"}) is not None
    assert memory_worker_warning(settings(), {"WEB_CONCURRENCY": "1"}) is None
    assert memory_worker_warning(settings(backend="redis"), {"WEB_CONCURRENCY": "4"}) is None
