"""Shared fixtures: the fake upstream, the real proxy under gunicorn, a redis-server, and the
in-process app."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
# The helpers beside this file import as top-level modules whether or not tests/ is a package,
# and the in-process tests import the working tree's llmproxy, however it was installed.
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(1, str(REPO_ROOT))
from fake_upstream import FakeUpstream  # noqa: E402
from pg_server import PostgresServer, find_binary  # noqa: E402
from services import RedisServer, free_port, in_ci  # noqa: E402

PROVIDERS = ("openai", "anthropic", "gemini", "groq")
READY_TIMEOUT = 20.0

# Test clients talk to loopback only; never route them through a proxy from the environment.
os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"


def new_request_id() -> str:
    return "test-" + uuid.uuid4().hex


def deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# -- fake upstream -----------------------------------------------------------------------

@pytest.fixture(scope="session")
def fake_upstream_server() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture
def fake_upstream(fake_upstream_server: FakeUpstream) -> Iterator[FakeUpstream]:
    """The session's fake upstream with a clean slate for this test."""
    fake_upstream_server.reset()
    yield fake_upstream_server
    fake_upstream_server.reset()


# -- the real proxy ----------------------------------------------------------------------

class ProxyProcess:
    """The proxy running under gunicorn in a subprocess, with its log captured to a file."""

    def __init__(self, log_path: Path, env: dict[str, str], port: int) -> None:
        self.log_path = log_path
        self.env = env
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ProxyProcess:
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child, closed in stop()
        self._log_file = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"proxy exited with {self.proc.returncode} at start-up:\n"
                            + self.log_text())
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:  # not listening yet, or workers still booting
                pass
            time.sleep(0.05)  # polling another process for readiness: no event to await
        self.stop()
        pytest.fail(f"proxy not ready within {READY_TIMEOUT}s:\n" + self.log_text())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """Ask gunicorn to shut down gracefully (stop() waits for it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if getattr(self, "_log_file", None) is not None:
            self._log_file.close()

    # -- logs -------------------------------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def log_lines(self) -> list[str]:
        return self.log_text().splitlines()

    def json_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_lines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    out.append(obj)
        return out

    def records(self) -> list[dict[str, Any]]:
        """The per-request log records (those with request_id and outcome)."""
        return [r for r in self.json_lines() if "request_id" in r and "outcome" in r]

    def records_for(self, request_id: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("request_id") == request_id]

    def wait_record(self, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The one log record of ``request_id``, written at the request's end."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.records_for(request_id)
            if found:
                # Give a duplicate (a second terminal event) a moment to show up, then check.
                time.sleep(0.05)
                found = self.records_for(request_id)
                assert len(found) == 1, f"expected one record for {request_id}, got {found}"
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no log record for {request_id} within {timeout}s; "
                                     f"log tail:\n" + "\n".join(self.log_lines()[-30:]))
            time.sleep(0.02)  # the log is written by another process: poll the file


ProxyFactory = Callable[..., ProxyProcess]


def _proxy_env(fake: FakeUpstream, port: int, workers: int,
               config_path: Path | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LLMPROXY_") and not k.endswith("_API_KEY")}
    env.update({
        "PORT": str(port),
        "WEB_CONCURRENCY": str(workers),
        "LOG_LEVEL": "info",
        "LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
        "GRACEFUL_TIMEOUT": "5",  # keep teardown short when a test leaves a stream open
    })
    for name in PROVIDERS:
        env[f"LLMPROXY_{name.upper()}_BASE_URL"] = fake.url
    if config_path is not None:
        env["LLMPROXY_CONFIG"] = str(config_path)
    env.update(extra or {})
    return env


def _make_proxy(tmp: Path, fake: FakeUpstream, config: Mapping[str, Any] | None,
                workers: int, env: Mapping[str, str] | None) -> ProxyProcess:
    tmp.mkdir(parents=True, exist_ok=True)
    config_path = None
    if config:
        config_path = tmp / "llmproxy-test.yml"
        config_path.write_text(yaml.safe_dump(dict(config)))
    port = free_port()
    return ProxyProcess(tmp / "proxy.log", _proxy_env(fake, port, workers, config_path, env),
                        port).start()


class ProxyLauncher:
    """Starts proxies in front of the session's fake upstream; stops them on close()."""

    def __init__(self, fake: FakeUpstream, tmp: pytest.TempPathFactory) -> None:
        self.fake = fake
        self.tmp = tmp
        self.started: list[ProxyProcess] = []

    def __call__(self, config: Mapping[str, Any] | None = None, workers: int = 2,
                 env: Mapping[str, str] | None = None) -> ProxyProcess:
        proc = _make_proxy(self.tmp.mktemp("proxy"), self.fake, config, workers, env)
        self.started.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.started:  # all at once: each may wait out its graceful timeout
            proc.terminate()
        for proc in self.started:
            proc.stop()


@pytest.fixture(scope="session")
def proxy_launcher(fake_upstream_server: FakeUpstream,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyLauncher]:
    """Session-wide factory: proxy_launcher(config=None, workers=2, env=None)."""
    launcher = ProxyLauncher(fake_upstream_server, tmp_path_factory)
    yield launcher
    launcher.close()


@pytest.fixture(scope="session")
def _shared_proxy(proxy_launcher: ProxyLauncher) -> ProxyProcess:
    return proxy_launcher()


@pytest.fixture
def proxy(_shared_proxy: ProxyProcess, fake_upstream: FakeUpstream) -> Iterator[ProxyProcess]:
    """The shared proxy (default config, 2 workers) in front of a freshly reset fake upstream."""
    if not _shared_proxy.alive():
        pytest.fail("the shared proxy died:\n" + "\n".join(_shared_proxy.log_lines()[-40:]))
    yield _shared_proxy
    assert _shared_proxy.alive(), "the proxy process died during the test"


@pytest.fixture
def start_proxy(fake_upstream: FakeUpstream, tmp_path: Path) -> Iterator[ProxyFactory]:
    """Factory for this test only: start_proxy(config=None, workers=2, env=None)."""
    started: list[ProxyProcess] = []

    def factory(config: Mapping[str, Any] | None = None, workers: int = 2,
                env: Mapping[str, str] | None = None) -> ProxyProcess:
        proc = _make_proxy(tmp_path / f"proxy{len(started)}", fake_upstream, config, workers,
                           env)
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        proc.terminate()
    for proc in started:
        proc.stop()


# -- redis-server --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session (skipped without the binary, failed under CI=true)."""
    server = RedisServer.required(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture
def redis_server(redis_session: RedisServer) -> Iterator[RedisServer]:
    """The session's redis-server, running and empty (restarted if a test killed it)."""
    if not redis_session.alive():
        redis_session.start()
    client = redis_session.client()
    client.flushall()
    client.close()
    yield redis_session
    if not redis_session.alive():
        redis_session.start()


# -- in-process Flask app ----------------------------------------------------------------

@pytest.fixture
def make_app(fake_upstream: FakeUpstream) -> Callable[..., Any]:
    """Factory: make_app(config=None) builds the app, providers pointed at the fake upstream."""
    from llmproxy import create_app

    def factory(config: Mapping[str, Any] | None = None) -> Any:
        base: dict[str, Any] = {"providers": {name: {"base_url": fake_upstream.url}
                                              for name in PROVIDERS}}
        app = create_app(deep_merge(base, config or {}))
        app.config["TESTING"] = True
        return app

    return factory


@pytest.fixture
def app(make_app: Callable[..., Any]) -> Any:
    return make_app()


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


# ------------------------------------------------ PostgreSQL (key database, budgets ledger)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:  # `-m "not postgres"` deselects every test that starts the server
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("database_url") if callspec is not None else None
        if "postgres_session" in getattr(item, "fixturenames", ()) or backend == "postgresql":
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def postgres_session() -> Iterator[PostgresServer]:
    """A PostgreSQL server of our own; skipped without initdb/pg_ctl (fails under CI=true)."""
    initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        message = "PostgreSQL (initdb, pg_ctl) is not installed"
        if in_ci():
            pytest.fail(f"{message} (required under CI=true)")
        pytest.skip(message)
    server = PostgresServer(initdb, pg_ctl).start()
    yield server
    server.remove()


@pytest.fixture
def postgres(postgres_session: PostgresServer) -> Iterator[PostgresServer]:
    """The session's PostgreSQL, running (restarted if a test stopped it)."""
    if not postgres_session.alive():
        postgres_session.start()
    yield postgres_session
    if not postgres_session.alive():
        postgres_session.start()


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh, empty database of the session's server, dropped afterwards."""
    name = postgres.create_database()
    yield postgres.url(name)
    if postgres.alive():
        postgres.drop_database(name)
