"""The /admin API in-process (Flask test client), on real SQLite (and PostgreSQL once)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llmproxy.keys.model import hash_secret
from llmproxy.state import get_state

TOKEN = "admin-" + "t0ken" * 4
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class AuditRecords(logging.Handler):
    """Collects what the audit logger emits, formatted as the JSON log lines would carry it."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append({"message": record.getMessage(),
                             **(getattr(record, "fields", None) or {})})

    def text(self) -> str:
        return json.dumps(self.records, default=str)


@pytest.fixture
def audit() -> Iterator[AuditRecords]:
    handler = AuditRecords()
    logger = logging.getLogger("llmproxy.audit")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "keys.db"


@pytest.fixture
def admin_app(make_app: Callable[..., Any], db_path: Path) -> Any:
    return make_app({"auth": {"admin_token": TOKEN, "database_url": f"sqlite:///{db_path}"}})


@pytest.fixture
def admin(admin_app: Any) -> Any:
    return admin_app.test_client()


def _error_shape(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type"}
    return dict(body["error"])


def _create(admin: Any, **fields: Any) -> dict[str, Any]:
    resp = admin.post("/admin/keys", json={"name": "k", **fields}, headers=AUTH)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return dict(resp.get_json())


# ------------------------------------------------------------------- when /admin is mounted


def test_without_an_admin_token_admin_is_an_unknown_route(make_app: Callable[..., Any],
                                                          tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    app = make_app({"auth": {"database_url": url}})
    client = app.test_client()
    for method in ("GET", "POST", "PATCH", "DELETE"):
        for path in ("/admin", "/admin/keys", "/admin/keys/key_0123456789abcdef"):
            assert client.open(path, method=method, headers=AUTH).status_code == 404
    assert get_state(app).key_store is None  # passthrough: no database opened at all
    assert not (tmp_path / "keys.db").exists()


def test_keys_mode_opens_the_database_without_mounting_admin(make_app: Callable[..., Any],
                                                             tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    for name in ("OPENAI", "ANTHROPIC", "GEMINI", "GROQ"):  # keys mode reads the providers'
        monkeypatch.setenv(f"{name}_API_KEY", "sk-test")
    app = make_app({"auth": {"mode": "keys",
                             "database_url": f"sqlite:///{tmp_path / 'keys.db'}"}})
    assert get_state(app).key_store is not None
    assert (tmp_path / "keys.db").exists()  # migrated at start-up
    assert app.test_client().get("/admin/keys", headers=AUTH).status_code == 404


# ----------------------------------------------------------------------------- the token


@pytest.mark.parametrize("header", [None, "Bearer", f"Bearer {TOKEN}x", f"Basic {TOKEN}",
                                    f"Bearer {TOKEN[:-1]}", "Bearer " + "x" * 5000])
def test_a_missing_or_wrong_token_is_401_and_audited(admin: Any, audit: AuditRecords,
                                                     header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"),
                         ("DELETE", "/admin/keys/key_0123456789abcdef"), ("GET", "/admin/x")):
        resp = admin.open(path, method=method, headers=headers, json={"name": "n"})
        err = _error_shape(resp, 401)
        assert err["type"] == "authentication_error"
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert [r["outcome"] for r in audit.records] == ["unauthorized"] * 4
    assert TOKEN not in audit.text()


def test_bearer_scheme_is_case_insensitive(admin: Any) -> None:
    assert admin.get("/admin/keys", headers={"Authorization": f"bearer {TOKEN}"}).status_code \
        == 200


def test_cors_preflight_is_not_refused(admin: Any) -> None:
    resp = admin.options("/admin/keys", headers={
        "Origin": "https://ops.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert resp.status_code == 200
    assert resp.headers.get("Access-Control-Allow-Origin")


# --------------------------------------------------------------------------- the lifecycle


def test_create_answers_the_secret_once(admin: Any, db_path: Path,
                                        audit: AuditRecords) -> None:
    resp = admin.post("/admin/keys", headers=AUTH, json={
        "name": "ci bot", "user": "alice", "team": "ml", "providers": ["openai", "anthropic"],
        "models": ["gpt-4o*", "claude-*"], "limits": {"requests_per_minute": 60},
        "expires_at": "2030-01-01T00:00:00Z", "metadata": {"ticket": "OPS-1"}})
    assert resp.status_code == 201
    assert resp.headers["Cache-Control"] == "no-store"
    body = resp.get_json()
    secret = body["key"]
    assert secret.startswith("llmp-") and len(secret) >= 37
    assert resp.headers["Location"].endswith(f"/admin/keys/{body['id']}")
    assert body["prefix"] == secret[:12]
    assert {k: body[k] for k in ("name", "user", "team", "providers", "models", "limits",
                                 "expires_at", "revoked", "metadata")} == {
        "name": "ci bot", "user": "alice", "team": "ml", "providers": ["openai", "anthropic"],
        "models": ["gpt-4o*", "claude-*"], "limits": {"requests_per_minute": 60},
        "expires_at": "2030-01-01T00:00:00+00:00", "revoked": False,
        "metadata": {"ticket": "OPS-1"}}
    # never again: not in a listing, a show, an update, a revoke, the audit or the database
    later = [admin.get("/admin/keys", headers=AUTH),
             admin.get(f"/admin/keys/{body['id']}", headers=AUTH),
             admin.patch(f"/admin/keys/{body['id']}", headers=AUTH, json={"team": "ops"}),
             admin.delete(f"/admin/keys/{body['id']}", headers=AUTH)]
    for r in later:
        assert r.status_code == 200
        text = r.get_data(as_text=True)
        assert secret not in text and secret[12:] not in text
        assert hash_secret(secret) not in text
    assert secret not in audit.text() and secret[12:] not in audit.text()
    for path in db_path.parent.glob("keys.db*"):
        assert secret.encode() not in path.read_bytes()
        assert secret[12:].encode() not in path.read_bytes()


def test_only_name_is_required(admin: Any) -> None:
    body = _create(admin)
    assert (body["user"], body["team"], body["providers"], body["models"], body["limits"],
            body["expires_at"], body["metadata"]) == (None, None, [], [], {}, None, {})


def test_list_show_update_revoke(admin: Any, audit: AuditRecords) -> None:
    a, b = _create(admin, name="a"), _create(admin, name="b", user="bob")
    listed = admin.get("/admin/keys", headers=AUTH).get_json()["keys"]
    assert [k["id"] for k in listed] == [a["id"], b["id"]]
    assert all("key" not in k for k in listed)

    shown = admin.get(f"/admin/keys/{b['id']}", headers=AUTH).get_json()
    assert shown["user"] == "bob" and shown["name"] == "b"

    resp = admin.patch(f"/admin/keys/{b['id']}", headers=AUTH,
                       json={"user": None, "models": ["gemini-*"], "expires_at": None,
                             "limits": {"tokens_per_day": 5000}})
    assert resp.status_code == 200
    updated = resp.get_json()
    assert (updated["user"], updated["models"], updated["limits"]) == \
        (None, ["gemini-*"], {"tokens_per_day": 5000})
    assert updated["name"] == "b" and updated["created_at"] == b["created_at"]

    resp = admin.delete(f"/admin/keys/{a['id']}", headers=AUTH)
    assert resp.status_code == 200 and resp.get_json()["revoked"] is True
    assert admin.delete(f"/admin/keys/{a['id']}", headers=AUTH).status_code == 200
    active = admin.get("/admin/keys?include_revoked=false", headers=AUTH).get_json()["keys"]
    assert [k["id"] for k in active] == [b["id"]]

    actions = [(r["method"], r["action"], r["key_id"], r["status"], r["outcome"])
               for r in audit.records]
    assert actions == [
        ("POST", "create", a["id"], 201, "ok"), ("POST", "create", b["id"], 201, "ok"),
        ("GET", "list", None, 200, "ok"), ("GET", "show", b["id"], 200, "ok"),
        ("PATCH", "update", b["id"], 200, "ok"), ("DELETE", "revoke", a["id"], 200, "ok"),
        ("DELETE", "revoke", a["id"], 200, "ok"), ("GET", "list", None, 200, "ok")]
    update = audit.records[4]
    assert update["changed"] == ["expires_at", "limits", "models", "user"]
    assert update["path"] == f"/admin/keys/{b['id']}"
    assert all(r["request_id"] for r in audit.records)


# ----------------------------------------------------------------------------- the errors


@pytest.mark.parametrize(("body", "field"), [
    ({}, "name"),
    ({"name": ""}, "name"),
    ({"name": "n", "colour": "red"}, "colour"),
    ({"name": "n", "providers": ["cohere"]}, "providers"),
    ({"name": "n", "providers": "openai"}, "providers"),
    ({"name": "n", "limits": {"requests_per_hour": 5}}, "limits.requests_per_hour"),
    ({"name": "n", "limits": {"requests_per_minute": -5}}, "limits.requests_per_minute"),
    ({"name": "n", "expires_at": "next week"}, "expires_at"),
    ({"name": "n", "expires_at": "9999-12-31T23:59:59-05:00"}, "expires_at"),  # past year 9999
    ({"name": "n", "metadata": "x"}, "metadata"),
    ([{"name": "n"}], "body"),
])
def test_invalid_bodies_are_400_naming_the_field(admin: Any, audit: AuditRecords,
                                                 body: Any, field: str) -> None:
    err = _error_shape(admin.post("/admin/keys", headers=AUTH, json=body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["message"].startswith(field + ":")
    assert audit.records[-1]["outcome"] == "invalid"
    assert admin.get("/admin/keys", headers=AUTH).get_json()["keys"] == []


def test_patch_is_validated_too(admin: Any) -> None:
    key = _create(admin)
    err = _error_shape(admin.patch(f"/admin/keys/{key['id']}", headers=AUTH,
                                   json={"limits": {"tokens_per_minute": "many"}}), 400)
    assert err["message"].startswith("limits.tokens_per_minute:")
    err = _error_shape(admin.patch(f"/admin/keys/{key['id']}", headers=AUTH,
                                   json={"revoked": False}), 400)
    assert err["message"].startswith("revoked:")  # un-revoking is not a thing


@pytest.mark.parametrize("data", [b"{not json", b"", b"null", b'"name"'])
def test_bodies_that_are_not_a_json_object(admin: Any, data: bytes) -> None:
    resp = admin.post("/admin/keys", headers={**AUTH, "Content-Type": "application/json"},
                      data=data)
    assert _error_shape(resp, 400)["message"].startswith("body:")


def test_a_large_body_is_413(admin: Any) -> None:
    resp = admin.post("/admin/keys", headers=AUTH,
                      json={"name": "n", "metadata": {"x": "y" * 70_000}})
    assert _error_shape(resp, 413)["type"] == "request_too_large"


def test_unknown_keys_and_routes_are_404(admin: Any, audit: AuditRecords) -> None:
    secret = _create(admin)["key"]
    for method in ("GET", "PATCH", "DELETE"):
        resp = admin.open("/admin/keys/key_0123456789abcdef", method=method, headers=AUTH,
                          json={"team": "t"})
        assert _error_shape(resp, 404)["type"] == "not_found_error"
    # a secret pasted where an id goes is neither echoed nor logged
    resp = admin.get(f"/admin/keys/{secret}", headers=AUTH)
    assert _error_shape(resp, 404) and secret not in resp.get_data(as_text=True)
    resp = admin.get(f"/admin/{secret}", headers=AUTH)
    assert _error_shape(resp, 404) and secret not in resp.get_data(as_text=True)
    assert secret not in audit.text()
    assert [r["path"] for r in audit.records[-2:]] == ["/admin/keys/<invalid id>",
                                                      "/admin/<unknown>"]


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("PUT", "/admin/keys", "GET, POST"), ("DELETE", "/admin/keys", "GET, POST"),
    ("POST", "/admin/keys/key_0123456789abcdef", "GET, PATCH, DELETE"),
    ("PUT", "/admin/keys/key_0123456789abcdef", "GET, PATCH, DELETE")])
def test_wrong_methods_are_405_with_allow(admin: Any, method: str, path: str,
                                          allow: str) -> None:
    resp = admin.open(path, method=method, headers=AUTH, json={"name": "n"})
    _error_shape(resp, 405)
    assert resp.headers["Allow"] == allow
    assert admin.open(path, method=method, json={}).status_code == 401  # auth comes first


def test_database_down_is_503(make_app: Callable[..., Any], tmp_path: Path,
                              audit: AuditRecords) -> None:
    (tmp_path / "keys.db").mkdir()  # SQLite cannot open a directory: the database is "down"
    app = make_app({"auth": {"admin_token": TOKEN,
                             "database_url": f"sqlite:///{tmp_path / 'keys.db'}"}})
    client = app.test_client()  # start-up survived: the error was logged, not raised
    for method, path in (("GET", "/admin/keys"), ("POST", "/admin/keys"),
                         ("GET", "/admin/keys/key_0123456789abcdef")):
        resp = client.open(path, method=method, headers=AUTH, json={"name": "n"})
        assert _error_shape(resp, 503)["type"] == "database_unavailable"
        assert resp.headers["Retry-After"] == "1"
    assert [r["outcome"] for r in audit.records if "outcome" in r] == ["error"] * 3


def test_admin_on_postgres(make_app: Callable[..., Any], postgres_url: str,
                           audit: AuditRecords) -> None:
    app = make_app({"auth": {"admin_token": TOKEN, "database_url": postgres_url}})
    client = app.test_client()
    created = client.post("/admin/keys", headers=AUTH, json={"name": "pg", "team": "t"})
    assert created.status_code == 201
    key_id = created.get_json()["id"]
    assert client.get(f"/admin/keys/{key_id}", headers=AUTH).get_json()["team"] == "t"
    assert client.delete(f"/admin/keys/{key_id}", headers=AUTH).get_json()["revoked"]
    store = get_state(app).key_store
    assert store is not None and store.backend == "postgresql"
    assert postgres_url.split("@")[0].split(":")[-1] not in audit.text()  # the password
    store.close()
