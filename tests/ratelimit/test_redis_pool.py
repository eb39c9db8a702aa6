"""The Redis client's pool and timeouts: sized to the worker, patient with replies that
arrived, and its settings checked at start-up."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from llmproxy.config import ConfigError
from llmproxy.config import parse_ratelimit as parse
from llmproxy.identity import fingerprint
from llmproxy.ratelimit.redis import _PatientSocket, connect
from llmproxy.socketpoll import connected_now

from .conftest import RedisServer


def redis_settings(environ: dict[str, str], **redis_: Any) -> Any:
    return parse({"features": {"rate_limiting": {"backend": "redis", "redis": redis_}}},
                 environ=environ).redis


def test_pool_size_follows_the_workers_connections() -> None:
    assert redis_settings({}).max_connections == 4096 + 1  # gunicorn.conf.py's default
    assert redis_settings({"WORKER_CONNECTIONS": "250"}).max_connections == 251
    assert redis_settings({"WORKER_CONNECTIONS": "250"}, max_connections=40) \
        .max_connections == 40


@pytest.mark.parametrize(("environ", "setting", "key"), [
    ({"WORKER_CONNECTIONS": "many"}, {}, "WORKER_CONNECTIONS"),
    ({"WORKER_CONNECTIONS": "0"}, {}, "WORKER_CONNECTIONS"),
    ({}, {"max_connections": 0}, "features.rate_limiting.redis.max_connections"),
    ({}, {"max_connections": "10"}, "features.rate_limiting.redis.max_connections"),
    ({}, {"url": "redis://h:port/0"}, "features.rate_limiting.redis.url"),
    ({"LLMPROXY_REDIS_URL": "redis://h/db1"}, {}, "LLMPROXY_REDIS_URL"),
    ({}, {"url": "unix://"}, "features.rate_limiting.redis.url"),
    ({}, {"url": "redis://h/0?socket_timeout=soon"}, "features.rate_limiting.redis.url"),
])
def test_bad_pool_and_url_settings_name_their_key(environ: dict[str, str],
                                                   setting: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        redis_settings(environ, **setting)
    assert err.value.key == key


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "redis://:pw@h:1/2",
                                 "rediss://h/0?ssl_cert_reqs=none", "redis://h/?db=3",
                                 "unix:///run/redis.sock?db=1", "redis://h"])
def test_good_urls_pass(url: str) -> None:
    assert redis_settings({}, url=url).url == url


def test_a_password_never_reaches_the_message() -> None:
    with pytest.raises(ConfigError) as err:
        redis_settings({}, url="redis://:hunter2-secret@h:hunter2-secret/0")
    assert "hunter2" not in str(err.value)


def test_the_client_uses_a_blocking_pool_of_that_size(redis_server: RedisServer) -> None:
    client = connect(redis_server.url, 200, max_connections=3)
    try:
        pool = client.connection_pool
        assert isinstance(pool, redis.BlockingConnectionPool)
        assert (pool.max_connections, pool.timeout) == (3, 0.2)
        assert client.ping()
    finally:
        client.close()


class _LateTimer:
    """A socket whose first wait "times out" although the data is there: what a busy gevent
    worker does when it resumes a greenlet after its timer expired."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fired = False

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if not self.fired:
            self.fired = True
            raise TimeoutError("timed out")
        return self.sock.recv_into(buffer, nbytes, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if not self.fired:
            self.fired = True
            raise TimeoutError("timed out")
        return self.sock.recv(bufsize, flags)

    def fileno(self) -> int:
        return self.sock.fileno()


def test_a_reply_that_arrived_is_read_not_timed_out() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"+PONG\r\n")
        buf = bytearray(64)
        assert _PatientSocket(_LateTimer(a)).recv_into(buf) == 7
        b.sendall(b"+OK\r\n")
        assert _PatientSocket(_LateTimer(a)).recv(64) == b"+OK\r\n"


def test_no_reply_is_still_a_timeout() -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(TimeoutError):
            _PatientSocket(_LateTimer(a)).recv_into(bytearray(64))


# -- a reply later than the timeout ----------------------------------------------------------

KEY = "sk-late-reply-01"


def counter(server: RedisServer, metric: str) -> int:
    client = server.client()
    try:
        raw = client.hget(f"llmproxy:{{rl}}:key:{fingerprint(KEY)}:{metric}:minute", "t")
    finally:
        client.close()
    return int(raw or 0)


def await_counters(server: RedisServer, requests_: int, tokens: int) -> None:
    """Polled: the late reply is handled by another thread, with no event to wait on."""
    deadline = time.monotonic() + 10
    while (counter(server, "requests"), counter(server, "tokens")) != (requests_, tokens):
        assert time.monotonic() < deadline, (counter(server, "requests"),
                                             counter(server, "tokens"), requests_, tokens)
        time.sleep(0.01)


@pytest.mark.parametrize("on_error", ["open", "closed"])
def test_a_reservation_answered_after_the_timeout_is_not_left_behind(
        make_app: Callable[..., Any], redis_server: RedisServer, fake_upstream: Any,
        on_error: str) -> None:
    """Redis runs the script, but later than the call's timeout (a busy or paused server):
    refused (closed), the request must not stay charged; let through (open), it is charged
    its real usage like any other, not left at its estimate or uncounted."""
    app = make_app({"features": {"rate_limiting": {
        "enabled": True, "backend": "redis",
        "redis": {"url": redis_server.url, "timeout_ms": 50, "on_error": on_error,
                  "reconcile_delay_ms": 0},
        "scope_limits": {"key": {"requests_per_minute": 100, "tokens_per_minute": 10**6}}}}})
    client = app.test_client()
    real = fake_upstream.scenario.total_tokens

    def call() -> Any:
        resp = client.post("/openai/v1/chat/completions", headers={
            "Authorization": f"Bearer {KEY}"}, json={"model": "m", "messages": [
                {"role": "user", "content": "hi"}]})
        resp.close()  # the terminal event (and its reconciliation) fires on close
        return resp

    assert call().status_code == 200  # scripts loaded, a connection pooled
    pauser = redis_server.client()
    try:
        # Redis holds scripts (they write) for 400 ms, then runs them: later than 50 ms.
        assert pauser.client_pause(400, all=False)
        resp = call()
    finally:
        pauser.close()
    assert "RateLimit" not in resp.headers  # the reservation timed out
    if on_error == "closed":
        assert resp.status_code == 503
        await_counters(redis_server, 1, real)
    else:
        assert resp.status_code == 200
        await_counters(redis_server, 2, 2 * real)


def test_connected_now_tells_a_made_connection_from_a_refused_one() -> None:
    """What a connect whose timer fired first is judged by (see _PatientConnect)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = listener.getsockname()
        with socket.socket() as sock:
            sock.setblocking(False)
            sock.connect_ex(address)
            conn, _ = listener.accept()  # the handshake completed
            with conn:
                assert connected_now(sock)
    with socket.socket() as sock:  # nothing listens there now
        sock.setblocking(False)
        sock.connect_ex(address)
        select.select([], [sock], [], 5)  # until the refusal arrives
        assert not connected_now(sock)
