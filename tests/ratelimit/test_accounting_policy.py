"""Reconciliation of streams whose final usage never came: charged what they relayed."""

from __future__ import annotations

import math
from typing import Any

import pytest

from llmproxy.config import parse_ratelimit as parse
from llmproxy.exchange import Exchange, Outcome, RequestInfo, ResponseMeta, Usage
from llmproxy.ratelimit.policy import Limiter, Reservation, actual_tokens
from llmproxy.ratelimit.store import Adjustment, CounterState, Decision


class Recording:
    """A store that admits everything and keeps the corrections."""

    def __init__(self) -> None:
        self.adjusted: list[Adjustment] = []

    def reserve(self, specs: Any, budgets: Any = (), hold: str = "",
                hold_ttl: float = 0.0) -> Decision:
        return Decision(True, {s.key: 7 for s in specs},
                        [CounterState(s.cost, None, 60.0) for s in specs])

    def adjust(self, adjustments: Any, settlements: Any = ()) -> None:
        self.adjusted += adjustments

    def ping(self) -> None:
        pass

    def close(self) -> None:
        pass


def limiter(count_tokens: str = "total") -> tuple[Limiter, Recording]:
    store = Recording()
    settings = parse({"features": {"rate_limiting": {
        "enabled": True, "count_tokens": count_tokens,
        "scope_limits": {"key": {"tokens_per_minute": 10**6}}}}}, environ={})
    return Limiter(settings, store), store  # type: ignore[arg-type]


def streamed(prompt_chars: int, max_tokens: int | None) -> Exchange:
    ex = Exchange("rid", "POST", "/x", provider="openai", dialect="openai", model="m",
                  key_fingerprint="fp_0123456789abcdef", streaming=True)
    ex.request_bytes = 200
    ex.request_info = RequestInfo(model="m", text_chars=prompt_chars,
                                  max_output_tokens=max_tokens)
    return ex


def token_delta(store: Recording) -> int:
    (adj,) = [a for a in store.adjusted if a.key.endswith(":tokens:minute")]
    return adj.delta


@pytest.mark.parametrize("max_tokens", [None, 4000])
def test_an_aborted_stream_without_usage_is_charged_its_prompt_and_what_it_relayed(
        max_tokens: int | None) -> None:
    lim, store = limiter()
    ex = streamed(prompt_chars=500, max_tokens=max_tokens)  # estimate: 100 input tokens
    res = lim.reserve(ex)
    assert isinstance(res, Reservation)
    ex.meta.output_chars = 1234
    ex.meta.estimate_output(5.0)
    ex.status, ex.outcome = 200, Outcome.CLIENT_ABORTED
    lim.reconcile(ex, res)
    relayed = math.ceil(1234 / 5)
    assert (ex.meta.usage.output_tokens, ex.meta.output_estimated) == (relayed, True)
    assert res.tokens + token_delta(store) == 100 + relayed  # not below, not the max_tokens


def test_anthropic_partial_usage_keeps_its_real_prompt_count() -> None:
    lim, store = limiter()
    ex = streamed(prompt_chars=30, max_tokens=4000)
    ex.provider = ex.dialect = "anthropic"
    res = lim.reserve(ex)
    assert isinstance(res, Reservation)
    # message_start: input 17, cache reads 3; message_delta never came
    ex.meta.usage = Usage(input_tokens=17, cached_tokens=3, cache_creation_tokens=0,
                          total_tokens=20)
    ex.meta.output_chars = 900
    ex.meta.estimate_output(3.0)
    assert ex.meta.usage.total_tokens == 20 + 300
    ex.status, ex.outcome = 200, Outcome.CLIENT_ABORTED
    lim.reconcile(ex, res)
    assert res.tokens + token_delta(store) == 20 + 300


def test_the_providers_own_count_wins_over_the_relayed_text() -> None:
    meta = ResponseMeta(usage=Usage(input_tokens=10, output_tokens=7, total_tokens=17))
    meta.output_chars = 10_000
    meta.estimate_output(4.0)
    assert (meta.usage.output_tokens, meta.output_estimated) == (7, False)
    nothing = ResponseMeta()
    nothing.estimate_output(4.0)
    assert nothing.usage.output_tokens is None and not nothing.output_estimated


@pytest.mark.parametrize(("mode", "expected"), [("input", 100), ("output", 50),
                                                ("total", 150)])
def test_actual_tokens_with_only_an_output_count(mode: str, expected: int) -> None:
    assert actual_tokens(mode, Usage(output_tokens=50), input_estimate=100) == expected


def test_estimate_divisor_by_route_then_dialect() -> None:
    est = parse({"features": {"rate_limiting": {"estimation": {
        "chars_per_token": 4, "provider_chars_per_token": {"openai": 5, "groq": 3.5}}}}},
        environ={}).estimation
    assert est.divisor("groq", "openai") == 3.5
    assert est.divisor("together", "openai") == 5
    assert est.divisor("gemini", "gemini") == 4
