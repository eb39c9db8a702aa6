"""Metrics, cost and records through the in-process app and the fake upstream."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_upstream import FakeUpstream
from services import RedisServer, closed_port

from llmproxy.config import ConfigError, parse_pricing
from llmproxy.observe import metrics, records
from llmproxy.pricing import PricingTable
from llmproxy.state import get_state
from observe.helpers import parse_scrape, scrape_sum

M = 1_000_000
Delta = Callable[..., Callable[[], float]]

# One streamed request per dialect: (provider, priced model, path, JSON body or None).
STREAMS = [
    ("openai", "gpt-4.1-mini-2025-04-14", "/openai/v1/chat/completions",
     {"model": "gpt-4.1-mini", "stream": True, "stream_options": {"include_usage": True},
      "messages": [{"role": "user", "content": "hi"}]}),
    ("anthropic", "claude-sonnet-4-5-20250929", "/anthropic/v1/messages",
     {"model": "claude-sonnet-4-5-20250929", "stream": True, "max_tokens": 10,
      "messages": [{"role": "user", "content": "hi"}]}),
    ("gemini", "gemini-2.5-flash",
     "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
     {"contents": [{"parts": [{"text": "hi"}]}]}),
]


def expected_cost(pricing_raw: dict[str, Any], provider: str, model: str,
                  fake: FakeUpstream) -> float:
    """The fake's token counts priced by hand from the table, per dialect's usage rules."""
    table = PricingTable(parse_pricing({"pricing": pricing_raw}))
    price = table.lookup(provider, model)
    assert price is not None, f"{model} must be in the shipped table"
    rates = price.base
    sc = fake.scenario
    if provider == "anthropic":  # input_tokens excludes cache reads, billed on top
        return (sc.input_tokens * rates.input + sc.cached_tokens * rates.cached_input
                + sc.output_tokens * rates.output) / M
    # The parsers fold Gemini's thoughtsTokenCount into output_tokens, as OpenAI reports it.
    output = sc.output_tokens + (sc.reasoning_tokens if provider == "gemini" else 0)
    return ((sc.input_tokens - sc.cached_tokens) * rates.input
            + sc.cached_tokens * rates.cached_input + output * rates.output) / M


@pytest.fixture
def app_with(make_app: Callable[..., Any], pricing_raw: dict[str, Any],
             tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Factory: the app with the shipped pricing, records in tmp_path, plus ``overrides``."""
    built: list[Any] = []

    def factory(**overrides: Any) -> Any:
        config: dict[str, Any] = {
            "pricing": pricing_raw,
            "usage_records": {"enabled": True, "path": str(tmp_path / "usage.jsonl"),
                              "max_bytes": 1 << 20, "backups": 1},
        }
        for key, value in overrides.items():
            config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
        app = make_app(config)
        built.append(app)
        return app

    yield factory
    for app in built:
        sink = records.get_sink(app)
        if sink is not None:
            sink.close()


def post(client: Any, path: str, body: dict[str, Any]) -> Any:
    """POST and read the whole answer; buffered, so the test client closes the response and
    the terminal event fires, as a WSGI server does after the last byte."""
    return client.post(path, json=body, buffered=True)


def read_records(app: Any) -> list[dict[str, Any]]:
    sink = records.get_sink(app)
    assert sink is not None
    sink.close()  # flushes the queue: the records of every finished request are on disk
    return [json.loads(line) for line in Path(sink.path).read_text().splitlines()]


@pytest.mark.parametrize(("provider", "model", "path", "body"), STREAMS,
                         ids=[s[0] for s in STREAMS])
def test_stream_cost_tokens_and_record(app_with: Callable[..., Any], fake_upstream: FakeUpstream,
                                       pricing_raw: dict[str, Any], delta: Delta,
                                       provider: str, model: str, path: str,
                                       body: dict[str, Any]) -> None:
    fake_upstream.scenario.model = model
    app = app_with()
    label = body.get("model") or model  # the model label is the one requested (or reported)
    cost = delta("llmproxy_cost_usd_total", provider=provider, model=label)
    requests_ = delta("llmproxy_requests_total", provider=provider, model=label,
                      status_class="2xx", outcome="completed")
    out_tokens = delta("llmproxy_tokens_total", provider=provider, model=label, kind="output")
    ttfb = delta("llmproxy_time_to_first_byte_seconds_count", provider=provider, model=label,
                 streaming="true")

    resp = post(app.test_client(), path, body)
    assert resp.status_code == 200
    assert fake_upstream.scenario.text in _stream_text(resp.get_data(as_text=True))

    want = expected_cost(pricing_raw, provider, model, fake_upstream)
    assert want > 0
    assert cost() == pytest.approx(want)
    assert requests_() == 1
    assert ttfb() == 1
    sc = fake_upstream.scenario
    assert out_tokens() == sc.output_tokens + (sc.reasoning_tokens if provider == "gemini" else 0)
    [record] = read_records(app)
    assert record["cost_usd"] == pytest.approx(want)
    assert (record["provider"], record["streaming"], record["outcome"]) == (provider, True,
                                                                           "completed")
    assert record["output_tokens"] == out_tokens()


def _stream_text(body: str) -> str:
    """Concatenated text deltas of an SSE body, whatever the dialect."""
    text = []
    for line in body.splitlines():
        if not line.startswith("data:") or line.strip() == "data: [DONE]":
            continue
        event = json.loads(line[5:])
        for choice in event.get("choices") or []:
            text.append((choice.get("delta") or {}).get("content") or "")
        if event.get("type") == "content_block_delta":
            text.append(event["delta"].get("text", ""))
        for cand in event.get("candidates") or []:
            text.extend(p.get("text", "") for p in cand["content"]["parts"])
    return "".join(text)


def test_unknown_model_costs_null_and_is_counted_unpriced(app_with: Callable[..., Any],
                                                          fake_upstream: FakeUpstream,
                                                          delta: Delta) -> None:
    fake_upstream.scenario.model = "house-model-7"
    app = app_with()
    unpriced = delta("llmproxy_unpriced_requests_total", provider="openai",
                     model="house-model-7")
    resp = post(app.test_client(), "/openai/v1/chat/completions",
                {"model": "house-model-7", "messages": []})
    assert resp.status_code == 200
    assert unpriced() == 1
    [record] = read_records(app)
    assert record["cost_usd"] is None
    assert record["input_tokens"] == fake_upstream.scenario.input_tokens


def test_model_label_cardinality_is_bounded(app_with: Callable[..., Any], delta: Delta) -> None:
    app = app_with(metrics={"max_models": 2})
    client = app.test_client()
    names = ["cardinality-a", "cardinality-b", "cardinality-c", "cardinality-d"]
    own = {n: delta("llmproxy_requests_total", provider="openai", model=n, status_class="2xx",
                    outcome="completed") for n in names}
    other = delta("llmproxy_requests_total", provider="openai", model="other",
                  status_class="2xx", outcome="completed")
    priced = delta("llmproxy_requests_total", provider="openai", model="gpt-4o",
                   status_class="2xx", outcome="completed")
    for name in names + names[:1] + ["gpt-4o"]:
        resp = post(client, "/openai/v1/chat/completions", {"model": name, "messages": []})
        assert resp.status_code == 200
    assert [own[n]() for n in names] == [2, 1, 0, 0]  # the first two seen keep their name
    assert other() == 2
    assert priced() == 1  # names in the pricing table never count against the bound
    text = client.get("/metrics").get_data(as_text=True)
    assert 'model="cardinality-c"' not in text


def test_a_model_label_is_never_longer_than_a_record_field(app_with: Callable[..., Any],
                                                          delta: Delta) -> None:
    client = app_with().test_client()
    other = delta("llmproxy_requests_total", provider="openai", model="other",
                  status_class="2xx", outcome="completed")
    resp = post(client, "/openai/v1/chat/completions", {"model": "m" * 257, "messages": []})
    assert resp.status_code == 200
    assert other() == 1
    text = client.get("/metrics").get_data(as_text=True)
    assert max(len(line) for line in text.splitlines()) < 512


def test_in_flight_and_open_streams_follow_the_terminal_event(app_with: Callable[..., Any],
                                                              fake_upstream: FakeUpstream
                                                              ) -> None:
    app = app_with()
    in_flight = metrics.IN_FLIGHT._value.get  # noqa: SLF001 - gauge value in this process
    open_streams = metrics.OPEN_STREAMS._value.get  # noqa: SLF001
    base_in_flight, base_streams = in_flight(), open_streams()
    resp = app.test_client().post("/openai/v1/chat/completions", buffered=False, json={
        "model": "gpt-4o", "stream": True, "messages": []})
    assert resp.status_code == 200
    # Headers are out, the body not yet sent: the request is in flight and its stream open.
    assert (in_flight() - base_in_flight, open_streams() - base_streams) == (1, 1)
    b"".join(resp.response)
    resp.close()
    assert (in_flight() - base_in_flight, open_streams() - base_streams) == (0, 0)

    resp = post(app.test_client(), "/openai/v1/chat/completions",
                {"model": "gpt-4o", "messages": []})
    assert resp.status_code == 200
    assert (in_flight() - base_in_flight, open_streams() - base_streams) == (0, 0)


def test_upstream_errors_by_kind(app_with: Callable[..., Any], fake_upstream: FakeUpstream,
                                 delta: Delta) -> None:
    connect = delta("llmproxy_upstream_errors_total", provider="anthropic", kind="connect")
    midstream = delta("llmproxy_upstream_errors_total", provider="openai", kind="midstream")
    with closed_port() as dead_port:
        app = app_with(providers={"anthropic": {"base_url": f"http://127.0.0.1:{dead_port}"}})
        client = app.test_client()
        resp = post(client, "/anthropic/v1/messages", {"model": "claude-3-haiku", "messages": []})
    assert resp.status_code == 502
    fake_upstream.script(fake_upstream.scripts.dying(after=3))
    resp = post(client, "/openai/v1/chat/completions",
                {"model": "gpt-4o", "stream": True, "messages": []})
    resp.get_data()
    assert (connect(), midstream()) == (1, 1)
    outcomes = sorted(r["outcome"] for r in read_records(app))
    assert outcomes == ["upstream_error", "upstream_error"]


def test_ratelimit_hooks_count(delta: Delta) -> None:
    denied = delta("llmproxy_ratelimit_denials_total", scope="user", metric="tokens")
    errors = delta("llmproxy_ratelimit_backend_errors_total")
    metrics.record_ratelimit_denial("user", "tokens", "minute")
    metrics.record_ratelimit_denial("user", "tokens", "day")
    metrics.record_ratelimit_backend_error("reserve", "open")
    assert (denied(), errors()) == (2, 1)
    evicted = delta("llmproxy_ratelimit_evictions_total")
    metrics.record_ratelimit_evictions(3)
    assert evicted() == 3


def test_metrics_bearer_token(app_with: Callable[..., Any]) -> None:
    client = app_with(metrics={"bearer_token": "s3cret-scrape"}).test_client()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-scrape"}):
        resp = client.get("/metrics", headers=headers)
        assert resp.status_code == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert b"s3cret" not in resp.get_data()
    resp = client.get("/metrics", headers={"Authorization": "Bearer s3cret-scrape"})
    assert resp.status_code == 200
    assert resp.content_type.startswith("text/plain")
    samples = parse_scrape(resp.get_data(as_text=True))
    assert scrape_sum(samples, "llmproxy_ratelimit_backend_errors_total") >= 0


def test_metrics_can_be_disabled(app_with: Callable[..., Any], delta: Delta) -> None:
    app = app_with(metrics={"enabled": False})
    count = delta("llmproxy_requests_total", provider="openai", model="gpt-4o",
                  status_class="2xx", outcome="completed")
    client = app.test_client()
    assert client.get("/metrics").status_code == 404
    assert post(client, "/openai/v1/chat/completions",
                {"model": "gpt-4o", "messages": []}).status_code == 200
    assert count() == 0
    assert len(read_records(app)) == 1  # records are a separate switch


def test_cost_is_computed_before_every_other_listener(app_with: Callable[..., Any],
                                                      fake_upstream: FakeUpstream) -> None:
    fake_upstream.scenario.model = "gpt-4o"
    app = app_with()
    seen: list[float | None] = []
    get_state(app).on_finish(lambda ex: seen.append(ex.cost_usd))
    post(app.test_client(), "/openai/v1/chat/completions", {"model": "gpt-4o", "messages": []})
    (record,) = read_records(app)
    assert seen == [record["cost_usd"]] and record["cost_usd"] > 0


# -- readiness -----------------------------------------------------------------------------

def test_ready_without_rate_limiting(app_with: Callable[..., Any]) -> None:
    resp = app_with().test_client().get("/health/ready")
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["status"] == "ready"
    assert body["checks"]["config"]["ok"] is True


@pytest.mark.parametrize("on_error", ["open", "closed"])
def test_ready_follows_the_redis_backend(app_with: Callable[..., Any],
                                         redis_server: RedisServer, on_error: str) -> None:
    """Ready means "can serve": with on_error: open a Redis outage lets requests through
    (unlimited), so the worker stays ready and says Redis is down; closed refuses them."""
    app = app_with(features={"rate_limiting": {"enabled": True, "backend": "redis",
                                               "redis": {"url": redis_server.url,
                                                         "on_error": on_error}}})
    client = app.test_client()
    resp = client.get("/health/ready")
    assert resp.status_code == 200, resp.get_json()
    check = resp.get_json()["checks"]["ratelimit_backend"]
    assert (check["backend"], check["available"]) == ("redis", True)

    redis_server.kill()  # the fixture restarts it for the next test
    started = time.monotonic()
    resp = client.get("/health/ready")
    body = resp.get_json()
    check = body["checks"]["ratelimit_backend"]
    assert check["available"] is False and check["on_error"] == on_error
    assert check["error"]  # the error's class only: a message may name the URL
    if on_error == "open":
        assert resp.status_code == 200
        assert body["status"] == "ready" and check["ok"] is True
    else:
        assert resp.status_code == 503
        assert body["status"] == "not_ready" and check["ok"] is False
    assert time.monotonic() - started < 2  # the store's own short timeout, no retries
    assert client.get("/health").status_code == 200  # liveness is not readiness


@pytest.mark.parametrize(("config", "key"), [
    ({"metrics": {"max_models": "many"}}, "metrics.max_models"),
    ({"usage_records": {"enabled": True, "backups": -1}}, "usage_records.backups"),
    ({"pricing": {"openai": {"models": {"gpt-x": {"input": "cheap", "output": 1}}}}},
     "pricing.openai.models.gpt-x.input"),
])
def test_bad_settings_stop_start_up_naming_the_key(make_app: Callable[..., Any],
                                                   config: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_app(config)
    assert err.value.key == key


def test_unwritable_records_path_does_not_fail_requests(app_with: Callable[..., Any],
                                                        tmp_path: Path, delta: Delta,
                                                        records_log: pytest.LogCaptureFixture,
                                                        ) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    app = app_with(usage_records={"path": str(blocker / "usage.jsonl")})
    dropped = delta("llmproxy_usage_records_dropped_total", reason="write_error")
    resp = post(app.test_client(), "/openai/v1/chat/completions",
                {"model": "gpt-4o", "messages": []})
    assert resp.status_code == 200
    sink = records.get_sink(app)
    assert sink is not None
    sink.close()
    assert dropped() == 1
    assert any("usage records" in r.getMessage() for r in records_log.records)


def test_budget_gauges_keep_the_most_recent_keys_and_drop_the_evicted_ones_series(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import OrderedDict

    from prometheus_client import REGISTRY

    monkeypatch.setattr(metrics, "MAX_BUDGET_KEYS", 2)
    monkeypatch.setattr(metrics, "_budget_keys", OrderedDict(), raising=False)
    monkeypatch.setattr(metrics, "BUDGET_GAUGE_EVERY", 3600.0)  # one update per key window

    def gauges(key: str, window: str = "day") -> tuple[float | None, float | None]:
        labels = {"key_id": key, "window": window}
        return (REGISTRY.get_sample_value("llmproxy_budget_spend_usd", labels),
                REGISTRY.get_sample_value("llmproxy_budget_remaining_usd", labels))

    keys = [f"key_lru{i:013d}" for i in range(4)]
    metrics.record_budget("key", keys[0], "day", 1.0, 9.0)
    metrics.record_budget("key", keys[0], "total", 2.0, 8.0)
    metrics.record_budget("key", keys[1], "day", 3.0, 7.0)
    metrics.record_budget("key", keys[0], "day", 5.0, 5.0)  # throttled, but keys[0] is used
    assert gauges(keys[0]) == (1.0, 9.0)
    metrics.record_budget("key", keys[2], "day", 4.0, 6.0)  # over the cap: keys[1] goes
    assert gauges(keys[2]) == (4.0, 6.0)  # a key after the cap gets its gauges
    assert gauges(keys[1]) == (None, None)  # the least recently used key's series are gone
    assert gauges(keys[0]) == (1.0, 9.0) and gauges(keys[0], "total") == (2.0, 8.0)
    metrics.record_budget("key", keys[3], "month", 0.5, 0.5)
    assert gauges(keys[0]) == (None, None) and gauges(keys[0], "total") == (None, None)
    assert gauges(keys[3], "month") == (0.5, 0.5) and gauges(keys[2]) == (4.0, 6.0)
    metrics.record_budget("key", keys[1], "day", 3.5, 6.5)  # an evicted key comes back
    assert gauges(keys[1]) == (3.5, 6.5) and gauges(keys[2]) == (None, None)
    metrics.record_budget("user", "alice", "day", 1.0, 1.0)  # other scopes: no series
    assert list(metrics._budget_keys) == [keys[3], keys[1]]  # noqa: SLF001
