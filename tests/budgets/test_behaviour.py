"""Budgets inside the real app (in-process Flask client, fake upstream, real Redis, SQLite):
what a call that fails, is cut short or outlives its Redis timeout leaves on its budget."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from services import RedisServer

from llmproxy.budgets.model import Budget
from llmproxy.keys.store import KeyStore
from llmproxy.observe import metrics

MODEL = "priced-model"
PRICE_IN, PRICE_OUT = 100.0, 1000.0  # USD per million tokens
USER = "alice"
# The ledger writer's thread outlives the test: an hour between flushes keeps it asleep
# (its work would show in other tests' allocation counts, tests/workmeter.py).
QUIET_BUDGETS = {"enabled": True, "ledger_flush_seconds": 3600}


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'budgets.db'}"


@pytest.fixture
def budget_app(make_app: Callable[..., Flask], db_url: str, redis_server: RedisServer
               ) -> Iterator[Callable[..., Flask]]:
    """budget_app(**budgets) -> the app with budgets on, Redis backend, alice's day budget."""
    store = KeyStore.from_url(db_url)
    store.migrate()
    store.set_budget("user", USER, Budget(day=1.0))
    store.close()

    def factory(redis: dict[str, Any] | None = None, upstream: dict[str, Any] | None = None,
                **budgets: Any) -> Flask:
        return make_app({
            "upstream": upstream or {},
            "auth": {"database_url": db_url},
            "budgets": {"enabled": True, "ledger_flush_seconds": 3600, **budgets},
            "features": {"rate_limiting": {"backend": "redis", "redis": {
                "url": redis_server.url, "timeout_ms": 1000, "reconcile_delay_ms": 0,
                **(redis or {})}}},
            "pricing": {"openai": {"models": {MODEL: {"input": PRICE_IN,
                                                      "output": PRICE_OUT}}}},
        })

    yield factory


def counter(server: RedisServer) -> tuple[int, int]:
    """(settled spend, held) of alice's day budget, in nano-dollars."""
    day = datetime.now(timezone.utc).strftime("%Y%m%d")
    client = server.client()
    try:
        raw = client.hmget(f"llmproxy:{{rl}}:budget:user:{USER}:day:{day}", "s", "h")
    finally:
        client.close()
    return int(raw[0] or 0), int(raw[1] or 0)


def until_counter(server: RedisServer, expected: Callable[[tuple[int, int]], bool]) -> None:
    """Polled: a late reply is settled on another greenlet, with no event to wait on."""
    deadline = time.monotonic() + 10
    while not expected(counter(server)):
        assert time.monotonic() < deadline, counter(server)
        time.sleep(0.01)


def post(client: Any, stream: bool = False, **headers: str) -> Any:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 10,
                            "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    resp = client.post("/openai/v1/chat/completions", json=body, buffered=not stream,
                       headers={"Authorization": "Bearer sk-user-own", "X-User-ID": USER,
                                **headers})
    if not stream:
        resp.close()  # the terminal event (and the settlement) fires on close
    return resp


def real_cost(fake: Any) -> int:
    sc = fake.scenario
    return round((sc.input_tokens * PRICE_IN + sc.output_tokens * PRICE_OUT) * 1000)


def test_a_call_is_charged_its_real_cost_and_its_hold_released(
        budget_app: Callable[..., Flask], redis_server: RedisServer, fake_upstream: Any) -> None:
    client = budget_app().test_client()
    resp = post(client, Origin="https://app.example")
    assert resp.status_code == 200
    assert resp.headers["X-Budget-Scope"] == f"user:{USER}"
    exposed = resp.headers["Access-Control-Expose-Headers"].lower()
    assert "x-budget-remaining-usd" in exposed and "x-should-retry" in exposed
    assert counter(redis_server) == (real_cost(fake_upstream), 0)


def test_a_failed_call_pays_nothing(budget_app: Callable[..., Flask],
                                    redis_server: RedisServer, fake_upstream: Any) -> None:
    from fake_upstream import error

    client = budget_app().test_client()
    assert post(client).status_code == 200
    fake_upstream.script(error("openai", 500))
    assert post(client).status_code == 500
    fake_upstream.script(error("openai", 400))
    assert post(client).status_code == 400
    assert counter(redis_server) == (real_cost(fake_upstream), 0)


def test_a_call_sent_whose_answer_never_came_pays_its_hold(
        budget_app: Callable[..., Flask], redis_server: RedisServer, fake_upstream: Any) -> None:
    """A read timeout: the provider got the call and may have run it whole (and bill it), so
    the hold is paid, not refunded; the rate limiter's estimate stands alike."""
    client = budget_app(upstream={"read_timeout": 0.3}).test_client()
    first = post(client)
    assert first.status_code == 200
    hold = round((1.0 - float(first.headers["X-Budget-Remaining-USD"])) * 1e9)
    assert hold > real_cost(fake_upstream)
    fake_upstream.script(fake_upstream.scripts.delayed(5))
    try:
        assert post(client).status_code == 504
    finally:
        fake_upstream.release.set()
    assert counter(redis_server) == (real_cost(fake_upstream) + hold, 0)


def test_calls_that_cost_nothing_pass_a_spent_budget(
        budget_app: Callable[..., Flask], redis_server: RedisServer) -> None:
    """Listing models or counting tokens costs nothing: a budget spent past its limit (by
    the overshoot calls in flight may cause) refuses paid calls only."""
    client = budget_app().test_client()
    assert post(client).status_code == 200
    day = datetime.now(timezone.utc).strftime("%Y%m%d")
    admin = redis_server.client()
    try:
        admin.hincrby(f"llmproxy:{{rl}}:budget:user:{USER}:day:{day}", "s", 2_000_000_000)
    finally:
        admin.close()
    assert post(client).status_code == 429
    auth = {"Authorization": "Bearer sk-user-own", "X-User-ID": USER}
    listing = client.get("/openai/v1/models", headers=auth)
    assert listing.status_code == 200
    counted = client.post("/anthropic/v1/messages/count_tokens",
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                          headers={"x-api-key": "sk-ant-own", "X-User-ID": USER})
    assert counted.status_code == 200, counted.get_data(as_text=True)


def test_a_stream_the_client_leaves_pays_its_prompt_and_what_it_relayed(
        budget_app: Callable[..., Flask], redis_server: RedisServer, fake_upstream: Any) -> None:
    fake_upstream.script(fake_upstream.scripts.endless("openai", interval=0.01))
    client = budget_app().test_client()
    resp = post(client, stream=True)
    assert resp.status_code == 200
    held = counter(redis_server)[1]
    assert held > 0  # the hold is there while the stream runs
    chunks = resp.response
    relayed = b"".join(next(chunks) for _ in range(20))
    assert relayed.count(b"data:") >= 20
    resp.close()  # the client leaves: the terminal event fires
    spent, held = counter(redis_server)
    assert held == 0
    text = "".join(json.loads(line[5:])["choices"][0]["delta"].get("content", "")
                   for line in relayed.decode().splitlines() if line.startswith("data: {"))
    # at least the text relayed (at 5 characters a token, the fewest any estimate uses) and
    # at most that at 2 characters a token plus the prompt estimate
    assert len(text) / 5 * PRICE_OUT * 1000 <= spent
    assert spent <= (len(text) / 2 * PRICE_OUT + 10 * PRICE_IN) * 1000


@pytest.mark.parametrize("on_error", ["open", "closed"])
def test_a_reservation_answered_after_its_timeout_is_not_left_behind(
        budget_app: Callable[..., Flask], redis_server: RedisServer, fake_upstream: Any,
        on_error: str) -> None:
    """Redis runs the script later than the call's timeout: refused (closed), the hold is
    released; let through (open), the call is charged its real cost like any other."""
    client = budget_app(redis={"timeout_ms": 50}, on_error=on_error).test_client()
    assert post(client).status_code == 200  # scripts loaded, a connection pooled
    pauser = redis_server.client()
    try:
        assert pauser.client_pause(400, all=False)  # scripts (they write) wait 400 ms
        resp = post(client)
    finally:
        pauser.close()
    assert "X-Budget-Scope" not in resp.headers  # the reservation timed out
    if on_error == "closed":
        assert resp.status_code == 503
        until_counter(redis_server, lambda c: c == (real_cost(fake_upstream), 0))
    else:
        assert resp.status_code == 200
        until_counter(redis_server, lambda c: c == (2 * real_cost(fake_upstream), 0))


def test_unknown_budget_store_answers_503_when_closed(
        make_app: Callable[..., Flask], db_url: str) -> None:
    from services import closed_port

    store = KeyStore.from_url(db_url)
    store.migrate()
    store.set_budget("user", USER, Budget(day=1.0))
    store.close()
    with closed_port() as port:
        app = make_app({"auth": {"database_url": db_url}, "budgets": QUIET_BUDGETS,
                        "features": {"rate_limiting": {"backend": "redis", "redis": {
                            "url": f"redis://127.0.0.1:{port}/0", "timeout_ms": 100}}},
                        "pricing": {"openai": {"models": {MODEL: {"input": PRICE_IN,
                                                                  "output": PRICE_OUT}}}}})
        client = app.test_client()
        resp = post(client)
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
        other = client.post("/openai/v1/chat/completions", json={"model": MODEL},
                            headers={"Authorization": "Bearer sk-x", "X-User-ID": "bob"})
        assert other.status_code == 200  # bob has no budget: rate limiting is off


def test_key_budgets_reach_the_metrics(make_app: Callable[..., Flask], db_url: str,
                                       fake_upstream: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI", "ANTHROPIC", "GEMINI", "GROQ"):
        monkeypatch.setenv(f"{name}_API_KEY", "sk-server-side")
    monkeypatch.setattr(metrics, "BUDGET_GAUGE_EVERY", 0.0)  # every call updates them
    store = KeyStore.from_url(db_url)
    store.migrate()
    key, secret = store.create("metered", budgets=Budget(day=2.0, total=5.0))
    store.close()
    app = make_app({"auth": {"mode": "keys", "database_url": db_url},
                    "budgets": QUIET_BUDGETS,
                    "pricing": {"openai": {"models": {MODEL: {"input": PRICE_IN,
                                                              "output": PRICE_OUT}}}}})
    client = app.test_client()
    for _ in range(2):
        resp = client.post("/openai/v1/chat/completions", json={
            "model": MODEL, "max_tokens": 10, "messages": []},
            headers={"Authorization": f"Bearer {secret}"})
        assert resp.status_code == 200
        resp.close()
    text = client.get("/metrics").get_data(as_text=True)
    one = real_cost(fake_upstream) / 1e9
    line = f'llmproxy_budget_spend_usd{{key_id="{key.id}",window="total"}}'
    value = float(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])
    assert value == pytest.approx(one)  # the first call settled before the second reserved
    remaining = f'llmproxy_budget_remaining_usd{{key_id="{key.id}",window="day"}}'
    assert any(x.startswith(remaining) for x in text.splitlines())


def test_a_refusal_carries_cors_headers_a_browser_can_read(
        make_app: Callable[..., Flask], db_url: str, fake_upstream: Any) -> None:
    store = KeyStore.from_url(db_url)
    store.migrate()
    store.set_budget("user", USER, Budget(total=0.0))
    store.close()
    app = make_app({"auth": {"database_url": db_url}, "budgets": QUIET_BUDGETS,
                    "pricing": {"openai": {"models": {MODEL: {"input": PRICE_IN,
                                                              "output": PRICE_OUT}}}}})
    resp = post(app.test_client(), Origin="https://app.example")
    assert resp.status_code == 429
    assert resp.headers["Access-Control-Allow-Origin"] in ("*", "https://app.example")
    exposed = resp.headers["Access-Control-Expose-Headers"].lower()
    for name in ("x-should-retry", "x-budget-scope", "x-budget-window", "x-budget-limit-usd",
                 "x-budget-remaining-usd", "retry-after"):
        assert name in exposed
    assert resp.headers["x-should-retry"] == "false"
    assert fake_upstream.requests == []


HUGE = "1" + "0" * 400  # a JSON integer Python's json parses: 10**400


@pytest.mark.parametrize(("path", "body", "shape"), [
    ("/openai/v1/chat/completions",
     f'{{"model": "{MODEL}", "max_tokens": {HUGE}, "n": {HUGE}, "messages": []}}',
     lambda b: b["error"]["type"] == "insufficient_quota"),
    ("/anthropic/v1/messages",
     f'{{"model": "{MODEL}", "max_tokens": {HUGE}, "messages": []}}',
     lambda b: b["type"] == "error" and b["error"]["type"] == "rate_limit_error"),
    (f"/gemini/v1beta/models/{MODEL}:generateContent",
     f'{{"contents": [], "generationConfig": {{"maxOutputTokens": {HUGE}, '
     f'"candidateCount": {HUGE}}}}}',
     lambda b: b["error"]["status"] == "RESOURCE_EXHAUSTED"),
])
def test_a_huge_output_cap_is_refused_by_the_budget_not_a_500(
        make_app: Callable[..., Flask], db_url: str, fake_upstream: Any, path: str, body: str,
        shape: Callable[[Any], bool]) -> None:
    store = KeyStore.from_url(db_url)
    store.migrate()
    store.set_budget("user", USER, Budget(day=1.0))
    store.close()
    prices = {"models": {MODEL: {"input": PRICE_IN, "output": PRICE_OUT}}}
    app = make_app({"auth": {"database_url": db_url}, "budgets": QUIET_BUDGETS,
                    "pricing": {p: prices for p in ("openai", "anthropic", "gemini")}})
    resp = app.test_client().post(path, data=body, headers={
        "Content-Type": "application/json", "X-User-ID": USER,
        "Authorization": "Bearer sk-user-own", "x-api-key": "sk-user-own",
        "x-goog-api-key": "sk-user-own"})
    # the cap held is the clamped one: $1000/M x 2**31 tokens is more than alice's $1 a day
    assert resp.status_code == 429, resp.get_data(as_text=True)
    assert shape(resp.get_json()) and resp.headers["X-Budget-Scope"] == f"user:{USER}"
    assert fake_upstream.requests == []
