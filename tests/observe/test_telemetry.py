"""OpenTelemetry spans, metrics and propagation through the in-process app, exported to the
SDK's in-memory exporters; and the parsing of the `telemetry:` section and OTEL_* variables."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import REPO_ROOT
from fake_upstream import FakeUpstream
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode
from services import free_port

from llmproxy.config import ConfigError, TelemetrySettings, parse_telemetry
from llmproxy.exchange import Exchange
from llmproxy.observe.telemetry import (
    SECONDS_BUCKETS,
    TOKEN_BUCKETS,
    _flush_and_stop,
    _shown,
    _Throttle,
    get_telemetry,
)
from llmproxy.state import get_state

PROMPT = "the secret plans for tuesday"
PARENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"
CHAT = {"model": "fake-model-1", "max_tokens": 9,
        "messages": [{"role": "user", "content": PROMPT}]}
AUTH = {"Authorization": "Bearer sk-test-secret-key"}


@pytest.fixture(autouse=True)
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own OTEL_* settings must not reach these apps."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@dataclass
class Otel:
    app: Any
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def one_span(self) -> ReadableSpan:
        spans = self.finished()
        assert len(spans) == 1, [s.name for s in spans]
        return spans[0]

    def points(self, name: str) -> list[HistogramDataPoint]:
        data = self.reader.get_metrics_data()
        out: list[HistogramDataPoint] = []
        for rm in data.resource_metrics if data is not None else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == name:
                        out.extend(metric.data.data_points)  # type: ignore[arg-type]
        return out


@pytest.fixture
def otel(make_app: Callable[..., Any]) -> Iterator[Callable[..., Otel]]:
    """otel(config=None, sampler=None, traces=True, metrics=True): an app with telemetry on,
    its SDK pointed at in-memory exporters."""
    providers: list[Any] = []

    def factory(config: dict[str, Any] | None = None, sampler: Any = None,
                traces: bool = True, metrics: bool = True) -> Otel:
        section = {"enabled": True, **(config or {}).pop("telemetry", {})}
        app = make_app({**(config or {}), "telemetry": section})
        exporter = InMemorySpanExporter()
        tracer_provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
        tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        reader = InMemoryMetricReader()
        meter_provider = MeterProvider([reader], shutdown_on_exit=False)
        providers.extend([tracer_provider, meter_provider])
        telemetry = get_telemetry(app)
        assert telemetry is not None
        telemetry.use(tracer_provider if traces else None, meter_provider if metrics else None)
        return Otel(app, exporter, reader)

    yield factory
    for provider in providers:
        provider.shutdown()


def post(client: Any, path: str, body: dict[str, Any], **headers: str) -> Any:
    """POST and read the whole answer (buffered: the test client then closes the response,
    which fires the terminal event)."""
    return client.post(path, json=body, headers={**AUTH, **headers}, buffered=True)


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def traceparent_of(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


# -- spans -------------------------------------------------------------------------------------

def test_chat_span(otel: Callable[..., Otel], fake_upstream: FakeUpstream) -> None:
    o = otel()
    resp = post(o.app.test_client(), "/openai/v1/chat/completions", CHAT)
    assert resp.status_code == 200
    span = o.one_span()
    sc = fake_upstream.scenario
    assert span.name == "chat fake-model-1"
    assert span.kind is SpanKind.CLIENT
    assert span.status.status_code is StatusCode.UNSET
    assert span.parent is None  # no incoming traceparent: a new trace
    a = attrs(span)
    assert {k: a.get(k) for k in (
        "gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
        "gen_ai.request.max_tokens", "gen_ai.request.stream", "gen_ai.response.model",
        "gen_ai.response.id", "gen_ai.response.finish_reasons", "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens", "gen_ai.usage.cache_read.input_tokens",
        "gen_ai.usage.reasoning.output_tokens", "server.address", "server.port",
        "llmproxy.outcome", "llmproxy.request.id",
    )} == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "fake-model-1", "gen_ai.request.max_tokens": 9,
        "gen_ai.request.stream": False, "gen_ai.response.model": sc.model,
        "gen_ai.response.id": "chatcmpl-fake", "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": sc.input_tokens,
        "gen_ai.usage.output_tokens": sc.output_tokens,
        "gen_ai.usage.cache_read.input_tokens": sc.cached_tokens,
        "gen_ai.usage.reasoning.output_tokens": sc.reasoning_tokens,
        "server.address": "127.0.0.1", "server.port": fake_upstream.port,
        "llmproxy.outcome": "completed",
        "llmproxy.request.id": resp.headers["X-Proxy-Request-ID"],
    }
    assert a["llmproxy.key.fingerprint"].startswith("fp_")
    # What a success implies is left out: no error, no status, no zero counts.
    assert not {"error.type", "http.response.status_code"} & set(a)
    # Never the key, never the prompt or the completion.
    values = " ".join(str(v) for v in a.values())
    assert "sk-test-secret-key" not in values and PROMPT not in values and sc.text not in values
    # The provider was told the proxy's span is its parent.
    assert fake_upstream.last.header("traceparent") == traceparent_of(span)


def test_anthropic_input_tokens_include_cache(otel: Callable[..., Otel],
                                               fake_upstream: FakeUpstream) -> None:
    """Anthropic reports cache reads outside input_tokens; the convention counts them in."""
    o = otel()
    resp = post(o.app.test_client(), "/anthropic/v1/messages", {**CHAT, "stream": True},
                **{"anthropic-version": "2023-06-01"})
    assert resp.status_code == 200
    a = attrs(o.one_span())
    sc = fake_upstream.scenario
    assert a["gen_ai.usage.input_tokens"] == sc.input_tokens + sc.cached_tokens
    assert a["gen_ai.usage.cache_read.input_tokens"] == sc.cached_tokens
    assert "gen_ai.usage.cache_creation.input_tokens" not in a  # reported as 0
    assert a["gen_ai.request.stream"] is True
    assert a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.response.finish_reasons"] == ("end_turn",)
    assert 0 < a["gen_ai.response.time_to_first_chunk"] < 5


def test_gemini_names(otel: Callable[..., Otel]) -> None:
    o = otel()
    resp = post(o.app.test_client(), "/gemini/v1beta/models/gemini-2.5-flash:generateContent",
                {"contents": [{"parts": [{"text": PROMPT}]}]})
    assert resp.status_code == 200
    span = o.one_span()
    assert span.name == "generate_content gemini-2.5-flash"
    assert attrs(span)["gen_ai.provider.name"] == "gcp.gemini"


@pytest.mark.parametrize(("path", "body", "operation"), [
    ("/openai/v1/embeddings", {"model": "e", "input": "x"}, "embeddings"),
    ("/openai/v1/completions", {"model": "c", "prompt": "x"}, "text_completion"),
    ("/openai/v1/responses", {"model": "r", "input": "x"}, "chat"),
    ("/anthropic/v1/messages/count_tokens", {"model": "m", "messages": []}, "count_tokens"),
])
def test_operation_names(otel: Callable[..., Otel], path: str, body: dict[str, Any],
                         operation: str) -> None:
    o = otel()
    assert post(o.app.test_client(), path, body).status_code == 200
    span = o.one_span()
    assert attrs(span)["gen_ai.operation.name"] == operation
    assert span.name == f"{operation} {body['model']}"


def test_model_list_is_other_without_model(otel: Callable[..., Otel]) -> None:
    o = otel()
    assert o.app.test_client().get("/openai/v1/models", headers=AUTH,
                                   buffered=True).status_code == 200
    span = o.one_span()
    assert span.name == "other"
    assert "gen_ai.request.model" not in attrs(span)


def test_count_tokens_has_no_usage(otel: Callable[..., Otel]) -> None:
    """A token count's figure is a measurement, not usage: neither span nor metric has it."""
    o = otel()
    post(o.app.test_client(), "/anthropic/v1/messages/count_tokens",
         {"model": "m", "messages": []})
    assert "gen_ai.usage.input_tokens" not in attrs(o.one_span())
    assert o.points("gen_ai.client.token.usage") == []


def test_incoming_traceparent_is_the_parent(otel: Callable[..., Otel],
                                            fake_upstream: FakeUpstream) -> None:
    o = otel()
    post(o.app.test_client(), "/openai/v1/chat/completions", CHAT, traceparent=TRACEPARENT,
         tracestate="congo=t61rcWkgMzE")
    span = o.one_span()
    ctx = span.get_span_context()
    assert f"{ctx.trace_id:032x}" == PARENT_TRACE
    assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT_SPAN
    rec = fake_upstream.last
    assert rec.header("traceparent") == f"00-{PARENT_TRACE}-{ctx.span_id:016x}-01"
    assert rec.header("tracestate") == "congo=t61rcWkgMzE"
    # Exactly one of each, whatever case the client used.
    names = [k.lower() for k, _ in rec.headers]
    assert names.count("traceparent") == 1 and names.count("tracestate") == 1


def test_malformed_traceparent_starts_a_trace(otel: Callable[..., Otel],
                                              fake_upstream: FakeUpstream) -> None:
    o = otel()
    post(o.app.test_client(), "/openai/v1/chat/completions", CHAT, traceparent="00-nonsense")
    span = o.one_span()
    assert span.parent is None
    assert fake_upstream.last.header("traceparent") == traceparent_of(span)


@pytest.mark.parametrize("section", [{"propagate": False}, {"propagate_except": ["groq"]}])
def test_propagation_off(otel: Callable[..., Otel], fake_upstream: FakeUpstream,
                         section: dict[str, Any]) -> None:
    """Off: the proxy adds nothing; a client's own traceparent passes through untouched."""
    o = otel({"telemetry": section})
    client = o.app.test_client()
    post(client, "/groq/v1/chat/completions", CHAT)
    assert fake_upstream.last.header("traceparent") is None
    post(client, "/groq/v1/chat/completions", CHAT, traceparent=TRACEPARENT)
    assert fake_upstream.last.header("traceparent") == TRACEPARENT
    post(client, "/openai/v1/chat/completions", CHAT)
    if section.get("propagate") is False:
        assert fake_upstream.last.header("traceparent") is None
    else:
        assert fake_upstream.last.header("traceparent") is not None
    assert len(o.finished()) == 3  # the spans themselves are still recorded


def test_sampled_out_still_propagates_and_counts(otel: Callable[..., Otel],
                                                 fake_upstream: FakeUpstream) -> None:
    o = otel(sampler=ALWAYS_OFF)
    post(o.app.test_client(), "/openai/v1/chat/completions", CHAT)
    assert o.finished() == []
    traceparent = fake_upstream.last.header("traceparent")
    assert traceparent is not None and int(traceparent[-2:], 16) & 1 == 0  # not sampled
    assert sum(p.count for p in o.points("gen_ai.client.operation.duration")) == 1


def test_metrics_only(otel: Callable[..., Otel], fake_upstream: FakeUpstream) -> None:
    o = otel(traces=False)
    client = o.app.test_client()
    post(client, "/openai/v1/chat/completions", CHAT, traceparent=TRACEPARENT)
    assert fake_upstream.last.header("traceparent") == TRACEPARENT  # forwarded, not ours
    post(client, "/openai/v1/chat/completions", CHAT)
    assert fake_upstream.last.header("traceparent") is None
    assert sum(p.count for p in o.points("gen_ai.client.operation.duration")) == 2


def test_upstream_error(otel: Callable[..., Otel], fake_upstream: FakeUpstream) -> None:
    from fake_upstream import error

    fake_upstream.script(error("openai", 500))
    o = otel()
    assert post(o.app.test_client(), "/openai/v1/chat/completions", CHAT).status_code == 500
    span = o.one_span()
    assert span.status.status_code is StatusCode.ERROR
    assert attrs(span)["error.type"] == "500"
    (point,) = o.points("gen_ai.client.operation.duration")
    assert point.attributes is not None and point.attributes["error.type"] == "500"


def test_unreachable_provider(otel: Callable[..., Otel]) -> None:
    o = otel({"providers": {"openai": {"base_url": f"http://127.0.0.1:{free_port()}"}}})
    assert post(o.app.test_client(), "/openai/v1/chat/completions", CHAT).status_code == 502
    a = attrs(o.one_span())
    assert (a["error.type"], a["llmproxy.outcome"]) == ("connect", "upstream_error")


def test_midstream_break(otel: Callable[..., Otel], fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(fake_upstream.scripts.dying(after=2))
    o = otel()
    post(o.app.test_client(), "/openai/v1/chat/completions", {**CHAT, "stream": True})
    a = attrs(o.one_span())
    assert (a["error.type"], a["llmproxy.outcome"]) == ("midstream", "upstream_error")


def test_rate_limited(otel: Callable[..., Otel]) -> None:
    o = otel({"features": {"rate_limiting": {
        "enabled": True, "backend": "memory",
        "overrides": {"per_user": {"alice": {"requests_per_minute": 1}}}}}})
    client = o.app.test_client()
    assert post(client, "/openai/v1/chat/completions", CHAT, **{"X-User-ID": "alice"}) \
        .status_code == 200
    assert post(client, "/openai/v1/chat/completions", CHAT, **{"X-User-ID": "alice"}) \
        .status_code == 429
    allowed, denied = (attrs(s) for s in o.finished())
    assert allowed["llmproxy.ratelimit.decision"] == "allowed"
    assert allowed["llmproxy.user"] == "alice"
    assert "error.type" not in allowed
    assert denied["llmproxy.ratelimit.decision"] == "denied"
    assert denied["llmproxy.ratelimit.policy"] == "user-requests-per-minute"
    assert (denied["error.type"], denied["http.response.status_code"]) == ("rate_limited", 429)


def test_cost(otel: Callable[..., Otel], fake_upstream: FakeUpstream) -> None:
    fake_upstream.scenario.model = "gpt-4.1-mini-2025-04-14"  # priced in configs/pricing.yml
    o = otel()
    post(o.app.test_client(), "/openai/v1/chat/completions", {**CHAT, "model": "gpt-4.1-mini"})
    cost = attrs(o.one_span())["llmproxy.cost.usd"]
    assert isinstance(cost, float) and cost > 0


# -- metrics -----------------------------------------------------------------------------------

def test_metrics(otel: Callable[..., Otel], fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(fake_upstream.scripts.paused(0.02))  # one read per event
    o = otel()
    client = o.app.test_client()
    post(client, "/openai/v1/chat/completions", CHAT)
    post(client, "/openai/v1/chat/completions",
         {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    sc = fake_upstream.scenario
    tokens = {p.attributes["gen_ai.token.type"]: p for p in  # type: ignore[index]
              o.points("gen_ai.client.token.usage")}
    assert (tokens["input"].count, tokens["input"].sum) == (2, 2 * sc.input_tokens)
    assert (tokens["output"].count, tokens["output"].sum) == (2, 2 * sc.output_tokens)
    assert tuple(tokens["input"].explicit_bounds) == TOKEN_BUCKETS
    assert dict(tokens["input"].attributes or {}) == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "fake-model-1", "gen_ai.response.model": sc.model,
        "server.address": "127.0.0.1", "server.port": fake_upstream.port,
        "gen_ai.token.type": "input"}
    (duration,) = o.points("gen_ai.client.operation.duration")
    assert duration.count == 2 and tuple(duration.explicit_bounds) == SECONDS_BUCKETS
    # The stream timings only for the stream.
    (first,) = o.points("gen_ai.client.operation.time_to_first_chunk")
    (per_chunk,) = o.points("gen_ai.client.operation.time_per_output_chunk")
    assert first.count == 1 and per_chunk.count == 1
    # Events 20 ms apart, one read each: the mean gap after the first is about that.
    assert 0.015 < per_chunk.sum < 0.5


# -- off, lifecycle ------------------------------------------------------------------------------

def test_off_registers_nothing(make_app: Callable[..., Any],
                               fake_upstream: FakeUpstream) -> None:
    on = make_app({"telemetry": {"enabled": True}})
    off = make_app()
    assert get_telemetry(off) is None and get_telemetry(on) is not None
    assert len(get_state(on).listeners) == len(get_state(off).listeners) + 1
    seen: list[Exchange] = []
    get_state(off).on_finish(seen.append)
    post(off.test_client(), "/openai/v1/chat/completions", CHAT, traceparent=TRACEPARENT)
    assert len(seen) == 1 and seen[0].span is None
    assert fake_upstream.last.header("traceparent") == TRACEPARENT  # untouched


def test_off_imports_no_opentelemetry() -> None:
    """Off, the proxy sets up nothing of OpenTelemetry: no exporter, no span processor. (The
    API and parts of the SDK may still be loaded by others: redis-py 8 imports them for its
    own, unused, instrumentation.)"""
    code = ("import sys; from llmproxy import create_app; create_app(); "
            "print(sorted(m for m in sys.modules if m.startswith(("
            "'opentelemetry.exporter', 'opentelemetry.sdk.trace.export'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT, env={k: v for k, v in os.environ.items()
                                             if not k.startswith(("OTEL_", "LLMPROXY_"))},
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_shutdown_ends_open_streams(otel: Callable[..., Otel],
                                    fake_upstream: FakeUpstream) -> None:
    """A stream still open when the process exits gets its span ended (and exported)."""
    fake_upstream.script(fake_upstream.scripts.endless())
    o = otel()
    resp = o.app.test_client().post("/openai/v1/chat/completions",
                                    json={**CHAT, "stream": True}, headers=AUTH)
    next(resp.response)  # the stream is running, its span open
    assert o.finished() == []
    telemetry = get_telemetry(o.app)
    assert telemetry is not None
    telemetry.shutdown()
    a = attrs(o.one_span())
    assert (a["llmproxy.outcome"], a["error.type"]) == ("interrupted", "interrupted")
    resp.close()  # the terminal event after shutdown must not fail
    assert len(o.finished()) == 1


def test_flush_survives_gunicorns_quick_exit() -> None:
    """gunicorn's quick exit raises SystemExit again in the middle of the exit flush: the
    flush is taken up again, then the provider stopped."""
    calls: list[str] = []

    class Provider:
        def force_flush(self) -> bool:
            calls.append("flush")
            if calls.count("flush") == 1:
                raise SystemExit(0)
            return True

        def shutdown(self) -> None:
            calls.append("shutdown")

    _flush_and_stop(Provider())
    assert calls == ["flush", "flush", "shutdown"]


def test_logged_endpoint_has_no_credentials() -> None:
    assert _shown("https://user:secret@collector:4318/v1/traces?token=x") == \
        "https://collector:4318/v1/traces"
    assert _shown(None) == "off"


def test_sdk_logs_are_throttled() -> None:
    throttle = _Throttle(every=60.0)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("opentelemetry.x", logging.WARNING, __file__, 1, msg, None,
                                 None)

    assert throttle.filter(record("export failed"))
    assert not throttle.filter(record("export failed"))
    assert not throttle.filter(record("export failed"))
    assert throttle.filter(record("another problem"))
    throttle.every = 0.0
    again = record("export failed")
    assert throttle.filter(again)
    assert "2 similar messages" in str(again.msg)


# -- settings ----------------------------------------------------------------------------------

def test_off_by_default() -> None:
    assert parse_telemetry(None, {}) == TelemetrySettings()
    assert not parse_telemetry({"enabled": "auto"}, {}).enabled


def test_enabled_by_the_standard_variables() -> None:
    s = parse_telemetry(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
                               "OTEL_SERVICE_NAME": "edge-proxy"})
    assert s.enabled and s.service_name == "edge-proxy"
    assert s.traces_endpoint == "http://collector:4318/v1/traces"
    assert s.metrics_endpoint == "http://collector:4318/v1/metrics"
    grpc = parse_telemetry(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
                                  "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert (grpc.traces_endpoint, grpc.traces_protocol) == ("http://collector:4317", "grpc")
    # A signal's own endpoint is used as given; in auto mode the other signal stays off.
    only = parse_telemetry(None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://t.example/x"})
    assert (only.traces_endpoint, only.metrics_endpoint) == ("https://t.example/x", None)
    assert parse_telemetry(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                  "OTEL_METRICS_EXPORTER": "none"}).metrics_endpoint is None


def test_config_section_and_precedence() -> None:
    section = {"enabled": "auto", "endpoint": "http://from-config:4318", "protocol": "grpc",
               "service_name": "cfg", "metric_export_interval_ms": 500,
               "propagate_except": ["groq"]}
    s = parse_telemetry(section, {})
    assert (s.enabled, s.traces_endpoint, s.service_name) == (True, "http://from-config:4318",
                                                              "cfg")
    assert s.metric_export_interval_ms == 500 and s.propagate_except == frozenset({"groq"})
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://from-env:4318",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_METRIC_EXPORT_INTERVAL": "250"}
    s = parse_telemetry(section, env)
    assert s.traces_endpoint == "http://from-env:4318/v1/traces"
    assert s.metric_export_interval_ms == 250
    # enabled: true without any endpoint: the conventions' local default.
    assert parse_telemetry({"enabled": True}, {}).traces_endpoint == \
        "http://localhost:4318/v1/traces"
    # OTEL_SDK_DISABLED wins over everything; enabled: false too.
    assert not parse_telemetry({"enabled": True}, {"OTEL_SDK_DISABLED": "true"}).enabled
    assert not parse_telemetry({"enabled": False}, env).enabled
    assert not parse_telemetry({"enabled": True, "traces": False, "metrics": False}, {}).enabled
    # Small export batches by default (encoding one holds the worker); the variables win.
    s = parse_telemetry({"enabled": True}, {})
    assert (s.max_queue_size, s.export_batch_size) == (2048, 64)
    s = parse_telemetry({"enabled": True}, {"OTEL_BSP_MAX_QUEUE_SIZE": "4096",
                                            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "512"})
    assert (s.max_queue_size, s.export_batch_size) == (4096, 512)


@pytest.mark.parametrize(("section", "env", "key"), [
    ({"endpoints": "x"}, {}, "telemetry.endpoints"),
    ({"enabled": "yes"}, {}, "telemetry.enabled"),
    ({"protocol": "http/json"}, {}, "telemetry.protocol"),
    ({"endpoint": "collector:4318"}, {}, "telemetry.endpoint"),
    ({"traces": "on"}, {}, "telemetry.traces"),
    ({"metric_export_interval_ms": 0}, {}, "telemetry.metric_export_interval_ms"),
    ({"propagate_except": "groq"}, {}, "telemetry.propagate_except"),
    ({"service_name": ""}, {}, "telemetry.service_name"),
    ([], {}, "telemetry"),
    (None, {"OTEL_SDK_DISABLED": "1"}, "OTEL_SDK_DISABLED"),
    ({"enabled": True}, {"OTEL_BSP_MAX_QUEUE_SIZE": "0"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
    ({"enabled": True}, {"OTEL_BSP_MAX_QUEUE_SIZE": "100",
                         "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "512"},
     "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
    (None, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "localhost"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ({"enabled": True}, {"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
    ({"enabled": True}, {"OTEL_METRIC_EXPORT_INTERVAL": "soon"}, "OTEL_METRIC_EXPORT_INTERVAL"),
    ({"enabled": True}, {"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
    ({"enabled": True}, {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                         "OTEL_TRACES_SAMPLER_ARG": "2"}, "OTEL_TRACES_SAMPLER_ARG"),
])
def test_invalid_settings_name_the_key(section: Any, env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_telemetry(section, env)
    assert err.value.key == key


def test_invalid_section_stops_the_app(make_app: Callable[..., Any]) -> None:
    with pytest.raises(ConfigError, match="telemetry.protocol"):
        make_app({"telemetry": {"protocol": "carrier-pigeon"}})
