"""``python -m llmproxy budgets ...`` and ``spend`` against the database of the settings."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT

from llmproxy.budgets import cli
from llmproxy.budgets.model import Budget, SpendRow
from llmproxy.keys import cli as keys_cli
from llmproxy.keys.store import KeyStore


class Run:
    """Runs a CLI in-process; keeps the last exit status, stdout and stderr."""

    def __init__(self) -> None:
        self.status = 0
        self.out = ""
        self.err = ""

    def __call__(self, *argv: str) -> str:
        out, err = io.StringIO(), io.StringIO()
        main = keys_cli.main if argv[0] == "keys" else cli.main
        self.status = main(list(argv[1:] if argv[0] == "keys" else argv), out, err)
        self.out, self.err = out.getvalue(), err.getvalue()
        return self.out

    def json(self, *argv: str) -> Any:
        text = self(*argv, "--json")
        assert self.status == 0, self.err
        return json.loads(text)


@pytest.fixture
def url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    monkeypatch.setenv("LLMPROXY_DATABASE_URL", url)
    return url


@pytest.fixture
def run(url: str) -> Run:
    return Run()


@pytest.fixture
def store(url: str) -> Any:
    store = KeyStore.from_url(url)
    yield store
    store.close()


def test_budgets_set_show_list_clear(run: Run, store: KeyStore) -> None:
    assert run.json("budgets", "set", "user:alice", "--day", "5", "--month", "100.5") == \
        {"scope": "user:alice", "budgets": {"day": 5.0, "month": 100.5, "total": None}}
    assert store.get_budget("user", "alice") == Budget(day=5.0, month=100.5)
    assert run("budgets", "set", "team:ml", "--total", "1000") == \
        "team:ml  day=-  month=-  total=1000 USD\n"
    assert run("budgets", "show", "user:alice") == \
        "user:alice  day=5 USD  month=100.5 USD  total=-\n"
    assert run.json("budgets", "set", "user:alice", "--total", "7")["budgets"] == \
        {"day": None, "month": None, "total": 7.0}  # set replaces
    assert run.json("budgets", "list") == [
        {"scope": "team:ml", "budgets": {"day": None, "month": None, "total": 1000.0}},
        {"scope": "user:alice", "budgets": {"day": None, "month": None, "total": 7.0}}]
    assert run("budgets", "list").splitlines()[0].startswith("team:ml")
    assert run.json("budgets", "clear", "user:alice")["budgets"] is None
    assert store.get_budget("user", "alice") is None
    run("budgets", "show", "user:alice")
    assert run.status == 1 and "no budget for user:alice" in run.err


def test_budgets_of_a_key(run: Run, store: KeyStore) -> None:
    key, _ = store.create("k")
    assert run.json("budgets", "set", f"key:{key.id}", "--day", "2")["budgets"] == \
        {"day": 2.0, "month": None, "total": None}
    assert store.get(key.id).budgets == Budget(day=2.0)  # type: ignore[union-attr]
    assert f"key:{key.id}  day=2 USD" in run("budgets", "show", f"key:{key.id}")
    run("budgets", "clear", f"key:{key.id}")
    assert run.status == 0 and store.get(key.id).budgets is None  # type: ignore[union-attr]
    run("budgets", "set", "key:key_0123456789abcdef", "--day", "1")
    assert run.status == 1 and "no key with id 'key_0123456789abcdef'" in run.err


def test_budgets_errors(run: Run) -> None:
    run("budgets", "set", "user:alice")
    assert run.status == 2 and "give --day" in run.err
    run("budgets", "set", "user:alice", "--day", "-1")
    assert run.status == 2 and "--day:" in run.err
    run("budgets", "set", "user:alice", "--day", "9" * 400)
    assert run.status == 2 and "--day:" in run.err
    run("budgets", "set", "team:ml\u200bops", "--day", "1")
    assert run.status == 2 and "scope:" in run.err
    run("budgets", "set", "org:x", "--day", "1")
    assert run.status == 2 and "scope:" in run.err
    secret = "llmp-" + "s3cret" * 7
    run("budgets", "set", f"key:{secret}", "--day", "1")
    assert run.status == 1 and secret not in run.err
    run("budgets", "show", f"user:{secret}")
    assert run.status == 2 and secret not in run.err


def test_keys_create_and_update_take_budgets(run: Run) -> None:
    created = run.json("keys", "create", "--name", "k", "--budget-day", "1.5",
                       "--budget-total", "20")
    assert created["budgets"] == {"day": 1.5, "month": None, "total": 20.0}
    updated = run.json("keys", "update", created["id"], "--budget-month", "9")
    assert updated["budgets"] == {"day": 1.5, "month": 9.0, "total": 20.0}  # others kept
    updated = run.json("keys", "update", created["id"], "--budget-day", "",
                       "--budget-total", "")
    assert updated["budgets"] == {"day": None, "month": 9.0, "total": None}
    run("keys", "update", created["id"], "--budget-month", "")
    assert run.status == 0 and "budgets" in run.out
    assert run.json("keys", "show", created["id"])["budgets"] is None
    run("keys", "create", "--name", "k", "--budget-day", "lots")
    assert run.status == 2 and "--budget-day" in run.err
    run("keys", "create", "--name", "k", "--budget-day", "-3")
    assert run.status == 2 and "budgets.day" in run.err
    run("keys", "create", "--name", "k", "--budget-day", "9" * 400)
    assert run.status == 2 and "budgets.day" in run.err


def _ledger(store: KeyStore) -> None:
    def spend(day: int, user: str, cost_usd: float) -> SpendRow:
        return SpendRow(day=date(2030, 1, day), key_id="key_0123456789abcdef", user=user,
                        team="ml", model="gpt-4o", provider="openai",
                        cost_nanos=int(cost_usd * 1e9), requests=1, input_tokens=100,
                        output_tokens=10)

    store.add_spend([spend(1, "alice", 1.0), spend(2, "bob", 3.0), spend(3, "alice", 0.5)])


def test_spend_table_and_json(run: Run, store: KeyStore) -> None:
    _ledger(store)
    table = run("spend", "--group-by", "user").splitlines()
    assert run.status == 0
    assert table[0].split() == ["USER", "COST", "USD", "REQUESTS", "INPUT", "TOKENS",
                                "OUTPUT", "TOKENS"]
    assert [line.split()[:3] for line in table[1:]] == [["bob", "3.000000", "1"],
                                                         ["alice", "1.500000", "2"]]
    body = run.json("spend", "--group-by", "user", "--from", "2030-01-02", "--to",
                    "2030-01-03")
    assert (body["group_by"], body["from"], body["to"]) == ("user", "2030-01-02",
                                                            "2030-01-03")
    assert [(r["user"], r["cost_usd"]) for r in body["rows"]] == [("bob", 3.0),
                                                                  ("alice", 0.5)]
    assert run.json("spend")["rows"] == [{"key": "key_0123456789abcdef", "cost_usd": 4.5,
                                          "requests": 3, "input_tokens": 300,
                                          "output_tokens": 30}]
    run("spend", "--from", "2030-01-03", "--to", "2030-01-01")
    assert run.status == 2 and "--from" in run.err
    for argv in (("spend", "--group-by", "day"), ("spend", "--from", "20300101"),
                 ("spend", "--from", "2030-W01-2")):
        with pytest.raises(SystemExit) as exit_:
            run(*argv)
        assert exit_.value.code == 2


def test_wired_into_python_m_llmproxy(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPROXY_")}
    env["LLMPROXY_DATABASE_URL"] = f"sqlite:///{tmp_path / 'k.db'}"

    def llmproxy(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "llmproxy", *argv], cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True, timeout=60)

    done = llmproxy("budgets", "set", "team:ml", "--month", "50", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["budgets"]["month"] == 50.0
    shown = llmproxy("spend", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["rows"] == []
    helped = llmproxy("--help")
    assert "budgets" in helped.stdout and "spend" in helped.stdout
