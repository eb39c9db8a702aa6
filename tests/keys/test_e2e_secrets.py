"""No secret of the proxy-key setup leaks: every output of an end-to-end run is scanned.

Secrets: the proxy keys (valid, revoked, unknown, malformed), the providers' own keys and
the admin token. Outputs: the proxy's log at debug level (gunicorn's too), the usage-record
file, ``/metrics``, the key database's files, every response the clients got, and what the
fake upstream received — which must hold the provider keys (that is its job) and nothing else.
"""

from __future__ import annotations

import secrets as random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from conftest import ProxyLauncher, ProxyProcess, new_request_id
from e2e.sdk import anthropic_client, gemini_client, openai_client
from fake_upstream import FakeUpstream, error

from llmproxy.keys.model import generate_secret

pytestmark = pytest.mark.e2e

MODEL = "fake-model-1"
PROVIDER_KEYS = {"OPENAI_API_KEY": "sk-proj-" + random.token_hex(20),
                 "ANTHROPIC_API_KEY": "sk-ant-api03-" + random.token_hex(20),
                 "GEMINI_API_KEY": "AIzaSy" + random.token_hex(16),
                 "GROQ_API_KEY": "gsk_" + random.token_hex(20)}
ADMIN_TOKEN = "adm-" + random.token_urlsafe(24)


class Run:
    """A proxy with everything switched on, and what came out of it."""

    def __init__(self, proxy: ProxyProcess, db: Path, records: Path) -> None:
        self.proxy = proxy
        self.db = db
        self.records = records
        self.proxy_keys: list[str] = []
        self.responses: list[bytes] = []

    def admin(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, f"{self.proxy.url}/admin{path}", timeout=10,
                                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, **kwargs)

    def key(self, **fields: Any) -> tuple[str, str]:
        """A new key through the admin API: (id, secret). The one response holding the
        secret is the creation's, which is left out of the scan."""
        created = self.admin("POST", "/keys", json={"name": "scan", **fields})
        assert created.status_code == 201, created.text
        self.proxy_keys.append(created.json()["key"])
        return created.json()["id"], created.json()["key"]

    def keep(self, resp: requests.Response) -> requests.Response:
        self.responses.append(resp.content + str(resp.headers).encode())
        return resp


@pytest.fixture(scope="module", params=["json", "text"])
def run(request: pytest.FixtureRequest, proxy_launcher: ProxyLauncher,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("secrets")
    db, records = tmp / "keys.db", tmp / "usage.jsonl"
    url = f"sqlite:///{db}"
    proxy = proxy_launcher(config={
        "auth": {"mode": "mixed", "database_url": url, "key_cache_seconds": 1},
        "usage_records": {"enabled": True, "path": str(records)},
        "features": {"rate_limiting": {"enabled": True, "backend": "memory"}},
    }, env={**PROVIDER_KEYS, "LLMPROXY_ADMIN_TOKEN": ADMIN_TOKEN, "LOG_LEVEL": "debug",
            "LOG_FORMAT": request.param, "GUNICORN_LOG_LEVEL": "debug"})
    yield Run(proxy, db, records)


def test_no_secret_in_any_output(run: Run, fake_upstream: FakeUpstream) -> None:
    url = run.proxy.url
    _, good = run.key(user="alice", team="ml", limits={"requests_per_minute": 1000})
    _, narrow = run.key(models=["gpt-*"])
    revoked_id, revoked = run.key()
    assert run.keep(run.admin("DELETE", f"/keys/{revoked_id}")).json()["revoked"] is True
    run.keep(run.admin("GET", "/keys"))
    run.keep(run.admin("GET", f"/keys/{revoked_id}"))
    run.keep(run.admin("PATCH", f"/keys/{revoked_id}", json={"team": "gone"}))
    run.keep(requests.get(f"{url}/admin/keys", headers={"Authorization": "Bearer wrong"},
                          timeout=10))
    unknown = generate_secret()
    run.proxy_keys += [unknown, "llmp-" + random.token_urlsafe(8)]

    # Successes through each SDK, plain and streamed, and the Gemini query slot.
    openai_client(url, new_request_id(), api_key=good).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}])
    list(openai_client(url, new_request_id(), api_key=good).chat.completions.create(
        model=MODEL, messages=[], stream=True, stream_options={"include_usage": True}))
    with anthropic_client(url, new_request_id(), api_key=good).messages.stream(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}]) as s:
        "".join(s.text_stream)
    gemini = gemini_client(url, new_request_id(), api_key=good, version="v1beta")
    gemini.models.generate_content(model=MODEL, contents="hi")
    gem = f"/gemini/v1beta/models/{MODEL}:generateContent"
    for secret in (good, revoked, unknown):
        run.keep(requests.post(f"{url}{gem}?key={secret}&alt=sse", json={}, timeout=10))
        run.keep(requests.get(f"{url}/meta/bob/gemini/v1beta/models?key={secret}", timeout=10))

    # Refusals in every slot: unknown, revoked, malformed (401) and a model not allowed (403).
    for secret in run.proxy_keys[2:]:
        run.keep(requests.post(f"{url}/openai/v1/chat/completions", json={"model": MODEL},
                               headers={"Authorization": f"Bearer {secret}"}, timeout=10))
        run.keep(requests.post(f"{url}/anthropic/v1/messages", json={"model": MODEL},
                               headers={"x-api-key": secret}, timeout=10))
        run.keep(requests.post(f"{url}{gem}", json={}, headers={"x-goog-api-key": secret},
                               timeout=10))
    with pytest.raises(openai.PermissionDeniedError):
        openai_client(url, new_request_id(), api_key=narrow).chat.completions.create(
            model="o3", messages=[])

    # The provider refuses its own key, and a provider error mid-way.
    received = fake_upstream.complete_requests()
    fake_upstream.script(error("openai", 401, "Incorrect API key provided"))
    run.keep(requests.post(f"{url}/openai/v1/chat/completions", json={"model": MODEL},
                           headers={"Authorization": f"Bearer {good}"}, timeout=10))
    received += fake_upstream.complete_requests()
    fake_upstream.reset()
    fake_upstream.script(fake_upstream.scripts.dying(after=2))
    run.keep(requests.post(f"{url}/anthropic/v1/messages", json={"model": MODEL, "stream": True},
                           headers={"x-api-key": good}, timeout=10))
    received += fake_upstream.complete_requests()
    fake_upstream.reset()
    run.keep(requests.get(f"{url}/health", timeout=10))
    metrics = run.keep(requests.get(f"{url}/metrics", timeout=10)).text
    assert "llmproxy_key_requests_total" in metrics  # the scan below saw key metrics

    # -- the scan ----------------------------------------------------------------------------
    everything = list(PROVIDER_KEYS.values()) + [ADMIN_TOKEN] + run.proxy_keys
    log = run.proxy.log_text()
    assert log.count("request completed") >= 20, "too few records: the scan means little"
    db_bytes = b"".join(p.read_bytes() for p in run.db.parent.glob(run.db.name + "*"))
    assert b"scan" in db_bytes  # the database holds the keys, by hash
    outputs = {"log": log.encode(), "usage records": run.records.read_bytes(),
               "metrics": metrics.encode(), "database": db_bytes,
               "responses": b"\n".join(run.responses)}
    leaks = [(where, n) for where, data in outputs.items()
             for n, secret in enumerate(everything)
             if secret.encode() in data or secret[:16].encode() in data]
    assert not leaks, f"secrets (by index) found in: {leaks}"
    upstream = b"\n".join(rec.target.encode() + str(rec.headers).encode() + (rec.body or b"")
                          for rec in received)
    assert len(received) >= 10
    assert not [s for s in [ADMIN_TOKEN, *run.proxy_keys] if s.encode() in upstream]
    # ... while the providers got their own keys: the scan looked at the right bytes.
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"):
        assert PROVIDER_KEYS[name].encode() in upstream
