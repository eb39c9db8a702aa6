"""Budgets and the spend ledger in KeyStore, against real SQLite and a real PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import date

import pytest
import sqlalchemy as sa

from llmproxy.budgets.model import Budget, SpendRow
from llmproxy.keys.model import KeyValidationError
from llmproxy.keys.store import KeyStore, KeyStoreError

StoreFactory = Callable[[], KeyStore]
D1, D2, D3 = date(2030, 1, 31), date(2030, 2, 1), date(2030, 2, 2)


def row(day: date = D2, key: str = "key_a", user: str = "alice", team: str = "ml",
        model: str = "gpt-4o", provider: str = "openai", cost: int = 1000, requests: int = 1,
        inputs: int = 10, outputs: int = 5) -> SpendRow:
    return SpendRow(day=day, key_id=key, user=user, team=team, model=model, provider=provider,
                    cost_nanos=cost, requests=requests, input_tokens=inputs,
                    output_tokens=outputs)


def test_budgets_set_get_list_delete(store: KeyStore) -> None:
    assert store.get_budget("user", "alice") is None and store.budgets() == {}
    store.set_budget("user", "alice", Budget(day=5.0))
    store.set_budget("team", "ml", Budget(month=100.0, total=1000.0))
    store.set_budget("user", "alice", Budget(day=6.5, total=50.0))  # replaces
    assert store.get_budget("user", "alice") == Budget(day=6.5, total=50.0)
    assert store.get_budget("team", "alice") is None
    assert store.budgets() == {("team", "ml"): Budget(month=100.0, total=1000.0),
                               ("user", "alice"): Budget(day=6.5, total=50.0)}
    store.set_budget("user", "alice", None)
    store.set_budget("team", "ml", Budget())  # no limit in any window: none
    assert store.budgets() == {}


def test_budgets_are_one_query(store: KeyStore) -> None:
    store.set_budget("user", "a", Budget(day=1))
    store.set_budget("team", "b", Budget(day=2))
    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute",
                    lambda conn, cursor, stmt, *a: statements.append(stmt))
    assert len(store.budgets()) == 2
    assert len(statements) == 1


@pytest.mark.parametrize(("kind", "name"), [("key", "key_0123456789abcdef"), ("org", "x"),
                                            ("user", ""), ("team", "a\nb")])
def test_budget_scopes_are_checked(store: KeyStore, kind: str, name: str) -> None:
    with pytest.raises(KeyValidationError):
        store.set_budget(kind, name, Budget(day=1))


def test_add_spend_sums_rows_of_the_same_identity(store: KeyStore) -> None:
    store.add_spend([row(cost=100), row(cost=50, requests=2, inputs=1, outputs=1),
                     row(model="o3", cost=7)])
    store.add_spend([row(cost=1), row(day=D3, cost=3)])
    store.add_spend([])
    assert store.spend_rows("model", None, None) == [
        {"model": "gpt-4o", "cost_usd": 154e-9, "requests": 5, "input_tokens": 31,
         "output_tokens": 16},
        {"model": "o3", "cost_usd": 7e-9, "requests": 1, "input_tokens": 10,
         "output_tokens": 5}]
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM llmproxy_spend")).scalar() == 3


def test_spent_by_scope_and_since(store: KeyStore) -> None:
    store.add_spend([row(day=D1, cost=1), row(day=D2, cost=10), row(day=D3, cost=100),
                     row(day=D3, key="key_b", user="bob", cost=1000),
                     row(day=D3, key="key_c", user="", team="", cost=10_000)])
    assert store.spent("key", "key_a", None) == 111
    assert store.spent("key", "key_a", D2) == 110
    assert store.spent("user", "alice", D3) == 100
    assert store.spent("team", "ml", None) == 1111
    assert store.spent("team", "ml", D3) == 1100
    assert store.spent("user", "nobody", None) == 0
    with pytest.raises(ValueError):
        store.spent("model", "gpt-4o", None)


def test_spent_is_one_query_on_the_scope_index(store: KeyStore) -> None:
    store.add_spend([row()])
    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute",
                    lambda conn, cursor, stmt, *a: statements.append(stmt))
    store.spent("team", "ml", D1)
    assert len(statements) == 1 and "team_name" in statements[0]
    if store.backend == "sqlite":  # the plan names the index (PostgreSQL's needs more rows)
        with store.engine.connect() as conn:
            plan = " ".join(str(r) for r in conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + statements[0], (0, "ml", D1.isoformat())))
        assert "llmproxy_spend_team_day" in plan


def test_spend_summary_day_month_total(store: KeyStore) -> None:
    store.add_spend([row(day=D1, cost=1), row(day=D2, cost=10), row(day=D3, cost=100),
                     row(day=D3, user="bob", cost=1000)])
    assert store.spend_summary("user", "alice", D3) == {"day": 100, "month": 110,
                                                        "total": 111}
    assert store.spend_summary("key", "key_a", D1) == {"day": 1, "month": 1, "total": 1111}
    assert store.spend_summary("team", "none", D3) == {"day": 0, "month": 0, "total": 0}


def test_spend_rows_grouped_ranged_and_sorted(store: KeyStore) -> None:
    store.add_spend([row(day=D1, cost=5), row(day=D2, user="bob", cost=30),
                     row(day=D3, user="", cost=20, provider="anthropic", model="claude")])
    assert [(r["user"], r["cost_usd"]) for r in store.spend_rows("user", None, None)] == \
        [("bob", 30e-9), (None, 20e-9), ("alice", 5e-9)]
    assert [r["provider"] for r in store.spend_rows("provider", D2, D3)] == \
        ["openai", "anthropic"]
    assert store.spend_rows("key", D2, D2) == [
        {"key": "key_a", "cost_usd": 30e-9, "requests": 1, "input_tokens": 10,
         "output_tokens": 5}]
    assert store.spend_rows("team", D3 + (D3 - D2), None) == []
    with pytest.raises(ValueError):
        store.spend_rows("day", None, None)


def test_concurrent_adds_to_the_same_rows_lose_nothing(make_store: StoreFactory) -> None:
    """Four stores (one pool each, like four worker processes) add to the same two rows."""
    stores = [make_store() for _ in range(4)]
    stores[0].migrate()
    rounds = 25
    start = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def run(store: KeyStore, n: int) -> None:
        start.wait()
        try:
            for _ in range(rounds):
                # both rows in every batch, in opposite orders: the store orders them
                batch = [row(cost=n), row(day=D3, cost=1)]
                store.add_spend(batch if n % 2 else batch[::-1])
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s, n)) for n, s in enumerate(stores, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert stores[0].spent("key", "key_a", D2) == rounds * (1 + 2 + 3 + 4) + rounds * len(stores)
    assert stores[0].spend_summary("key", "key_a", D2)["day"] == rounds * (1 + 2 + 3 + 4)
    assert stores[0].spend_summary("key", "key_a", D3)["day"] == rounds * len(stores)
    requests = {r["model"]: r["requests"] for r in stores[0].spend_rows("model", None, None)}
    assert requests == {"gpt-4o": rounds * len(stores) * 2}


def test_a_database_failure_is_a_keystore_error(tmp_path: object) -> None:
    from services import free_port

    store = KeyStore.from_url(f"postgresql://u:pw@127.0.0.1:{free_port()}/db", timeout=2)
    for call in (lambda: store.add_spend([row()]), lambda: store.spent("key", "k", None),
                 lambda: store.budgets(), lambda: store.set_budget("user", "u", Budget(day=1)),
                 lambda: store.spend_rows("key", None, None)):
        with pytest.raises(KeyStoreError):
            call()
    store.close()
