"""A proxy key's own limits reach the rate limiter like a ``per_key`` override."""

from __future__ import annotations

from typing import Any

from llmproxy.config import parse_ratelimit
from llmproxy.exchange import Exchange, RequestInfo
from llmproxy.ratelimit.memory import MemoryStore
from llmproxy.ratelimit.policy import Denial, Limiter, Reservation, scopes_for

KEY_ID = "key_00000000000000ab"


def limiter(**rl: Any) -> Limiter:
    settings = parse_ratelimit({"features": {"rate_limiting": {"enabled": True, **rl}}}, {})
    return Limiter(settings, MemoryStore())


def call(limits: tuple[tuple[str, int], ...] = (), key_id: str | None = KEY_ID) -> Exchange:
    ex = Exchange("rid", "POST", "/x", provider="openai", dialect="openai", model="m",
                  user="alice", key_id=key_id, key_limits=limits)
    ex.request_info = RequestInfo(model="m", text_chars=10)
    return ex


def test_the_key_scope_is_the_key_id_never_a_fingerprint() -> None:
    ex = call()
    ex.key_fingerprint = "fp_0000000000000000"
    assert [s.name for s in scopes_for(ex) if s.kind == "key"] == [f"key:{KEY_ID}"]


def test_own_limits_apply_over_the_configured_ones() -> None:
    lim = limiter(scope_limits={"key": {"requests_per_minute": 100, "tokens_per_minute": 10**6}})
    own = (("requests_per_minute", 2),)
    assert isinstance(lim.reserve(call(own)), Reservation)
    assert isinstance(lim.reserve(call(own)), Reservation)
    denied = lim.reserve(call(own))
    assert isinstance(denied, Denial)
    assert (denied.check.scope.name, denied.check.spec.limit) == (f"key:{KEY_ID}", 2)
    # Limits the key does not set keep the configured value.
    checks = lim.checks_for(call(own), 10)
    key_limits = {(c.metric, c.window): c.spec.limit for c in checks if c.scope.kind == "key"}
    assert key_limits == {("requests", "minute"): 2, ("tokens", "minute"): 10**6}


def test_own_limits_take_effect_when_they_change() -> None:
    lim = limiter()
    assert lim.reserve(call()) is None  # nothing limited
    tight = (("requests_per_minute", 1),)
    assert isinstance(lim.reserve(call(tight)), Reservation)
    assert isinstance(lim.reserve(call(tight)), Denial)
    looser = (("requests_per_minute", 5),)
    assert isinstance(lim.reserve(call(looser)), Reservation)  # same counter, a new limit


def test_configured_limits_stay_where_the_key_sets_none() -> None:
    lim = limiter(overrides={"per_key": {"fp_aaaaaaaaaaaaaaaa": {"requests_per_minute": 9}}},
                  scope_limits={"key": {"tokens_per_day": 1000}})
    checks = lim.checks_for(call((("requests_per_minute", 3),)), 10)
    assert {(c.metric, c.window): c.spec.limit for c in checks if c.scope.kind == "key"} == \
        {("requests", "minute"): 3, ("tokens", "day"): 1000}
