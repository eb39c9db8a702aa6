"""OpenTelemetry end to end: real gunicorn (2 gevent workers), the official SDKs, the fake
upstream, and a real OTLP receiver on loopback that decodes what each worker exports.

Exports are made quick with the standard variables (a 100 ms batch delay, a 300 ms metric
interval); every wait is a bounded wait on the receiver's condition.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import anthropic
import openai
import pytest
import requests
from conftest import (
    REPO_ROOT,
    ProxyFactory,
    ProxyLauncher,
    ProxyProcess,
    free_port,
    new_request_id,
)
from fake_upstream import FakeUpstream, error
from otlp_receiver import SPAN_KIND_CLIENT, STATUS_ERROR, OTLPReceiver, Received

from e2e.sdk import anthropic_client, gemini_client, openai_client

pytestmark = pytest.mark.e2e

LIMITED_USER = "e2e-limited-user"
PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "300",
               "OTEL_SERVICE_NAME": "llmproxy-e2e"}
LIMITS = {"features": {"rate_limiting": {
    "enabled": True, "backend": "memory",
    "overrides": {"per_user": {LIMITED_USER: {"requests_per_minute": 1}}}}}}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    rx = OTLPReceiver(grpc=True)
    yield rx
    rx.stop()


@pytest.fixture(scope="module")
def traced_proxy(proxy_launcher: ProxyLauncher, receiver: OTLPReceiver) -> ProxyProcess:
    """The proxy (2 workers) exporting over OTLP/HTTP to the receiver, limits on."""
    return proxy_launcher(config=LIMITS, workers=2, env={
        **FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})


@pytest.fixture
def rx(receiver: OTLPReceiver, traced_proxy: ProxyProcess,
       fake_upstream: FakeUpstream) -> Received:
    assert traced_proxy.alive()
    return receiver.received


def unique_model(fake: FakeUpstream) -> str:
    """A model name of this test only, answered back by the fake: metrics filter on it."""
    model = f"e2e-{uuid.uuid4().hex[:10]}"
    fake.scenario.model = model
    return model


def traceparent_for(span_trace: str, span_id: str, flags: str = "01") -> str:
    return f"00-{span_trace}-{span_id}-{flags}"


# -- calls through the SDKs ----------------------------------------------------------------------

def test_plain_call(traced_proxy: ProxyProcess, rx: Received, fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    model = unique_model(fake_upstream)
    sc = fake_upstream.scenario
    out = openai_client(traced_proxy.url, rid).chat.completions.create(
        model=model, max_tokens=7, messages=[{"role": "user", "content": "a private prompt"}])
    assert out.choices[0].message.content == sc.text
    span = rx.wait_span(rid)
    assert span.name == f"chat {model}"
    assert span.kind == SPAN_KIND_CLIENT
    assert span.parent_span_id == ""  # the client sent no traceparent: a new trace
    a = span.attributes
    assert {k: a.get(k) for k in (
        "gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
        "gen_ai.request.max_tokens", "gen_ai.request.stream", "gen_ai.response.model",
        "gen_ai.response.id", "gen_ai.response.finish_reasons", "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens", "gen_ai.usage.cache_read.input_tokens",
        "server.address", "server.port", "llmproxy.outcome",
    )} == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": model, "gen_ai.request.max_tokens": 7,
        "gen_ai.request.stream": False, "gen_ai.response.model": model,
        "gen_ai.response.id": "chatcmpl-fake", "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": sc.input_tokens,
        "gen_ai.usage.output_tokens": sc.output_tokens,
        "gen_ai.usage.cache_read.input_tokens": sc.cached_tokens,
        "server.address": "127.0.0.1", "server.port": fake_upstream.port,
        "llmproxy.outcome": "completed",
    }
    assert "http.response.status_code" not in a and "error.type" not in a
    assert a["llmproxy.key.fingerprint"].startswith("fp_")
    assert "a private prompt" not in repr(a) and "sk-test-openai" not in repr(a)
    assert span.resource["service.name"] == "llmproxy-e2e"
    assert span.resource.get("service.instance.id")
    # Exported by a worker, never by the gunicorn master.
    assert traced_proxy.proc is not None and span.resource["process.pid"] != traced_proxy.proc.pid
    # The provider received a traceparent naming the proxy's span.
    assert fake_upstream.last.header("traceparent").startswith(span.traceparent_prefix)
    # The metrics, with the conventions' names, units and buckets.
    assert rx.wait_histogram("gen_ai.client.token.usage", 1, **{
        "gen_ai.request.model": model, "gen_ai.token.type": "input"}) == (1, sc.input_tokens)
    assert rx.wait_histogram("gen_ai.client.token.usage", 1, **{
        "gen_ai.request.model": model, "gen_ai.token.type": "output"}) == (1, sc.output_tokens)
    count, seconds = rx.wait_histogram("gen_ai.client.operation.duration", 1,
                                       **{"gen_ai.request.model": model})
    assert count == 1 and 0 < seconds < 5
    point = next(rx.points_of("gen_ai.client.operation.duration",
                              **{"gen_ai.request.model": model}))
    assert point.unit == "s" and point.bounds[0] == 0.01 and point.bounds[-1] == 81.92
    token_point = next(rx.points_of("gen_ai.client.token.usage",
                                    **{"gen_ai.request.model": model}))
    assert token_point.unit == "{token}" and token_point.bounds[-1] == 67108864
    # Not a stream: no stream timings.
    assert rx.histogram("gen_ai.client.operation.time_to_first_chunk",
                        **{"gen_ai.request.model": model}) == (0, 0)


def test_streamed_call(traced_proxy: ProxyProcess, rx: Received,
                       fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    model = unique_model(fake_upstream)
    fake_upstream.script(fake_upstream.scripts.paused(0.02))  # events arrive apart
    sc = fake_upstream.scenario
    chunks = list(openai_client(traced_proxy.url, rid).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == sc.text
    span = rx.wait_span(rid)
    a = span.attributes
    assert a["gen_ai.request.stream"] is True
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (
        sc.input_tokens, sc.output_tokens)
    assert 0 < a["gen_ai.response.time_to_first_chunk"] < 5
    match = {"gen_ai.request.model": model}
    first = rx.wait_histogram("gen_ai.client.operation.time_to_first_chunk", 1, **match)
    per_chunk = rx.wait_histogram("gen_ai.client.operation.time_per_output_chunk", 1, **match)
    assert first[0] == 1 and per_chunk[0] == 1
    assert 0.01 < per_chunk[1] < 1.0  # events 20 ms apart


def test_anthropic_and_gemini_sdks(traced_proxy: ProxyProcess, rx: Received,
                                   fake_upstream: FakeUpstream) -> None:
    sc = fake_upstream.scenario
    rid = new_request_id()
    with anthropic_client(traced_proxy.url, rid).messages.stream(
            model="claude-e2e", max_tokens=32,
            messages=[{"role": "user", "content": "hi"}]) as stream:
        assert "".join(stream.text_stream) == sc.text
    a = rx.wait_span(rid).attributes
    assert a["gen_ai.provider.name"] == "anthropic"
    # Anthropic's input_tokens excludes cache reads; the convention's count includes them.
    assert a["gen_ai.usage.input_tokens"] == sc.input_tokens + sc.cached_tokens
    rid = new_request_id()
    client = gemini_client(traced_proxy.url, rid, version="v1beta")
    assert client.models.generate_content(model="gemini-e2e", contents="hi").text == sc.text
    span = rx.wait_span(rid)
    assert span.name == "generate_content gemini-e2e"
    assert span.attributes["gen_ai.provider.name"] == "gcp.gemini"


def test_incoming_traceparent_is_the_parent(traced_proxy: ProxyProcess, rx: Received,
                                            fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    incoming = traceparent_for(PARENT_TRACE, PARENT_SPAN)
    openai_client(traced_proxy.url, rid).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}],
        extra_headers={"traceparent": incoming, "tracestate": "rojo=00f067aa0ba902b7"})
    span = rx.wait_span(rid)
    assert (span.trace_id, span.parent_span_id) == (PARENT_TRACE, PARENT_SPAN)
    rec = fake_upstream.last
    assert rec.header("traceparent") == traceparent_for(PARENT_TRACE, span.span_id)
    assert rec.header("tracestate") == "rojo=00f067aa0ba902b7"


def test_aborted_stream(traced_proxy: ProxyProcess, rx: Received,
                        fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    fake_upstream.script(fake_upstream.scripts.endless("openai"))
    stream = openai_client(traced_proxy.url, rid).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert next(iter(stream)).choices[0].delta.content == "t0 "
    stream.close()
    span = rx.wait_span(rid)
    a = span.attributes
    assert (a["llmproxy.outcome"], a["error.type"]) == ("client_aborted", "client_aborted")
    assert span.status_code == STATUS_ERROR
    assert "gen_ai.usage.input_tokens" not in a  # the stream ended before any usage


def test_upstream_error(traced_proxy: ProxyProcess, rx: Received,
                        fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    model = unique_model(fake_upstream)
    fake_upstream.script(error("openai", 500))
    with pytest.raises(openai.InternalServerError):
        openai_client(traced_proxy.url, rid).chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}])
    span = rx.wait_span(rid)
    assert span.status_code == STATUS_ERROR
    assert span.attributes["error.type"] == "500"
    assert rx.wait_histogram("gen_ai.client.operation.duration", 1, **{
        "gen_ai.request.model": model, "error.type": "500"})[0] == 1
    assert rx.histogram("gen_ai.client.token.usage", **{"gen_ai.request.model": model}) == (0, 0)


def test_anthropic_upstream_overloaded(traced_proxy: ProxyProcess, rx: Received,
                                       fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    fake_upstream.script(error("anthropic", 529, "Overloaded"))
    with pytest.raises(anthropic.APIStatusError):
        anthropic_client(traced_proxy.url, rid).messages.create(
            model="claude-e2e", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert rx.wait_span(rid).attributes["error.type"] == "529"


def test_rate_limited(traced_proxy: ProxyProcess, rx: Received,
                      fake_upstream: FakeUpstream) -> None:
    """One request a minute for this user, counted per worker: of three calls, at least
    one is refused."""
    outcomes: dict[str, int] = {}
    for _ in range(3):
        rid = new_request_id()
        try:
            openai_client(traced_proxy.url, rid).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}],
                extra_headers={"X-User-ID": LIMITED_USER})
            outcomes[rid] = 200
        except openai.RateLimitError:
            outcomes[rid] = 429
    assert 429 in outcomes.values(), outcomes
    for rid, status in outcomes.items():
        a = rx.wait_span(rid).attributes
        assert a["llmproxy.user"] == LIMITED_USER
        if status == 429:
            assert a["llmproxy.ratelimit.decision"] == "denied"
            assert a["llmproxy.ratelimit.policy"] == "user-requests-per-minute"
            assert (a["error.type"], a["http.response.status_code"]) == ("rate_limited", 429)
        else:
            assert a["llmproxy.ratelimit.decision"] == "allowed"
            assert "error.type" not in a


# -- gRPC, shutdown, a collector that does not answer ------------------------------------------

def test_grpc_export(start_proxy: ProxyFactory, receiver: OTLPReceiver,
                     fake_upstream: FakeUpstream) -> None:
    """OTLP/gRPC from gevent workers (gRPC on gevent's loop) reaches a real gRPC receiver."""
    proxy = start_proxy(workers=2, env={**FAST_EXPORT, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                                        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_url})
    rid = new_request_id()
    model = unique_model(fake_upstream)
    openai_client(proxy.url, rid).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}])
    rx = receiver.received
    assert rx.wait_span(rid).name == f"chat {model}"
    assert rx.wait_histogram("gen_ai.client.token.usage", 1, **{
        "gen_ai.request.model": model, "gen_ai.token.type": "input"})[0] == 1


def test_graceful_shutdown_flushes_running_stream(start_proxy: ProxyFactory,
                                                  receiver: OTLPReceiver,
                                                  fake_upstream: FakeUpstream) -> None:
    """Exports are a minute away; SIGTERM while a stream runs: the stream finishes, and its
    span and metrics leave the worker on its way out."""
    proxy = start_proxy(workers=2, env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "60000",
        "OTEL_METRIC_EXPORT_INTERVAL": "60000"})
    rid = new_request_id()
    model = unique_model(fake_upstream)
    fake_upstream.script(fake_upstream.scripts.paused(0.25))  # ~2 s of stream
    sc = fake_upstream.scenario
    text: list[str] = []
    client = openai_client(proxy.url, rid)

    def read_stream() -> None:
        for chunk in client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], stream=True):
            text.extend(c.delta.content or "" for c in chunk.choices)
        client.close()  # no idle keep-alive connection for the worker to wait out

    reader = threading.Thread(target=read_stream)
    reader.start()
    rec = fake_upstream.wait_for_requests(1)[0]
    assert rec.response_done.wait(0) is False
    proxy.terminate()
    reader.join(15)
    assert "".join(text) == sc.text  # the stream ran to its end after SIGTERM
    assert proxy.proc is not None
    proxy.proc.wait(15)
    rx = receiver.received
    # The process has exited: whatever it sent is already here.
    span = rx.wait_span(rid, timeout=1.0)
    assert span.attributes["llmproxy.outcome"] == "completed"
    assert rx.wait_histogram("gen_ai.client.operation.duration", 1, timeout=1.0,
                             **{"gen_ai.request.model": model})[0] == 1


def test_quick_shutdown_ends_running_stream(start_proxy: ProxyFactory, receiver: OTLPReceiver,
                                            fake_upstream: FakeUpstream) -> None:
    """SIGINT (gunicorn's quick shutdown) while a stream runs: the worker cuts the stream
    (outcome shutdown, as in its records), and its span still leaves the worker."""
    proxy = start_proxy(workers=1, env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "60000",
        "OTEL_METRIC_EXPORT_INTERVAL": "60000"})
    rid = new_request_id()
    fake_upstream.script(fake_upstream.scripts.endless("openai"))
    resp = requests.post(f"{proxy.url}/openai/v1/chat/completions", stream=True, timeout=10,
                         json={"model": "m", "stream": True, "messages": []},
                         headers={"Authorization": "Bearer sk-x", "X-Request-ID": rid})
    chunks = resp.iter_content(None)
    assert next(chunks)  # the stream is running
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGINT)
    proxy.proc.wait(15)
    resp.close()
    span = receiver.received.wait_span(rid, timeout=1.0)
    assert span.attributes["llmproxy.outcome"] == "shutdown"
    assert span.attributes["error.type"] == "shutdown"


class BlackHole:
    """A collector that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connected = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            self.connected.set()

    def close(self) -> None:
        self.sock.close()
        for conn in self._conns:
            conn.close()


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_collector_that_never_answers(start_proxy: ProxyFactory, fake_upstream: FakeUpstream,
                                      protocol: str) -> None:
    """While an export hangs on a dead collector, requests are served as usual (one worker,
    so that every request meets the hung export), and the failure is logged as a warning."""
    hole = BlackHole()
    try:
        proxy = start_proxy(workers=1, env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": hole.url, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_EXPORTER_OTLP_TIMEOUT": "5",
            "OTEL_METRIC_EXPORT_INTERVAL": "60000"})
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        url = proxy.url + "/openai/v1/chat/completions"
        auth = {"Authorization": "Bearer sk-x"}
        assert requests.post(url, json=body, headers=auth, timeout=10).status_code == 200
        assert hole.connected.wait(10), "the exporter never tried the collector"
        started = time.monotonic()
        slowest = 0.0
        while time.monotonic() - started < 2.0:  # inside the 5 s the export hangs for
            t0 = time.monotonic()
            assert requests.post(url, json=body, headers=auth, timeout=10).status_code == 200
            slowest = max(slowest, time.monotonic() - t0)
        # Blocked, a request would wait out the rest of the export's 5 s; served, it takes
        # milliseconds (the margin is for a busy machine).
        assert slowest < 1.5, f"a request took {slowest:.2f} s while the export hung"

        def export_warned() -> bool:
            return any(str(r.get("logger", "")).startswith("opentelemetry")
                       for r in proxy.json_lines())

        deadline = time.monotonic() + 15
        while not export_warned():  # the log is another process's file: poll it
            assert time.monotonic() < deadline, "no export warning in the log:\n" + \
                "\n".join(proxy.log_lines()[-20:])
            time.sleep(0.1)
    finally:
        hole.close()


def test_invalid_otel_variable_stops_startup() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LLMPROXY_"))}
    env.update(PORT=str(free_port()), WEB_CONCURRENCY="1",
               OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318",
               OTEL_EXPORTER_OTLP_PROTOCOL="http/json")
    proc = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "invalid config" in line]
    assert lines == ["llmproxy: invalid config: OTEL_EXPORTER_OTLP_PROTOCOL: must be one of "
                     "http/protobuf, grpc, got 'http/json'"]
