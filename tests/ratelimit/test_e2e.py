"""End to end: two gunicorn proxies (2 gevent workers each) sharing one real Redis.

Also the official SDKs against the limiter: typed 429 errors, and Retry-After honoured.
"""

from __future__ import annotations

import collections
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from flask import Flask
from services import RedisServer
from werkzeug.serving import make_server

from llmproxy.identity import fingerprint
from llmproxy.ratelimit import get_ratelimit

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

KEY = "sk-e2e-key-0001"
CHAT = "/openai/v1/chat/completions"


def redis_config(server: RedisServer, on_error: str = "closed", **settings: Any) -> dict[str, Any]:
    # on_error closed by default: a Redis hiccup must show up as a 503, never as an admission
    return {"features": {"rate_limiting": {
        "enabled": True, "backend": "redis",
        "redis": {"url": server.url, "timeout_ms": 1000, "on_error": on_error},
        **settings}}}


def chat(base: str, key: str = KEY, text: str = "hello", stream: bool = False) -> requests.Response:
    body: dict[str, Any] = {"model": "fake-model-1",
                            "messages": [{"role": "user", "content": text}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return requests.post(base + CHAT, json=body, headers={"Authorization": f"Bearer {key}"},
                         timeout=30)


Timed = tuple[requests.Response, float, float]


def burst(urls: list[str], count: int, **kwargs: Any) -> list[Timed]:
    """``count`` requests at once, spread over ``urls``; (response, sent, received) each."""
    go = threading.Event()

    def one(i: int) -> Timed:
        go.wait()
        sent = time.time()
        resp = chat(urls[i % len(urls)], **kwargs)
        return resp, sent, time.time()

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(one, i) for i in range(count)]
        go.set()
        return [f.result() for f in futures]


def widen_backlog(fake: Any) -> None:
    """Let the fake upstream queue a whole burst of connections (its default backlog is 5;
    overflowing it makes admitted requests fail upstream with 502 and be refunded)."""
    fake._server.socket.listen(1024)  # listen() again only changes the backlog


def counter_field(server: RedisServer, counter: str, name: str) -> bytes | None:
    """One field of a counter's hash: "o" (oldest bucket) or "t" (total)."""
    client = server.client()
    try:
        raw: bytes | None = client.hget(f"llmproxy:{{rl}}:{counter}", name)
        return raw
    finally:
        client.close()


def oldest_bucket(server: RedisServer, counter: str) -> int:
    raw = counter_field(server, counter, "o")
    assert raw is not None, f"no counter {counter} in Redis"
    return int(raw)


def test_two_instances_admit_exactly_the_request_limit(
        start_proxy: Callable[..., Any], redis_server: RedisServer, fake_upstream: Any) -> None:
    widen_backlog(fake_upstream)
    config = redis_config(redis_server, limits={"requests_per_minute": 50})
    proxies = [start_proxy(config, workers=2), start_proxy(config, workers=2)]
    results = burst([p.url for p in proxies], 200)
    statuses = [r.status_code for r, _, _ in results]
    assert statuses.count(200) == 50, sorted(collections.Counter(statuses).items())
    assert statuses.count(429) == 150, statuses
    # Retry-After: whole seconds until the oldest admitted request's bucket leaves the window
    # (the Redis clock is this machine's clock).
    free_at = oldest_bucket(redis_server, f"key:{fingerprint(KEY)}:requests:minute") + 61
    for resp, sent, received in results:
        if resp.status_code != 429:
            continue
        retry = int(resp.headers["Retry-After"])
        assert math.ceil(free_at - received) <= retry <= math.ceil(free_at - sent)
        assert 1 <= retry <= 61
        assert resp.json()["error"]["type"] == "rate_limit_error"


def test_two_instances_admit_no_more_tokens_than_the_limit(
        start_proxy: Callable[..., Any], redis_server: RedisServer, fake_upstream: Any) -> None:
    other_key = "sk-e2e-calibration"
    config = redis_config(redis_server, count_tokens="input", overrides={"per_key": {
        KEY: {"tokens_per_minute": 1000}, other_key: {"tokens_per_minute": 1000}}})
    proxies = [start_proxy(config, workers=2), start_proxy(config, workers=2)]
    text = "lorem ipsum " * 30
    probe = chat(proxies[0].url, other_key, text)
    estimate = 1000 - int(probe.headers["RateLimit"].split(";r=")[1].split(";")[0])
    assert 50 < estimate < 200
    # the upstream reports exactly the estimate, so reconciliation changes nothing mid-burst
    fake_upstream.scenario.input_tokens = estimate
    widen_backlog(fake_upstream)
    results = burst([p.url for p in proxies], 200, text=text)
    admitted = [r for r, _, _ in results if r.status_code == 200]
    refused = [r for r, _, _ in results if r.status_code == 429]
    assert len(admitted) + len(refused) == 200
    assert len(admitted) == 1000 // estimate  # as many as fit, not one more
    assert all(r.headers["X-RateLimit-Metric"] == "tokens" for r in refused)


def counter_total(server: RedisServer, counter: str) -> int:
    return int(counter_field(server, counter, "t") or 0)


def await_counter(server: RedisServer, counter: str, value: int, within: float) -> float:
    """Seconds until the counter's total became ``value`` (polled: the change happens in
    another process, with no event this test could wait on)."""
    started = time.monotonic()
    while counter_total(server, counter) != value:
        assert time.monotonic() - started < within, \
            f"{counter} is {counter_total(server, counter)}, not {value}, after {within} s"
        time.sleep(0.005)
    return time.monotonic() - started


@pytest.mark.parametrize("delay_ms", [0, 100])
def test_a_stream_is_charged_its_real_usage_across_instances(
        start_proxy: Callable[..., Any], redis_server: RedisServer, fake_upstream: Any,
        delay_ms: int) -> None:
    config = redis_config(redis_server, count_tokens="total",
                          overrides={"per_key": {KEY: {"tokens_per_minute": 100_000}}})
    config["features"]["rate_limiting"]["redis"]["reconcile_delay_ms"] = delay_ms
    a, b = start_proxy(config, workers=2), start_proxy(config, workers=2)
    fake_upstream.scenario.input_tokens = 3000
    fake_upstream.scenario.output_tokens = 500
    first = chat(a.url, stream=True)
    assert first.status_code == 200 and b"[DONE]" in first.content
    estimate = 100_000 - int(first.headers["RateLimit"].split(";r=")[1].split(";")[0])
    assert estimate < 100
    a.wait_record(first.headers["X-Proxy-Request-ID"])  # its terminal event has run
    counter = f"key:{fingerprint(KEY)}:tokens:minute"
    # Deferred (delay_ms > 0), the idle worker's timer sends the correction about delay_ms
    # after the terminal event; with 0 the terminal event sends it itself.
    await_counter(redis_server, counter, 3500, within=5.0)
    second = chat(b.url)
    remaining = int(second.headers["RateLimit"].split(";r=")[1].split(";")[0])
    assert remaining == 100_000 - 3500 - estimate


def test_queued_corrections_are_sent_when_a_worker_shuts_down(
        start_proxy: Callable[..., Any], redis_server: RedisServer, fake_upstream: Any) -> None:
    config = redis_config(redis_server, count_tokens="total",
                          overrides={"per_key": {KEY: {"tokens_per_minute": 100_000}}})
    # The longest delay allowed, far beyond this test: only the exit can send the correction.
    config["features"]["rate_limiting"]["redis"]["reconcile_delay_ms"] = 10_000
    proxy = start_proxy(config, workers=1)
    fake_upstream.scenario.input_tokens = 3000
    fake_upstream.scenario.output_tokens = 500
    # Connection: close, so that no idle keep-alive connection holds the worker's shutdown
    # for the keep-alive timeout (as an SDK's pooled connection would).
    resp = requests.post(proxy.url + CHAT, json={"model": "fake-model-1", "messages": []},
                         headers={"Authorization": f"Bearer {KEY}", "Connection": "close"},
                         timeout=30)
    assert resp.status_code == 200
    proxy.wait_record(resp.headers["X-Proxy-Request-ID"])
    counter = f"key:{fingerprint(KEY)}:tokens:minute"
    assert counter_total(redis_server, counter) < 100  # still the estimate
    proxy.stop()  # SIGTERM: graceful shutdown, then the worker exits
    assert proxy.proc is not None and proxy.proc.returncode == 0
    assert "Worker exiting" in proxy.log_text()  # it ended by itself, not by SIGKILL
    assert counter_total(redis_server, counter) == 3500


def test_a_stream_cut_at_shutdown_is_charged_what_it_used(
        start_proxy: Callable[..., Any], redis_server: RedisServer, fake_upstream: Any) -> None:
    """A stream still running when the graceful timeout ends is cut by the worker, and its
    correction (the input tokens the provider reported at the start) reaches Redis before
    the worker is gone, though corrections are held back for 10 s and an idle keep-alive
    connection keeps the worker from exiting by itself (the master kills it)."""
    config = redis_config(redis_server, count_tokens="total",
                          overrides={"per_key": {KEY: {"tokens_per_minute": 100_000}}})
    config["features"]["rate_limiting"]["redis"]["reconcile_delay_ms"] = 10_000
    proxy = start_proxy(config, workers=1, env={"GRACEFUL_TIMEOUT": "3", "KEEPALIVE": "30"})
    idle = requests.Session()
    assert idle.get(proxy.url + "/health", timeout=10).status_code == 200
    fake_upstream.scenario.input_tokens = 3000
    # message_start (with the input tokens), then nothing for a minute
    fake_upstream.script(fake_upstream.scripts.paused(60, after=[b"message_start"]))
    with requests.post(proxy.url + "/anthropic/v1/messages", stream=True, timeout=30,
                       json={"model": "fake-model-1", "max_tokens": 5, "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]},
                       headers={"x-api-key": KEY, "anthropic-version": "2023-06-01",
                                "Connection": "close"}) as resp:
        assert resp.status_code == 200
        chunks = resp.iter_content(chunk_size=None)
        assert b"message_start" in next(chunks)
        counter = f"key:{fingerprint(KEY)}:tokens:minute"
        assert counter_total(redis_server, counter) < 100  # the estimate
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGTERM)
        try:
            for _ in chunks:
                pass
        except requests.RequestException:  # the cut
            pass
    assert proxy.proc.wait(15) == 0
    idle.close()
    assert "Worker exiting" not in proxy.log_text()  # no exit handler of the worker ran
    assert counter_total(redis_server, counter) >= 3000
    [record] = proxy.records_for(resp.headers["X-Proxy-Request-ID"])
    assert record["outcome"] == "shutdown"


def test_redis_crash_follows_on_error_and_recovers(
        start_proxy: Callable[..., Any], redis_server: RedisServer) -> None:
    limits = {"limits": {"requests_per_minute": 2}}
    open_proxy = start_proxy(redis_config(redis_server, "open", **limits), workers=2)
    closed_proxy = start_proxy(redis_config(redis_server, "closed", **limits), workers=2)
    assert [chat(open_proxy.url).status_code for _ in range(3)] == [200, 200, 429]
    redis_server.kill()
    assert [chat(open_proxy.url).status_code for _ in range(4)] == [200] * 4
    refused = chat(closed_proxy.url)
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "server_error"
    redis_server.start()  # an empty Redis on the same port: no restart of the proxies
    statuses = [chat(url).status_code for url in (open_proxy.url, closed_proxy.url) * 2]
    assert statuses == [200, 200, 429, 429]


# -- the official SDKs ---------------------------------------------------------------------

class ServedApp:
    """The app on a real loopback HTTP server in this process, with a shiftable clock."""

    def __init__(self, app: Flask) -> None:
        self.offset = 0.0
        limiter = get_ratelimit(app)
        assert limiter is not None
        limiter.store.clock = lambda: time.monotonic() + self.offset  # type: ignore[attr-defined]
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def served(make_app: Callable[..., Flask]) -> Iterator[ServedApp]:
    app = make_app({"features": {"rate_limiting": {
        "enabled": True, "limits": {"requests_per_minute": 1}}}})
    served = ServedApp(app)
    yield served
    served.close()


def test_sdks_raise_their_typed_rate_limit_errors(served: ServedApp) -> None:
    import anthropic
    import openai
    from google import genai
    from google.genai import errors as genai_errors
    from google.genai import types as genai_types

    oa = openai.OpenAI(api_key=KEY, base_url=served.url + "/openai/v1", max_retries=0)
    oa.chat.completions.create(model="fake-model-1", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as oa_err:
        oa.chat.completions.create(model="fake-model-1",
                                   messages=[{"role": "user", "content": "hi"}])
    assert oa_err.value.status_code == 429
    assert int(oa_err.value.response.headers["retry-after"]) >= 1

    an = anthropic.Anthropic(api_key=KEY, base_url=served.url + "/anthropic", max_retries=0)
    with pytest.raises(anthropic.RateLimitError):
        an.messages.create(model="fake-model-1", max_tokens=10,
                           messages=[{"role": "user", "content": "hi"}])

    ge = genai.Client(api_key=KEY, http_options=genai_types.HttpOptions(
        base_url=served.url + "/gemini", retry_options=genai_types.HttpRetryOptions(attempts=1)))
    with pytest.raises(genai_errors.ClientError) as ge_err:
        ge.models.generate_content(model="gemini-pro", contents="hi")
    assert ge_err.value.code == 429
    assert ge_err.value.status == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_sdks_wait_for_retry_after_then_succeed(served: ServedApp, fake_upstream: Any,
                                                sdk: str) -> None:
    import anthropic
    import openai

    oa = openai.OpenAI(api_key=KEY, base_url=served.url + "/openai/v1", max_retries=2)
    an = anthropic.Anthropic(api_key=KEY, base_url=served.url + "/anthropic", max_retries=2)

    def call() -> None:
        if sdk == "openai":
            oa.chat.completions.create(model="fake-model-1",
                                       messages=[{"role": "user", "content": "hi"}])
        else:
            an.messages.create(model="fake-model-1", max_tokens=10,
                               messages=[{"role": "user", "content": "hi"}])

    def probe() -> requests.Response:
        resp = requests.post(served.url + CHAT, json={"model": "m", "messages": []},
                             headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert resp.status_code == 429
        return resp

    call()
    # Jump the limiter's clock to 1.5 s before the first request leaves the window.
    served.offset = int(probe().headers["Retry-After-Ms"]) / 1000 - 1.5
    refused = probe()
    wait = int(refused.headers["Retry-After-Ms"]) / 1000
    assert 1.0 <= wait <= 1.6 and refused.headers["Retry-After"] == "2"
    before = len(fake_upstream.requests)
    started = time.monotonic()
    call()  # refused, waits as told, retried, admitted
    elapsed = time.monotonic() - started
    assert wait - 0.3 <= elapsed < wait + 1.5
    assert len(fake_upstream.requests) == before + 1
