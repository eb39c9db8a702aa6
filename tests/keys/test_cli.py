"""``python -m llmproxy keys ...`` against the database named by the settings."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT

from llmproxy.keys import cli
from llmproxy.keys.model import hash_secret
from llmproxy.keys.store import KeyStore


class Run:
    """Runs the CLI in-process; keeps the last exit status, stdout and stderr."""

    def __init__(self) -> None:
        self.status = 0
        self.out = ""
        self.err = ""

    def __call__(self, *argv: str) -> str:
        out, err = io.StringIO(), io.StringIO()
        self.status = cli.main(list(argv), out, err)
        self.out, self.err = out.getvalue(), err.getvalue()
        return self.out

    def json(self, *argv: str) -> Any:
        text = self(*argv, "--json")
        assert self.status == 0, self.err
        return json.loads(text)


@pytest.fixture
def database_url(database_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("LLMPROXY_DATABASE_URL", database_url)
    return database_url


@pytest.fixture
def run(database_url: str) -> Run:
    return Run()


def test_create_prints_the_secret_once_and_stores_its_hash(run: Run, database_url: str) -> None:
    created = run.json("create", "--name", "ci bot", "--user", "alice", "--team", "ml",
                       "--provider", "openai", "--provider", "groq", "--model", "gpt-4o*",
                       "--limit", "requests_per_minute=60", "--limit", "tokens_per_day=100000",
                       "--expires", "2030-01-01T00:00:00Z", "--metadata", '{"ticket": "OPS-1"}')
    secret = created["key"]
    assert secret.startswith("llmp-")
    assert (created["name"], created["user"], created["team"], created["providers"],
            created["models"], created["limits"], created["expires_at"],
            created["metadata"]) == (
        "ci bot", "alice", "ml", ["openai", "groq"], ["gpt-4o*"],
        {"requests_per_minute": 60, "tokens_per_day": 100000}, "2030-01-01T00:00:00+00:00",
        {"ticket": "OPS-1"})
    store = KeyStore.from_url(database_url)
    found = store.lookup(hash_secret(secret))
    assert found is not None and found.id == created["id"]
    store.close()
    for argv in (("list",), ("list", "--json"), ("show", created["id"]),
                 ("show", created["id"], "--json")):
        assert secret not in run(*argv) and run.status == 0


def test_table_output(run: Run) -> None:
    text = run("create", "--name", "laptop")
    assert run.status == 0
    secret = text.split("\n", 1)[0].removeprefix("key: ")
    assert secret.startswith("llmp-") and "shown only now" in text
    table = run("list").splitlines()
    assert table[0].split()[:3] == ["ID", "PREFIX", "NAME"]
    assert len(table) == 2 and "laptop" in table[1] and "active" in table[1]
    assert secret[:12] in table[1] and secret not in table[1]


def test_update_and_clear_fields(run: Run) -> None:
    key_id = run.json("create", "--name", "k", "--user", "u", "--provider", "openai",
                      "--limit", "requests_per_minute=5", "--expires", "2030-01-01")["id"]
    updated = run.json("update", key_id, "--team", "t", "--model", "claude-*",
                       "--name", "renamed")
    assert (updated["team"], updated["models"], updated["name"], updated["user"]) == \
        ("t", ["claude-*"], "renamed", "u")
    cleared = run.json("update", key_id, "--user", "", "--all-providers", "--no-limits",
                       "--expires", "never")
    assert (cleared["user"], cleared["providers"], cleared["limits"], cleared["expires_at"]) \
        == (None, [], {}, None)
    run("update", key_id)
    assert run.status == 2 and "nothing to change" in run.err


def test_revoke_and_list_active(run: Run) -> None:
    a = run.json("create", "--name", "a")["id"]
    b = run.json("create", "--name", "b")["id"]
    assert run.json("revoke", a)["revoked"] is True
    assert "revoked" in run("show", a)
    assert [k["id"] for k in run.json("list", "--active")] == [b]
    assert [k["id"] for k in run.json("list")] == [a, b]


def test_errors_and_exit_statuses(run: Run) -> None:
    run("show", "key_0123456789abcdef")
    assert run.status == 1 and "no key with id 'key_0123456789abcdef'" in run.err
    secret = run.json("create", "--name", "k")["key"]
    run("revoke", secret)  # a secret pasted as an id is not echoed
    assert run.status == 1 and secret not in run.err
    run("create", "--name", "k", "--provider", "cohere")
    assert run.status == 2 and run.err.startswith("llmproxy keys: providers:")
    run("create", "--name", "k", "--metadata", "{oops")
    assert run.status == 2 and "--metadata" in run.err
    run("create", "--name", "k", "--expires", "soon")
    assert run.status == 2 and "expires_at" in run.err
    with pytest.raises(SystemExit) as exit_:
        run("create", "--name", "k", "--limit", "requests_per_hour=5")
    assert exit_.value.code == 2


def test_database_errors_hide_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from services import free_port

    monkeypatch.setenv("LLMPROXY_DATABASE_URL",
                       f"postgresql://u:hunter2-pw@127.0.0.1:{free_port()}/db")
    run = Run()
    run("list")
    assert run.status == 1 and "hunter2-pw" not in run.err and "***" in run.err
    monkeypatch.setenv("LLMPROXY_DATABASE_URL", "mysql://u:hunter2-pw@h/db")
    run("list")
    assert run.status == 2 and "hunter2-pw" not in run.err


def test_migrate(run: Run) -> None:
    assert run.json("migrate") == {"schema_version": 2}
    assert "schema version 2" in run("migrate")


def test_wired_into_python_m_llmproxy(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPROXY_")}
    env["LLMPROXY_DATABASE_URL"] = f"sqlite:///{tmp_path / 'k.db'}"

    def llmproxy(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "llmproxy", *argv], cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True, timeout=60)

    created = llmproxy("keys", "create", "--name", "k", "--json")
    assert created.returncode == 0, created.stderr
    key_id = json.loads(created.stdout)["id"]
    shown = llmproxy("keys", "show", key_id)
    assert shown.returncode == 0 and key_id in shown.stdout
    helped = llmproxy("--help")
    assert helped.returncode == 0 and "keys" in helped.stdout
