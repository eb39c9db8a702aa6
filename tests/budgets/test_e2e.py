"""Budgets end to end: real gunicorn (gevent workers), real Redis, real SQLite and PostgreSQL,
the official SDKs.

Prices are chosen so that the arithmetic is exact: input tokens are free and every call asks
for (and gets) exactly ``OUTPUT`` output tokens, so a call's hold is its real cost and a budget
of ``ADMITTED`` calls admits exactly that many, however many arrive at once.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote

import anthropic
import httpx2
import openai
import pytest
import requests
from conftest import ProxyFactory, ProxyProcess, new_request_id
from e2e.sdk import anthropic_client, gemini_client, openai_client
from fake_upstream import FakeUpstream
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from services import RedisServer

from llmproxy.keys.store import KeyStore

pytestmark = pytest.mark.e2e

MODEL = "fake-model-1"
OUTPUT = 5  # the fake upstream's output tokens
PRICE_OUT = 1000.0  # USD per million output tokens: a call costs USD 0.005
CALL_NANOS = OUTPUT * int(PRICE_OUT * 1000)  # 5,000,000
ADMITTED = 20
BUDGET = ADMITTED * CALL_NANOS / 1e9  # USD 0.10
ADMIN = "admin-token-for-budget-tests"
SERVER_KEYS = {"OPENAI_API_KEY": "sk-server-openai", "ANTHROPIC_API_KEY": "sk-ant-server",
               "GEMINI_API_KEY": "AIza-server-gemini", "GROQ_API_KEY": "gsk-server-groq"}
FLUSH = 0.2  # budgets.ledger_flush_seconds in these tests


def config(database_url: str, redis: RedisServer | None = None, **budgets: Any
           ) -> dict[str, Any]:
    free_in = {"input": 0.0, "output": PRICE_OUT, "cached_input": 0.0, "cache_write": 0.0}
    rate_limiting: dict[str, Any] = {"backend": "memory"}
    if redis is not None:
        rate_limiting = {"backend": "redis", "redis": {"url": redis.url, "timeout_ms": 2000}}
    return {
        "auth": {"mode": "keys", "database_url": database_url, "admin_token": ADMIN,
                 "key_cache_seconds": 1},
        "budgets": {"enabled": True, "ledger_flush_seconds": FLUSH, "refresh_seconds": 0.5,
                    **budgets},
        "features": {"rate_limiting": rate_limiting},
        "pricing": {p: {"models": {MODEL: free_in}} for p in ("openai", "anthropic", "gemini")},
    }


def admin(proxy: ProxyProcess, method: str, path: str, body: Any = None) -> Any:
    resp = requests.request(method, f"{proxy.url}/admin{path}", json=body, timeout=10,
                            headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status_code < 300, resp.text
    return resp.json()


def until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll another process's state until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def spend_total(proxy: ProxyProcess, key_id: str) -> float:
    return float(admin(proxy, "GET", f"/keys/{key_id}")["spend"]["total"])


def chat(client: openai.OpenAI, stream: bool) -> tuple[int, dict[str, str]]:
    """One chat call: (status, headers); a refusal's status and headers come from the error."""
    try:
        if stream:
            with client.chat.completions.with_streaming_response.create(
                    model=MODEL, max_tokens=OUTPUT, stream=True,
                    stream_options={"include_usage": True},
                    messages=[{"role": "user", "content": "hi"}]) as resp:
                for _ in resp.iter_lines():
                    pass
                return resp.status_code, dict(resp.headers)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=OUTPUT, messages=[{"role": "user", "content": "hi"}])
        raw.parse()
        return raw.status_code, dict(raw.headers)
    except openai.APIStatusError as exc:
        return exc.status_code, dict(exc.response.headers) | {"body": json.dumps(exc.body)}


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_burst_of_200_calls_across_two_instances_never_overspends(
        database: str, start_proxy: ProxyFactory, fake_upstream: FakeUpstream,
        redis_server: RedisServer, tmp_path: Any, request: pytest.FixtureRequest) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}" if database == "sqlite" \
        else request.getfixturevalue("postgres_url")
    cfg = config(url, redis_server)
    pair = [start_proxy(config=cfg, workers=2, env=SERVER_KEYS) for _ in range(2)]
    created = admin(pair[0], "POST", "/keys", {"name": "burst", "user": "u1", "team": "t1",
                                               "budgets": {"day": BUDGET}})
    key_id, secret = created["id"], created["key"]
    clients = [openai_client(p.url, new_request_id(), api_key=secret) for p in pair]
    start = threading.Barrier(200)

    def one(n: int) -> tuple[int, dict[str, str]]:
        start.wait()
        return chat(clients[n % 2], stream=n % 4 >= 2)  # half of each instance's are streams

    with ThreadPoolExecutor(200) as pool:
        results = list(pool.map(one, range(200)))
    statuses = [s for s, _ in results]
    assert statuses.count(200) == ADMITTED, sorted(set(statuses))
    assert statuses.count(429) == 200 - ADMITTED
    refused = [h for s, h in results if s == 429]
    assert all(h["x-should-retry"] == "false" for h in refused)
    assert all(h["x-budget-scope"] == f"key:{key_id}" and h["x-budget-window"] == "day"
               for h in refused)
    assert all(json.loads(h["body"])["code"] == "insufficient_quota" for h in refused)
    allowed = [h for s, h in results if s == 200]
    assert all(float(h["x-budget-limit-usd"]) == BUDGET for h in allowed)
    # the upstream saw exactly the admitted calls, and reported their usage
    assert len([r for r in fake_upstream.requests if "chat/completions" in r.target]) \
        == ADMITTED
    expected = ADMITTED * CALL_NANOS / 1e9
    until(lambda: abs(spend_total(pair[1], key_id) - expected) < 1e-9)
    assert spend_total(pair[0], key_id) <= BUDGET
    rows = admin(pair[0], "GET", "/spend?group_by=key")["rows"]
    assert [(r["key"], r["requests"], r["output_tokens"]) for r in rows] == [
        (key_id, ADMITTED, ADMITTED * OUTPUT)]
    assert abs(rows[0]["cost_usd"] - expected) < 1e-9


def test_each_sdk_gets_its_quota_error_and_does_not_retry(
        start_proxy: ProxyFactory, fake_upstream: FakeUpstream, tmp_path: Any) -> None:
    proxy = start_proxy(config=config(f"sqlite:///{tmp_path / 'k.db'}"), workers=1,
                        env=SERVER_KEYS)
    created = admin(proxy, "POST", "/keys", {"name": "tiny", "budgets": {"total": 0.000001}})
    secret = created["key"]
    sent: list[str] = []
    hooks = {"request": [lambda r: sent.append(str(r.url))]}
    # the SDKs' default retries are on: x-should-retry: false must stop them
    oa = openai.OpenAI(api_key=secret, base_url=f"{proxy.url}/openai/v1",
                       http_client=httpx2.Client(event_hooks=hooks))
    with pytest.raises(openai.RateLimitError) as oa_err:
        oa.chat.completions.create(model=MODEL, max_tokens=OUTPUT, messages=[])
    assert oa_err.value.code == "insufficient_quota"
    assert oa_err.value.type == "insufficient_quota"
    assert "Retry-After" not in oa_err.value.response.headers  # a total never resets
    an = anthropic.Anthropic(api_key=secret, base_url=f"{proxy.url}/anthropic",
                             http_client=httpx2.Client(event_hooks=hooks))
    with pytest.raises(anthropic.RateLimitError) as an_err:
        an.messages.create(model=MODEL, max_tokens=OUTPUT,
                           messages=[{"role": "user", "content": "x"}])
    assert "Budget exceeded" in str(an_err.value)
    assert len(sent) == 2, sent  # one request each: no retry
    gem = gemini_client(proxy.url, new_request_id(), api_key=secret)
    with pytest.raises(genai_errors.ClientError) as ge:
        gem.models.generate_content(
            model=MODEL, contents="x",
            config=genai_types.GenerateContentConfig(max_output_tokens=OUTPUT))
    assert ge.value.code == 429 and ge.value.status == "RESOURCE_EXHAUSTED"
    assert fake_upstream.requests == []


def test_user_and_team_budgets_and_headers_on_allowed_calls(
        start_proxy: ProxyFactory, fake_upstream: FakeUpstream, tmp_path: Any) -> None:
    proxy = start_proxy(config=config(f"sqlite:///{tmp_path / 'k.db'}"), workers=1,
                        env=SERVER_KEYS)
    admin(proxy, "PUT", "/budgets/team:red", {"day": 1.0, "month": 3 * CALL_NANOS / 1e9})
    admin(proxy, "PUT", "/budgets/user:ann", {"total": 10.0})
    secret = admin(proxy, "POST", "/keys", {"name": "k", "user": "ann", "team": "red"})["key"]
    client = anthropic_client(proxy.url, new_request_id(), api_key=secret)

    def call() -> Any:
        return client.messages.with_raw_response.create(
            model=MODEL, max_tokens=OUTPUT, messages=[{"role": "user", "content": "x"}])

    first = call()
    assert first.headers["x-budget-scope"] == "team:red"
    assert first.headers["x-budget-window"] == "month"
    assert float(first.headers["x-budget-remaining-usd"]) == pytest.approx(
        2 * CALL_NANOS / 1e9)
    call()
    call()
    with pytest.raises(anthropic.RateLimitError) as err:
        call()
    headers = err.value.response.headers
    assert headers["x-budget-scope"] == "team:red" and headers["x-budget-window"] == "month"
    assert int(headers["retry-after"]) > 0
    assert float(headers["x-budget-remaining-usd"]) == 0.0


def test_names_beyond_ascii_reach_the_headers_encoded(
        start_proxy: ProxyFactory, fake_upstream: FakeUpstream, tmp_path: Any) -> None:
    """A user or team named in any script: the answer still goes out (a header value may
    carry printable ASCII only, and a server refuses the whole answer otherwise), with the
    name percent-encoded, and the call is settled."""
    cfg = config(f"sqlite:///{tmp_path / 'k.db'}")
    cfg["features"]["rate_limiting"] |= {
        "enabled": True, "overrides": {"per_user": {"研究": {"requests_per_minute": 1}}}}
    proxy = start_proxy(config=cfg, workers=1, env=SERVER_KEYS)
    admin(proxy, "PUT", "/budgets/team:研究 ml%", {"month": 2 * CALL_NANOS / 1e9})
    made = admin(proxy, "POST", "/keys", {"name": "k", "user": "Łukasz", "team": "研究 ml%"})
    client = openai_client(proxy.url, new_request_id(), api_key=made["key"])
    encoded = "team:%E7%A0%94%E7%A9%B6 ml%25"
    status, headers = chat(client, stream=False)
    assert status == 200 and headers["x-budget-scope"] == encoded
    assert unquote(headers["x-budget-scope"]) == "team:研究 ml%"
    status, headers = chat(client, stream=True)
    assert status == 200 and headers["x-budget-scope"] == encoded
    status, headers = chat(client, stream=False)
    assert status == 429 and headers["x-budget-scope"] == encoded
    assert "insufficient_quota" in headers["body"]
    until(lambda: spend_total(proxy, made["id"]) == pytest.approx(2 * CALL_NANOS / 1e9))

    # a rate limit on a user the request names: its scope is in the refusal's headers too
    mixed = start_proxy(config=cfg | {"auth": cfg["auth"] | {"mode": "mixed"}}, workers=1,
                        env=SERVER_KEYS)
    own = openai_client(mixed.url, new_request_id(), api_key="sk-callers-own")
    own.chat.completions.create(model=MODEL, user="研究", messages=[])
    with pytest.raises(openai.RateLimitError) as err:
        own.chat.completions.create(model=MODEL, user="研究", messages=[])
    scope = err.value.response.headers["x-ratelimit-scope"]
    assert scope.isascii() and "研究" in unquote(scope)
    assert "研究" in unquote(err.value.response.headers["x-ratelimit-reason"])


def test_unpriced_models_are_refused_under_a_budget(
        start_proxy: ProxyFactory, fake_upstream: FakeUpstream, tmp_path: Any) -> None:
    proxy = start_proxy(config=config(f"sqlite:///{tmp_path / 'k.db'}"), workers=1,
                        env=SERVER_KEYS)
    secret = admin(proxy, "POST", "/keys", {"name": "k", "budgets": {"day": 1.0}})["key"]
    client = openai_client(proxy.url, new_request_id(), api_key=secret)
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model="no-such-model", messages=[])
    assert "no price" in str(err.value)
    unbudgeted = admin(proxy, "POST", "/keys", {"name": "free"})["key"]
    ok = openai_client(proxy.url, new_request_id(), api_key=unbudgeted)
    assert ok.chat.completions.create(model="no-such-model", messages=[]).choices


@pytest.mark.parametrize("restart", ["redis", "proxy"])
def test_spend_survives_a_restart(restart: str, start_proxy: ProxyFactory,
                                  fake_upstream: FakeUpstream, redis_server: RedisServer,
                                  tmp_path: Any) -> None:
    """Spend a budget, restart Redis (counters gone) or the proxy (memory backend): the
    counters are rebuilt from the ledger and the budget still holds."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    cfg = config(url, redis_server if restart == "redis" else None)
    proxy = start_proxy(config=cfg, workers=1, env=SERVER_KEYS)
    created = admin(proxy, "POST", "/keys", {"name": "k", "budgets": {"month": 3 * CALL_NANOS
                                                                      / 1e9}})
    key_id, secret = created["id"], created["key"]
    client = openai_client(proxy.url, new_request_id(), api_key=secret)
    assert [chat(client, stream=False)[0] for _ in range(2)] == [200, 200]
    until(lambda: spend_total(proxy, key_id) == pytest.approx(2 * CALL_NANOS / 1e9))
    if restart == "redis":
        redis_server.kill()
        redis_server.start()
        assert redis_server.client().dbsize() == 0
    else:
        proxy.stop()
        proxy = start_proxy(config=cfg, workers=1, env=SERVER_KEYS)
        client = openai_client(proxy.url, new_request_id(), api_key=secret)
    # one call's room is left, not three
    assert [chat(client, stream=True)[0] for _ in range(2)] == [200, 429]
    until(lambda: spend_total(proxy, key_id) == pytest.approx(3 * CALL_NANOS / 1e9))


def test_the_ledger_is_flushed_on_graceful_shutdown(
        start_proxy: ProxyFactory, fake_upstream: FakeUpstream, tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    cfg = config(url, ledger_flush_seconds=3600)  # only the shutdown writes it
    proxy = start_proxy(config=cfg, workers=1, env=SERVER_KEYS)
    created = admin(proxy, "POST", "/keys", {"name": "k", "budgets": {"day": 1.0}})
    client = openai_client(proxy.url, new_request_id(), api_key=created["key"])
    assert chat(client, stream=False)[0] == 200
    proxy.stop()
    store = KeyStore.from_url(url)
    try:
        assert store.spent("key", created["id"], None) == CALL_NANOS
    finally:
        store.close()



def test_a_stream_cut_by_shutdown_is_settled_and_written(
        start_proxy: ProxyFactory, fake_upstream: FakeUpstream, redis_server: RedisServer,
        tmp_path: Any) -> None:
    """A stream outliving the graceful timeout is cut by its worker: its hold is replaced by
    what it relayed, in Redis and in the ledger, before the worker is gone."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    cfg = config(url, redis_server, ledger_flush_seconds=3600)  # only the shutdown writes
    cfg["features"]["rate_limiting"]["redis"]["reconcile_delay_ms"] = 10_000  # held back too
    proxy = start_proxy(config=cfg, workers=1, env={**SERVER_KEYS, "GRACEFUL_TIMEOUT": "3"})
    created = admin(proxy, "POST", "/keys", {"name": "k", "budgets": {"day": 1.0}})
    fake_upstream.script(fake_upstream.scripts.endless("openai", interval=0.02, count=100_000))
    assert proxy.proc is not None
    with requests.post(f"{proxy.url}/openai/v1/chat/completions", stream=True, timeout=30,
                       headers={"Authorization": f"Bearer {created['key']}",
                                "Connection": "close"},
                       json={"model": MODEL, "stream": True, "max_tokens": 500,
                             "messages": []}) as resp:
        assert resp.status_code == 200
        chunks = resp.iter_content(chunk_size=None)
        next(chunks)
        proxy.proc.send_signal(signal.SIGTERM)
        try:
            for _ in chunks:
                pass
        except requests.RequestException:  # the cut: a chunked body that never ends
            pass
    assert proxy.proc.wait(20) == 0
    store = KeyStore.from_url(url)
    try:
        spent = store.spent("key", created["id"], None)
    finally:
        store.close()
    assert spent > 0  # the relayed output, estimated from its text
    day = time.strftime("%Y%m%d", time.gmtime())
    client = redis_server.client()
    try:
        settled, held = client.hmget(f"llmproxy:{{rl}}:budget:key:{created['id']}:day:{day}",
                                     "s", "h")
    finally:
        client.close()
    assert (int(settled), int(held)) == (spent, 0)


def test_a_database_outage_queues_the_ledger_and_loses_nothing(
        start_proxy: ProxyFactory, fake_upstream: FakeUpstream, redis_server: RedisServer,
        request: pytest.FixtureRequest) -> None:
    """PostgreSQL stops: calls go on (key cached, counters in Redis) and their spend waits in
    the worker; once the database is back it is all written, exactly once."""
    url = request.getfixturevalue("postgres_url")
    postgres = request.getfixturevalue("postgres")
    proxy = start_proxy(config=config(url, redis_server), workers=1, env=SERVER_KEYS)
    created = admin(proxy, "POST", "/keys", {"name": "k", "budgets": {"day": 1.0}})
    key_id, secret = created["id"], created["key"]
    client = openai_client(proxy.url, new_request_id(), api_key=secret)
    assert [chat(client, stream=n == 1)[0] for n in range(2)] == [200, 200]
    until(lambda: spend_total(proxy, key_id) == pytest.approx(2 * CALL_NANOS / 1e9))
    postgres.stop()
    assert [chat(client, stream=n == 1)[0] for n in range(3)] == [200, 200, 200]
    time.sleep(3 * FLUSH)  # let several flushes fail: the rows must stay queued, not repeat
    postgres.start()
    until(lambda: spend_total(proxy, key_id) == pytest.approx(5 * CALL_NANOS / 1e9))
    time.sleep(3 * FLUSH)  # and not be written twice by the flushes that follow
    assert spend_total(proxy, key_id) == pytest.approx(5 * CALL_NANOS / 1e9)
