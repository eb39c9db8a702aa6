"""Proxy keys end to end: the official SDKs, real gunicorn (2 workers), real SQLite.

A client calls with a proxy key exactly where its SDK puts a provider key; the fake upstream
must receive the provider key the proxy holds, in that provider's native header, and never
the proxy key (nor any other client credential).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import requests
from conftest import ProxyFactory, ProxyLauncher, ProxyProcess, new_request_id
from e2e.sdk import anthropic_client, gemini_client, openai_client
from fake_upstream import FakeUpstream, Recorded
from google.genai import errors as genai_errors

from llmproxy.keys.model import ProxyKey, generate_secret
from llmproxy.keys.store import KeyStore

pytestmark = pytest.mark.e2e

MODEL = "fake-model-1"
CACHE_SECONDS = 1.0
_RUN = uuid.uuid4().hex[:12]
SERVER_KEYS = {"OPENAI_API_KEY": f"sk-server-openai-{_RUN}",
               "ANTHROPIC_API_KEY": f"sk-ant-server-{_RUN}",
               "GEMINI_API_KEY": f"AIza-server-gemini-{_RUN}",
               "GROQ_API_KEY": f"gsk-server-groq-{_RUN}"}


def auth_config(url: str, mode: str = "mixed", **extra: Any) -> dict[str, Any]:
    return {"auth": {"mode": mode, "database_url": url, "key_cache_seconds": CACHE_SECONDS},
            **extra}


@pytest.fixture(scope="module")
def db_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('keys') / 'keys.db'}"


@pytest.fixture(scope="module")
def store(db_url: str) -> Iterator[KeyStore]:
    store = KeyStore.from_url(db_url)
    store.migrate()
    yield store
    store.close()


@pytest.fixture(scope="module")
def mixed(proxy_launcher: ProxyLauncher, db_url: str, store: KeyStore) -> ProxyProcess:
    """auth.mode mixed, 2 workers, the provider keys in the environment."""
    return proxy_launcher(config=auth_config(db_url), env=SERVER_KEYS)


@pytest.fixture
def proxy(mixed: ProxyProcess, fake_upstream: FakeUpstream) -> Iterator[ProxyProcess]:
    assert mixed.alive(), mixed.log_text()[-3000:]
    yield mixed
    assert mixed.alive(), "the proxy died during the test"


def new_key(store: KeyStore, **fields: Any) -> tuple[ProxyKey, str]:
    return store.create(fields.pop("name", "test key"), **fields)


def assert_never_forwarded(fake: FakeUpstream, *secrets: str) -> list[Recorded]:
    """Every request the upstream received; none holds any of ``secrets`` anywhere."""
    received = fake.complete_requests()
    for rec in received:
        raw = rec.target + "\n" + "\n".join(f"{k}: {v}" for k, v in rec.headers)
        raw += "\n" + (rec.body or b"").decode("utf-8", "replace")
        for secret in secrets:
            assert secret not in raw, f"a proxy key reached the upstream: {rec.target}"
    return received


# -- the SDKs, with a proxy key ------------------------------------------------------------

def test_openai_sdk(proxy: ProxyProcess, fake_upstream: FakeUpstream, store: KeyStore) -> None:
    key, secret = new_key(store, user="alice", team="ml")
    rid = new_request_id()
    client = openai_client(proxy.url, rid, api_key=secret)
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert out.choices[0].message.content == fake_upstream.scenario.text
    chunks = list(openai_client(proxy.url, new_request_id(), api_key=secret)
                  .chat.completions.create(model=MODEL, messages=[], stream=True,
                                           stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None
    for rec in assert_never_forwarded(fake_upstream, secret):
        assert rec.header("authorization") == f"Bearer {SERVER_KEYS['OPENAI_API_KEY']}"
        assert rec.target == "/v1/chat/completions"
    record = proxy.wait_record(rid)
    assert (record["key_id"], record["team"], record["user"], record["user_source"]) == \
        (key.id, "ml", "alice", "key")
    assert record["key_fingerprint"] is None and record["status"] == 200
    metrics = requests.get(proxy.url + "/metrics", timeout=5).text.splitlines()
    counted = [line for line in metrics if line.startswith("llmproxy_key_requests_total{")
               and f'key_id="{key.id}"' in line and 'team="ml"' in line]
    assert len(counted) == 1 and counted[0].endswith(" 2.0"), counted


def test_groq_route_gets_groqs_key(proxy: ProxyProcess, fake_upstream: FakeUpstream,
                                   store: KeyStore) -> None:
    _, secret = new_key(store)
    openai_client(proxy.url, new_request_id(), prefix="groq", api_key=secret) \
        .chat.completions.create(model=MODEL, messages=[])
    (rec,) = assert_never_forwarded(fake_upstream, secret)
    assert rec.header("authorization") == f"Bearer {SERVER_KEYS['GROQ_API_KEY']}"


def test_anthropic_sdk(proxy: ProxyProcess, fake_upstream: FakeUpstream,
                       store: KeyStore) -> None:
    key, secret = new_key(store, team="web")
    rid = new_request_id()
    client = anthropic_client(proxy.url, rid, api_key=secret)
    msg = client.messages.create(model=MODEL, max_tokens=8,
                                 messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].type == "text" and msg.content[0].text == fake_upstream.scenario.text
    with anthropic_client(proxy.url, new_request_id(), api_key=secret).messages.stream(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}]) as stream:
        assert "".join(stream.text_stream) == fake_upstream.scenario.text
    for rec in assert_never_forwarded(fake_upstream, secret):
        # The native slot, and no other credential: the SDK's bearer header is gone.
        assert rec.header("x-api-key") == SERVER_KEYS["ANTHROPIC_API_KEY"]
        assert rec.header("authorization") is None
        assert rec.header("anthropic-version")
    record = proxy.wait_record(rid)
    assert (record["key_id"], record["team"]) == (key.id, "web")


def test_gemini_sdk_and_query_key(proxy: ProxyProcess, fake_upstream: FakeUpstream,
                                  store: KeyStore) -> None:
    key, secret = new_key(store)
    client = gemini_client(proxy.url, new_request_id(), api_key=secret, version="v1beta")
    assert client.models.generate_content(model=MODEL, contents="hi").text == \
        fake_upstream.scenario.text
    pieces = list(client.models.generate_content_stream(model=MODEL, contents="hi"))
    assert "".join(p.text or "" for p in pieces) == fake_upstream.scenario.text
    rid = new_request_id()
    resp = requests.post(
        f"{proxy.url}/gemini/v1beta/models/{MODEL}:generateContent?key={secret}&x=1",
        json={"contents": []}, headers={"X-Request-ID": rid}, timeout=10)
    assert resp.status_code == 200
    received = assert_never_forwarded(fake_upstream, secret)
    assert len(received) == 3
    for rec in received:
        assert rec.header("x-goog-api-key") == SERVER_KEYS["GEMINI_API_KEY"]
        assert "key" not in rec.query
    assert received[-1].target == f"/v1beta/models/{MODEL}:generateContent?x=1"
    record = proxy.wait_record(rid)
    assert record["key_id"] == key.id and "REDACTED" in record["path"]


def test_the_keys_user_cannot_be_overridden(proxy: ProxyProcess, fake_upstream: FakeUpstream,
                                            store: KeyStore) -> None:
    _, secret = new_key(store, user="alice")
    rid = new_request_id()
    client = openai_client(proxy.url, rid, prefix="meta/mallory/openai", api_key=secret,
                           default_query={"llm_user_id": "mallory"})
    client.chat.completions.create(model=MODEL, messages=[], user="mallory",
                                   extra_headers={"X-User-ID": "mallory"})
    record = proxy.wait_record(rid)
    assert (record["user"], record["user_source"]) == ("alice", "key")
    # A key without a user leaves the user to the usual sources.
    _, secret = new_key(store)
    rid = new_request_id()
    openai_client(proxy.url, rid, api_key=secret).chat.completions.create(
        model=MODEL, messages=[], extra_headers={"X-User-ID": "bob"})
    assert (proxy.wait_record(rid)["user"], proxy.wait_record(rid)["user_source"]) == \
        ("bob", "header")


def test_mixed_passes_other_credentials_through(proxy: ProxyProcess,
                                                fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    openai_client(proxy.url, rid, api_key="sk-client-own").chat.completions.create(
        model=MODEL, messages=[])
    assert fake_upstream.last.header("authorization") == "Bearer sk-client-own"
    record = proxy.wait_record(rid)
    assert record["key_id"] is None and record["key_fingerprint"].startswith("fp_")


# -- refusals ---------------------------------------------------------------------------------

def refused_body(exc: Any) -> str:
    return str(getattr(exc, "body", "")) + str(getattr(exc, "message", "")) + str(exc)


def test_unknown_revoked_and_expired_keys_are_401(proxy: ProxyProcess,
                                                  fake_upstream: FakeUpstream,
                                                  store: KeyStore) -> None:
    revoked, revoked_secret = new_key(store)
    store.revoke(revoked.id)
    _, expired_secret = new_key(store, expires_at=datetime.now(timezone.utc)
                                - timedelta(minutes=1))
    cases = [(generate_secret(), "Invalid proxy key"), (revoked_secret, "revoked"),
             (expired_secret, "expired"), ("llmp-short", "Invalid proxy key")]
    for secret, words in cases:
        with pytest.raises(openai.AuthenticationError) as oa:
            openai_client(proxy.url, new_request_id(), api_key=secret).models.list()
        assert words in refused_body(oa.value) and secret not in refused_body(oa.value)
        with pytest.raises(anthropic.AuthenticationError) as an:
            anthropic_client(proxy.url, new_request_id(), api_key=secret).messages.create(
                model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}])
        assert words in refused_body(an.value) and secret not in refused_body(an.value)
        gemini = gemini_client(proxy.url, new_request_id(), api_key=secret)  # GC closes it
        with pytest.raises(genai_errors.ClientError) as ge:
            gemini.models.generate_content(model=MODEL, contents="x")
        assert ge.value.code == 401 and ge.value.status == "UNAUTHENTICATED"
    assert assert_never_forwarded(fake_upstream) == []
    # A browser gets the refusal with CORS headers, so a web app can read it.
    rid = new_request_id()
    resp = requests.post(f"{proxy.url}/openai/v1/chat/completions", json={"model": MODEL},
                         headers={"Authorization": f"Bearer {revoked_secret}",
                                  "Origin": "https://app.example", "X-Request-ID": rid},
                         timeout=10)
    assert resp.status_code == 401
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert resp.json()["error"]["type"] == "authentication_error"
    record = proxy.wait_record(rid)
    assert (record["error_kind"], record["key_id"]) == ("unauthenticated", revoked.id)


def test_a_provider_or_model_not_allowed_is_403(proxy: ProxyProcess,
                                                fake_upstream: FakeUpstream,
                                                store: KeyStore) -> None:
    _, secret = new_key(store, providers=["openai", "gemini"], models=["gpt-4o*", "fake-*"])
    openai_client(proxy.url, new_request_id(), api_key=secret).chat.completions.create(
        model=MODEL, messages=[])  # allowed: fake-* matches
    with pytest.raises(openai.PermissionDeniedError) as oa:
        openai_client(proxy.url, new_request_id(), api_key=secret).chat.completions.create(
            model="o3-pro", messages=[])
    assert "o3-pro" in refused_body(oa.value)
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic_client(proxy.url, new_request_id(), api_key=secret).messages.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "x"}])
    gemini = gemini_client(proxy.url, new_request_id(), api_key=secret, version="v1beta")
    with pytest.raises(genai_errors.ClientError) as ge:
        gemini.models.generate_content(model="gemini-other", contents="x")
    assert ge.value.code == 403
    # A model list names no model: a model-restricted key cannot say it is allowed.
    with pytest.raises(openai.PermissionDeniedError):
        openai_client(proxy.url, new_request_id(), api_key=secret).models.list()
    assert len(assert_never_forwarded(fake_upstream, secret)) == 1  # only the allowed call


# -- revocation, limits, mode keys --------------------------------------------------------

def call_status(url: str, secret: str) -> int:
    """One call on a new connection, so that successive calls spread over the workers."""
    return requests.post(f"{url}/openai/v1/chat/completions", json={"model": MODEL},
                         headers={"Authorization": f"Bearer {secret}", "Connection": "close"},
                         timeout=10).status_code


def test_revocation_reaches_every_worker_within_the_cache_time(
        proxy: ProxyProcess, fake_upstream: FakeUpstream, store: KeyStore) -> None:
    key, secret = new_key(store)
    assert {call_status(proxy.url, secret) for _ in range(20)} == {200}
    store.revoke(key.id)
    revoked_at = time.monotonic()
    statuses: list[tuple[float, int]] = []
    while time.monotonic() - revoked_at < CACHE_SECONDS + 1.5:
        statuses.append((time.monotonic() - revoked_at, call_status(proxy.url, secret)))
    served_after = [t for t, status in statuses if status == 200]
    assert not served_after or max(served_after) <= CACHE_SECONDS + 0.2, statuses
    assert {status for t, status in statuses if t > CACHE_SECONDS + 0.2} == {401}


def test_a_keys_own_limits_are_enforced(start_proxy: ProxyFactory, db_url: str,
                                        store: KeyStore) -> None:
    # One worker: the memory backend counts per worker.
    limited = start_proxy(config=auth_config(db_url, features={"rate_limiting": {
        "enabled": True, "backend": "memory"}}), workers=1, env=SERVER_KEYS)
    key, secret = new_key(store, limits={"requests_per_minute": 2})
    _, other = new_key(store)
    client = openai_client(limited.url, new_request_id(), api_key=secret)
    for _ in range(2):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model=MODEL, messages=[])
    assert err.value.response.headers["X-RateLimit-Scope"] == f"key:{key.id}"
    assert secret not in str(err.value.response.headers)
    assert call_status(limited.url, other) == 200  # another key has its own counter


def test_mode_keys_requires_a_proxy_key(start_proxy: ProxyFactory, fake_upstream: FakeUpstream,
                                        db_url: str, store: KeyStore) -> None:
    strict = start_proxy(config=auth_config(db_url, mode="keys"), env=SERVER_KEYS)
    # Closed when done: an idle keep-alive connection would hold a worker's exit past the
    # graceful timeout, and the worker's last batch of last-used times with it.
    with openai_client(strict.url, new_request_id(), api_key="sk-client-own") as oa, \
            pytest.raises(openai.AuthenticationError) as err:
        oa.models.list()
    assert "proxy key is required" in refused_body(err.value)
    with anthropic_client(strict.url, new_request_id()) as an, \
            pytest.raises(anthropic.AuthenticationError):
        an.models.list()
    assert assert_never_forwarded(fake_upstream, "sk-client-own") == []
    key, secret = new_key(store)
    assert call_status(strict.url, secret) == 200
    # Last-used times are written in batches; the last one when the worker exits.
    strict.stop()
    used = store.get(key.id)
    assert used is not None and used.last_used_at is not None


def test_the_provider_key_comes_from_a_mounted_file(start_proxy: ProxyFactory,
                                                    fake_upstream: FakeUpstream, db_url: str,
                                                    store: KeyStore, tmp_path: Path) -> None:
    mounted = tmp_path / "openai_key"
    mounted.write_text(f"sk-from-file-{_RUN}\n")
    proxy = start_proxy(config=auth_config(db_url, providers={
        "openai": {"api_key_file": str(mounted)}}), workers=1, env=SERVER_KEYS)
    _, secret = new_key(store)
    assert call_status(proxy.url, secret) == 200
    assert fake_upstream.last.header("authorization") == f"Bearer sk-from-file-{_RUN}"
