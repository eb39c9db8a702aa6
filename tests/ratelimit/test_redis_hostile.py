"""The Redis limiter under load, through one real gunicorn worker and a real redis-server.

A Redis call that fails is let through unlimited with ``on_error: open``: anything that makes
calls fail under load (a pool too small for the worker's concurrency, a timeout that fires
because the worker was busy rather than Redis slow) turns a flood into unlimited traffic.
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from conftest import REPO_ROOT, free_port

from .conftest import RedisServer
from .flood import flood

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

KEY = "sk-load-key-0001"
CHAT = "/openai/v1/chat/completions"
CONCURRENT = 1000
LIMIT = 50


def chat_request(port: int, key: str = KEY) -> bytes:
    body = json.dumps({"model": "fake-model-1",
                       "messages": [{"role": "user", "content": "hello"}]}).encode()
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def limited_config(server: RedisServer, limit: str = "requests_per_minute") -> dict[str, Any]:
    """on_error: open and the default 50 ms timeout: every Redis failure is an admission."""
    return {"features": {"rate_limiting": {
        "enabled": True, "backend": "redis",
        "redis": {"url": server.url, "on_error": "open"},
        "scope_limits": {"key": {limit: LIMIT}}}}}


def widen_backlog(fake: Any) -> None:
    fake._server.socket.listen(1024)  # the admitted calls arrive at once


def backend_errors(log: str) -> int:
    return log.count("rate-limit backend unavailable")


def test_a_thousand_concurrent_calls_admit_exactly_the_limit(
        start_proxy: Callable[..., Any], redis_server: RedisServer, fake_upstream: Any) -> None:
    widen_backlog(fake_upstream)
    proxy = start_proxy(limited_config(redis_server), workers=1)
    statuses = flood(proxy.port, [chat_request(proxy.port)] * CONCURRENT)
    counts = collections.Counter(statuses)
    assert counts[200] == LIMIT, sorted(counts.items(), key=str)
    assert counts[429] == CONCURRENT - LIMIT, sorted(counts.items(), key=str)
    assert backend_errors(proxy.log_text()) == 0


class LatencyProbe:
    """PINGs Redis from its own connection while the flood runs: Redis's latency as any
    client sees it (what ``redis-cli --latency`` measures)."""

    def __init__(self, server: RedisServer) -> None:
        self.client = server.client()
        self.samples: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            self.client.ping()
            self.samples.append((time.perf_counter() - started) * 1000)
            self.stop.wait(0.001)

    def __enter__(self) -> LatencyProbe:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.client.close()


def script_stats(server: RedisServer) -> tuple[int, float]:
    """(calls, microseconds per call) of EVALSHA since the last CONFIG RESETSTAT."""
    client = server.client()
    try:
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
    finally:
        client.close()
    return int(stats.get("calls", 0)), float(stats.get("usec_per_call", 0.0))


def test_a_flood_of_denied_calls_stays_denied_and_cheap(
        start_proxy: Callable[..., Any], redis_server: RedisServer, fake_upstream: Any,
        record_property: Callable[[str, object], None]) -> None:
    """Once the key is exhausted, waves of denied calls: every one is a 429 (none is let
    through by a timeout), and Redis stays fast. The figures are reported, not asserted:
    a timing assertion would fail on a loaded machine."""
    widen_backlog(fake_upstream)
    # A day limit: the waves may take longer than a minute on a busy machine, and a minute
    # limit would then admit again.
    proxy = start_proxy(limited_config(redis_server, "requests_per_day"), workers=1)
    for _ in range(LIMIT):
        assert requests.post(proxy.url + CHAT, json={"model": "m", "messages": []},
                             headers={"Authorization": f"Bearer {KEY}"},
                             timeout=10).status_code == 200
    client = redis_server.client()
    client.config_resetstat()
    client.close()
    waves = 2
    started = time.perf_counter()
    with LatencyProbe(redis_server) as probe:
        statuses = [s for _ in range(waves)
                    for s in flood(proxy.port, [chat_request(proxy.port)] * CONCURRENT)]
    elapsed = time.perf_counter() - started
    counts = collections.Counter(statuses)
    assert counts[429] == waves * CONCURRENT, sorted(counts.items(), key=str)
    assert backend_errors(proxy.log_text()) == 0
    calls, usec = script_stats(redis_server)
    samples = sorted(probe.samples)
    figures = {
        "denied_per_second": round(waves * CONCURRENT / elapsed),
        "script_calls": calls,
        "script_usec_per_call": usec,
        "ping_ms_median": round(statistics.median(samples), 3),
        "ping_ms_p99": round(samples[int(len(samples) * 0.99) - 1], 3),
        "ping_ms_max": round(samples[-1], 3),
        "ping_samples": len(samples),
    }
    record_property("redis_under_denial_flood", figures)
    print("redis under a denial flood:", figures)


def test_readiness_follows_on_error_when_redis_goes_down(
        start_proxy: Callable[..., Any], redis_server: RedisServer) -> None:
    """Ready means "can serve": open serves (unlimited) through an outage, closed does not."""
    proxies = {on_error: start_proxy({"features": {"rate_limiting": {
        "enabled": True, "backend": "redis",
        "redis": {"url": redis_server.url, "on_error": on_error},
        "scope_limits": {"key": {"requests_per_minute": 1000}}}}}, workers=1)
        for on_error in ("open", "closed")}
    for proxy in proxies.values():
        assert requests.get(proxy.url + "/health/ready", timeout=5).status_code == 200
    redis_server.kill()
    for on_error, proxy in proxies.items():
        resp = requests.get(proxy.url + "/health/ready", timeout=5)
        check = resp.json()["checks"]["ratelimit_backend"]
        assert check["available"] is False and check["on_error"] == on_error
        assert resp.status_code == (200 if on_error == "open" else 503), resp.text
        call = requests.post(proxy.url + CHAT, json={"model": "m", "messages": []},
                             headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert call.status_code == (200 if on_error == "open" else 503)
    redis_server.start()
    for proxy in proxies.values():
        resp = requests.get(proxy.url + "/health/ready", timeout=5)
        assert resp.status_code == 200 and \
            resp.json()["checks"]["ratelimit_backend"]["available"] is True


@pytest.mark.parametrize(("where", "url", "problem"), [
    ("file", "redis://:s3cret-pw@127.0.0.1:notaport/0",
     "Port could not be cast to integer value as 'notaport'"),
    ("env", "redis://:s3cret-pw@127.0.0.1:6379/zero", "the path after the host must be a "
                                                    "database number"),
    ("file", "redis://:s3cret-pw@[::1/0", "Invalid IPv6 URL"),
    ("env", "redis://:s3cret-pw@127.0.0.1:6379/0?tiemout=1",
     "AbstractConnection.__init__() got an unexpected keyword argument 'tiemout'"),
])
def test_malformed_redis_url_stops_startup_with_one_line(tmp_path: Any, where: str, url: str,
                                                          problem: str) -> None:
    """One line naming the setting (the variable, when it came from the environment), the
    parser's complaint, no traceback, and never the password."""
    config = {"features": {"rate_limiting": {"enabled": True, "backend": "redis",
                                             "redis": {"url": url}}}}
    path = tmp_path / "bad.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPROXY_")}
    env.update(PORT=str(free_port()), WEB_CONCURRENCY="1", LLMPROXY_CONFIG=str(path))
    if where == "env":
        env["LLMPROXY_REDIS_URL"] = url
    proc = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    key = "LLMPROXY_REDIS_URL" if where == "env" else "features.rate_limiting.redis.url"
    lines = [line for line in proc.stderr.splitlines() if "invalid config" in line]
    assert lines == [f"llmproxy: invalid config: {key}: not a valid Redis URL ({problem})"]
    assert "Traceback" not in proc.stderr
    assert "s3cret-pw" not in proc.stderr + proc.stdout
