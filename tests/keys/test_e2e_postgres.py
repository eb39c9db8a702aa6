"""Two proxy instances (real gunicorn) sharing one real PostgreSQL: a revocation reaches both
within ``auth.key_cache_seconds``, and a database outage keeps cached keys working while
unknown keys get 503 (not 401: the key may well be valid)."""

from __future__ import annotations

import time
from collections.abc import Callable

import anthropic
import openai
import pytest
import requests
from conftest import ProxyFactory, ProxyProcess, new_request_id
from e2e.sdk import anthropic_client, gemini_client, openai_client
from fake_upstream import FakeUpstream
from google.genai import errors as genai_errors
from pg_server import PostgresServer

from llmproxy.keys.model import generate_secret
from llmproxy.keys.store import KeyStore

from .test_e2e import CACHE_SECONDS, MODEL, SERVER_KEYS, auth_config

pytestmark = pytest.mark.e2e

#: Slack on top of the cache time for a revocation to show: a request in flight, a refresh.
SLACK = 0.5


def status(proxy: ProxyProcess, secret: str) -> int:
    """One call on a new connection (so successive calls spread over the workers)."""
    return requests.post(f"{proxy.url}/openai/v1/chat/completions", json={"model": MODEL},
                         headers={"Authorization": f"Bearer {secret}", "Connection": "close"},
                         timeout=15).status_code


def until(condition: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``condition()`` held (polled: the proxies are other processes)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition never held"
    return time.monotonic() - start


def test_a_revocation_reaches_both_instances_within_the_cache_time(
        start_proxy: ProxyFactory, fake_upstream: FakeUpstream, postgres_url: str) -> None:
    config = auth_config(postgres_url, mode="keys")
    pair = [start_proxy(config=config, env=SERVER_KEYS) for _ in range(2)]
    store = KeyStore.from_url(postgres_url)
    try:
        key, secret = store.create("shared", team="ops")
        for proxy in pair:
            out = openai_client(proxy.url, new_request_id(), api_key=secret) \
                .chat.completions.create(model=MODEL, messages=[])
            assert out.choices[0].message.content == fake_upstream.scenario.text
            assert {status(proxy, secret) for _ in range(10)} == {200}
        assert fake_upstream.last.header("authorization") == \
            f"Bearer {SERVER_KEYS['OPENAI_API_KEY']}"
        store.revoke(key.id)
        revoked_at = time.monotonic()
        seen: list[tuple[float, int, int]] = []  # (seconds after the revocation, proxy, status)
        while time.monotonic() - revoked_at < CACHE_SECONDS + SLACK + 1.0:
            for n, proxy in enumerate(pair):
                code = status(proxy, secret)
                seen.append((time.monotonic() - revoked_at, n, code))
        served = [t for t, _, code in seen if code == 200]
        assert not served or max(served) <= CACHE_SECONDS + SLACK, seen
        after = {(n, code) for t, n, code in seen if t > CACHE_SECONDS + SLACK}
        assert after == {(0, 401), (1, 401)}
    finally:
        store.close()


def test_an_outage_keeps_cached_keys_and_answers_unknown_keys_503(
        start_proxy: ProxyFactory, fake_upstream: FakeUpstream, postgres: PostgresServer,
        postgres_url: str) -> None:
    # One worker each, so that "cached" means cached by the worker that answers.
    config = auth_config(postgres_url, mode="keys")
    pair = [start_proxy(config=config, workers=1, env=SERVER_KEYS) for _ in range(2)]
    store = KeyStore.from_url(postgres_url)
    try:
        _, secret = store.create("survives the outage")
    finally:
        store.close()
    for proxy in pair:
        assert status(proxy, secret) == 200
    postgres.stop()
    assert not postgres.alive()
    stopped = time.monotonic()
    while time.monotonic() - stopped < 2.5 * CACHE_SECONDS:  # well past the cache time
        for proxy in pair:
            assert status(proxy, secret) == 200
    for proxy in pair:
        unknown = generate_secret()
        with pytest.raises(openai.InternalServerError) as oa:
            openai_client(proxy.url, new_request_id(), api_key=unknown).chat.completions.create(
                model=MODEL, messages=[])
        assert oa.value.status_code == 503 and unknown not in str(oa.value.body)
        with pytest.raises(anthropic.InternalServerError) as an:
            anthropic_client(proxy.url, new_request_id(), api_key=generate_secret()) \
                .messages.create(model=MODEL, max_tokens=8,
                                 messages=[{"role": "user", "content": "x"}])
        assert an.value.status_code == 503
        gemini = gemini_client(proxy.url, new_request_id(), api_key=generate_secret())
        with pytest.raises(genai_errors.ServerError) as ge:
            gemini.models.generate_content(model=MODEL, contents="x")
        assert ge.value.code == 503
        assert status(proxy, secret) == 200
    postgres.start()
    for proxy in pair:  # once the database answers again, unknown keys are 401 again
        until(lambda p=proxy: status(p, generate_secret()) == 401, 10)
        assert status(proxy, secret) == 200
