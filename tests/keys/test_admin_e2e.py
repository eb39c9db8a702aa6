"""The admin API end to end: real gunicorn (2 gevent workers), plain HTTP requests, the log
and the database scanned for the admin token and the created secret afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from conftest import ProxyFactory, ProxyProcess

from llmproxy.keys.model import hash_secret
from llmproxy.keys.store import KeyStore

pytestmark = pytest.mark.e2e

TOKEN = "e2e-admin-token-" + "9" * 16
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _call(proxy: ProxyProcess, method: str, path: str, **kwargs: object) -> requests.Response:
    return requests.request(method, proxy.url + path, timeout=10, **kwargs)  # type: ignore[arg-type]


def test_admin_api_on_real_gunicorn(start_proxy: ProxyFactory, database_url: str,
                                    tmp_path: Path) -> None:
    proxy = start_proxy(env={"LLMPROXY_ADMIN_TOKEN": TOKEN,
                             "LLMPROXY_DATABASE_URL": database_url, "LOG_LEVEL": "debug"})

    assert _call(proxy, "GET", "/admin/keys").status_code == 401
    assert _call(proxy, "GET", "/admin/keys",
                 headers={"Authorization": "Bearer wrong-token"}).status_code == 401

    created = _call(proxy, "POST", "/admin/keys", headers=AUTH, json={
        "name": "e2e", "user": "alice", "team": "ml", "providers": ["openai"],
        "limits": {"requests_per_minute": 10}, "expires_at": "2031-01-01T00:00:00Z"})
    assert created.status_code == 201, created.text
    body = created.json()
    secret, key_id = body["key"], body["id"]

    # every worker sees the key (requests land on either of the two)
    for _ in range(6):
        shown = _call(proxy, "GET", f"/admin/keys/{key_id}", headers=AUTH)
        assert shown.status_code == 200 and shown.json()["user"] == "alice"
    listed = _call(proxy, "GET", "/admin/keys", headers=AUTH).json()["keys"]
    assert [k["id"] for k in listed] == [key_id]

    patched = _call(proxy, "PATCH", f"/admin/keys/{key_id}", headers=AUTH,
                    json={"team": "ops", "models": ["gpt-4o-mini"]})
    assert patched.status_code == 200 and patched.json()["team"] == "ops"
    bad = _call(proxy, "PATCH", f"/admin/keys/{key_id}", headers=AUTH,
                json={"limits": {"requests_per_minute": -1}})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type"}
    revoked = _call(proxy, "DELETE", f"/admin/keys/{key_id}", headers=AUTH)
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert _call(proxy, "GET", f"/admin/{secret}", headers=AUTH).status_code == 404

    # the audit: one line per call, with the key id and outcome, no secret anywhere
    audit = [r for r in proxy.json_lines() if r.get("logger") == "llmproxy.audit"
             and r.get("message") == "admin call"]
    assert [(r["method"], r["action"], r["status"]) for r in audit] == [
        ("GET", "list", 401), ("GET", "list", 401), ("POST", "create", 201),
        *[("GET", "show", 200)] * 6, ("GET", "list", 200), ("PATCH", "update", 200),
        ("PATCH", "update", 400), ("DELETE", "revoke", 200), ("GET", None, 404)]
    assert {r["key_id"] for r in audit[2:-1] if r["action"] != "list"} == {key_id}
    assert all(r["outcome"] == ("ok" if r["status"] < 400 else r["outcome"]) for r in audit)
    assert [r["outcome"] for r in audit if r["status"] >= 400] == \
        ["unauthorized", "unauthorized", "invalid", "not_found"]
    log = proxy.log_text()
    for secret_text in (TOKEN, secret, secret[12:]):
        assert secret_text not in log
        for response in (shown, patched, revoked, bad):
            assert secret_text not in response.text

    # the database holds the hash and the prefix only
    store = KeyStore.from_url(database_url)
    stored = store.lookup(hash_secret(secret))
    assert stored is not None and stored.revoked and stored.prefix == secret[:12]
    store.close()
    if database_url.startswith("sqlite"):
        for path in Path(database_url.removeprefix("sqlite:///")).parent.glob("keys.db*"):
            assert secret[12:].encode() not in path.read_bytes()
            assert TOKEN.encode() not in path.read_bytes()


def test_no_admin_token_no_admin_routes(proxy: ProxyProcess) -> None:
    for method in ("GET", "POST", "DELETE"):
        resp = _call(proxy, method, "/admin/keys", headers=AUTH, json={"name": "x"})
        assert resp.status_code == 404
