"""The /admin budget and spend routes in-process (Flask test client), on real SQLite."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from keys.test_admin import AUTH, TOKEN, AuditRecords

from llmproxy.budgets.model import Budget, SpendRow
from llmproxy.keys.store import KeyStore
from llmproxy.state import get_state


@pytest.fixture
def audit() -> Iterator[AuditRecords]:
    handler = AuditRecords()
    logger = logging.getLogger("llmproxy.audit")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
def admin_app(make_app: Callable[..., Any], tmp_path: Path) -> Any:
    return make_app({"auth": {"admin_token": TOKEN,
                              "database_url": f"sqlite:///{tmp_path / 'keys.db'}"}})


@pytest.fixture
def admin(admin_app: Any) -> Any:
    return admin_app.test_client()


@pytest.fixture
def key_store(admin_app: Any) -> KeyStore:
    store = get_state(admin_app).key_store
    assert store is not None
    return store


def _error(resp: Any, status: int) -> str:
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type"}
    return str(body["error"]["message"])


def spend(day: date, key: str = "key_0123456789abcdef", user: str = "alice",
          cost_usd: float = 1.0, model: str = "gpt-4o") -> SpendRow:
    return SpendRow(day=day, key_id=key, user=user, team="ml", model=model,
                    provider="openai", cost_nanos=int(cost_usd * 1e9), requests=1,
                    input_tokens=100, output_tokens=10)


def test_budget_lifecycle(admin: Any, key_store: KeyStore, audit: AuditRecords) -> None:
    assert admin.get("/admin/budgets", headers=AUTH).get_json() == {"budgets": []}
    _error(admin.get("/admin/budgets/user:alice", headers=AUTH), 404)
    resp = admin.put("/admin/budgets/user:alice", headers=AUTH,
                     json={"day": 5, "month": 100.5, "total": None})
    assert resp.status_code == 200
    assert resp.get_json() == {"scope": "user:alice",
                               "budgets": {"day": 5.0, "month": 100.5, "total": None}}
    assert key_store.get_budget("user", "alice") == Budget(day=5.0, month=100.5)
    admin.put("/admin/budgets/team:ml ops", headers=AUTH, json={"total": 1000})
    assert admin.get("/admin/budgets/user:alice", headers=AUTH).get_json()["budgets"] == \
        {"day": 5.0, "month": 100.5, "total": None}
    assert admin.get("/admin/budgets", headers=AUTH).get_json() == {"budgets": [
        {"scope": "team:ml ops", "budgets": {"day": None, "month": None, "total": 1000.0}},
        {"scope": "user:alice", "budgets": {"day": 5.0, "month": 100.5, "total": None}}]}
    resp = admin.put("/admin/budgets/user:alice", headers=AUTH, json={"day": 1})  # replaces
    assert resp.get_json()["budgets"] == {"day": 1.0, "month": None, "total": None}
    resp = admin.delete("/admin/budgets/user:alice", headers=AUTH)
    assert resp.status_code == 200 and resp.get_json() == {"scope": "user:alice",
                                                           "budgets": None}
    assert key_store.get_budget("user", "alice") is None
    actions = [(r["method"], r["action"], r["scope"], r["path"], r["status"])
               for r in audit.records]
    assert actions[:4] == [
        ("GET", "list_budgets", None, "/admin/budgets", 200),
        ("GET", "show_budget", "user:alice", "/admin/budgets/user:alice", 404),
        ("PUT", "set_budget", "user:alice", "/admin/budgets/user:alice", 200),
        ("PUT", "set_budget", "team:ml ops", "/admin/budgets/team:ml ops", 200)]
    assert actions[-1] == ("DELETE", "clear_budget", "user:alice",
                           "/admin/budgets/user:alice", 200)


@pytest.mark.parametrize(("scope", "body", "field"), [
    ("user:alice", {"day": -1}, "day"),
    ("user:alice", {"week": 1}, "week"),
    ("user:alice", {"day": "5"}, "day"),
    ("user:alice", {"total": True}, "total"),
    ("user:alice", {"day": 10**400}, "day"),  # a 401-digit JSON integer
    ("user:alice", {"month": -(10**400)}, "month"),
    ("user:alice", {"total": float("nan")}, "total"),
    ("user:alice", [1], "body"),
    ("key:key_0123456789abcdef", {"day": 1}, "scope"),
    ("alice", {"day": 1}, "scope"),
    ("user:", {"day": 1}, "scope"),
    # names the ledger would store otherwise than the counters key them
    ("team:ml\u200bops", {"day": 1}, "scope"),
    ("team:ml%E2%80%8Bops", {"day": 1}, "scope"),
    ("user:al%C2%85ice", {"day": 1}, "scope"),
    ("user:al%C2%A0ice", {"day": 1}, "scope"),
    ("user:alice%7F", {"day": 1}, "scope"),
    ("team:ml%E2%80%A8ops", {"day": 1}, "scope"),
])
def test_invalid_budgets_are_400_naming_the_field(admin: Any, scope: str, body: Any,
                                                  field: str) -> None:
    message = _error(admin.put(f"/admin/budgets/{scope}", headers=AUTH, json=body), 400)
    assert message.startswith(field + ":")
    assert admin.get("/admin/budgets", headers=AUTH).get_json() == {"budgets": []}


def test_a_secret_pasted_as_a_scope_is_neither_echoed_nor_logged(
        admin: Any, audit: AuditRecords) -> None:
    secret = admin.post("/admin/keys", headers=AUTH, json={"name": "k"}).get_json()["key"]
    resp = admin.put(f"/admin/budgets/user:{secret}", headers=AUTH, json={"day": 1})
    _error(resp, 400)
    assert secret not in resp.get_data(as_text=True) and secret not in audit.text()
    assert audit.records[-1]["path"] == "/admin/budgets/<invalid scope>"


def test_wrong_methods_and_the_token(admin: Any) -> None:
    for method, path, allow in (("POST", "/admin/budgets", "GET"),
                                ("POST", "/admin/budgets/user:a", "GET, PUT, DELETE"),
                                ("PATCH", "/admin/budgets/user:a", "GET, PUT, DELETE"),
                                ("POST", "/admin/spend", "GET")):
        resp = admin.open(path, method=method, headers=AUTH, json={})
        _error(resp, 405)
        assert resp.headers["Allow"] == allow
    for path in ("/admin/budgets", "/admin/budgets/user:a", "/admin/spend"):
        _error(admin.get(path), 401)
    _error(admin.put("/admin/budgets/user:a", json={"day": 1}), 401)


def test_a_key_whose_user_or_team_is_not_printable_is_a_400(admin: Any) -> None:
    for field, value in (("user", "alice\x7f"), ("team", "ml\u200bops"),
                         ("team", "ml\u00a0ops"), ("user", "al\u2028ice")):
        message = _error(admin.post("/admin/keys", headers=AUTH,
                                    json={"name": "k", field: value}), 400)
        assert message.startswith(f"{field}:")
    key = admin.post("/admin/keys", headers=AUTH, json={"name": "k", "team": "ml ops"})
    assert key.status_code == 201
    resp = admin.patch(f"/admin/keys/{key.get_json()['id']}", headers=AUTH,
                       json={"team": "ml\u200bops"})
    assert _error(resp, 400).startswith("team:")
    assert admin.get("/admin/keys", headers=AUTH).get_json()["keys"][0]["team"] == "ml ops"


def test_keys_take_budgets_and_show_their_spend(admin: Any, key_store: KeyStore) -> None:
    resp = admin.post("/admin/keys", headers=AUTH,
                      json={"name": "k", "budgets": {"day": 2, "month": None}})
    assert resp.status_code == 201
    key = resp.get_json()
    assert key["budgets"] == {"day": 2.0, "month": None, "total": None}
    resp = admin.patch(f"/admin/keys/{key['id']}", headers=AUTH,
                       json={"budgets": {"total": 50}})
    assert resp.get_json()["budgets"] == {"day": None, "month": None, "total": 50.0}
    message = _error(admin.patch(f"/admin/keys/{key['id']}", headers=AUTH,
                                 json={"budgets": {"day": -2}}), 400)
    assert message.startswith("budgets.day:")
    huge = {"budgets": {"month": 10**400}}  # a 401-digit JSON integer
    for resp in (admin.patch(f"/admin/keys/{key['id']}", headers=AUTH, json=huge),
                 admin.post("/admin/keys", headers=AUTH, json={"name": "k2", **huge})):
        assert _error(resp, 400).startswith("budgets.month:")

    today = datetime.now(timezone.utc).date()
    earlier = today - timedelta(days=40)  # another month
    key_store.add_spend([spend(today, key["id"], cost_usd=0.25),
                         spend(earlier, key["id"], cost_usd=1.5),
                         spend(today, "key_ffffffffffffffff", cost_usd=9)])
    shown = admin.get(f"/admin/keys/{key['id']}", headers=AUTH).get_json()
    assert shown["spend"] == {"day": 0.25, "month": 0.25, "total": 1.75}
    assert shown["budgets"] == {"day": None, "month": None, "total": 50.0}
    listed = admin.get("/admin/keys", headers=AUTH).get_json()["keys"]
    assert "spend" not in listed[0]  # the listing stays one query
    resp = admin.patch(f"/admin/keys/{key['id']}", headers=AUTH, json={"budgets": None})
    assert resp.get_json()["budgets"] is None


def test_spend_report(admin: Any, key_store: KeyStore) -> None:
    d1, d2, d3 = date(2030, 1, 1), date(2030, 1, 2), date(2030, 1, 3)
    key_store.add_spend([spend(d1, user="alice", cost_usd=1), spend(d2, user="bob", cost_usd=3),
                         spend(d3, user="alice", cost_usd=0.5, model="o3"),
                         spend(d3, user="", cost_usd=2)])
    body = admin.get("/admin/spend?group_by=user", headers=AUTH).get_json()
    assert body == {"group_by": "user", "from": None, "to": None, "rows": [
        {"user": "bob", "cost_usd": 3.0, "requests": 1, "input_tokens": 100,
         "output_tokens": 10},
        {"user": None, "cost_usd": 2.0, "requests": 1, "input_tokens": 100,
         "output_tokens": 10},
        {"user": "alice", "cost_usd": 1.5, "requests": 2, "input_tokens": 200,
         "output_tokens": 20}]}
    body = admin.get("/admin/spend?group_by=model&from=2030-01-02&to=2030-01-03",
                     headers=AUTH).get_json()
    assert (body["from"], body["to"]) == ("2030-01-02", "2030-01-03")
    assert [(r["model"], r["cost_usd"]) for r in body["rows"]] == [("gpt-4o", 5.0),
                                                                   ("o3", 0.5)]
    assert admin.get("/admin/spend?to=2030-01-01", headers=AUTH).get_json()["rows"] == [
        {"key": "key_0123456789abcdef", "cost_usd": 1.0, "requests": 1, "input_tokens": 100,
         "output_tokens": 10}]  # group_by defaults to key


@pytest.mark.parametrize(("query", "field"), [
    ("group_by=day", "group_by"), ("from=2030-13-01", "from"), ("to=tomorrow", "to"),
    ("from=20300101", "from"), ("from=2030-W01-2", "from"), ("to=２０３０-01-01", "to"),
    ("from=2030-01-02&to=2030-01-01", "from")])
def test_bad_spend_queries_are_400(admin: Any, query: str, field: str) -> None:
    assert _error(admin.get(f"/admin/spend?{query}", headers=AUTH), 400).startswith(field)
