"""Helpers for the packaging tests: a copy of the tracked tree, fresh virtualenvs, a server.

This directory has no ``__init__.py`` on purpose: as a package it would be named
``packaging`` and shadow the library of that name (which pytest and gunicorn import).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import PROVIDERS, REPO_ROOT
from fake_upstream import FakeUpstream
from services import in_ci, require_binary

# The first start in a fresh virtualenv compiles every module it imports.
READY_TIMEOUT = 60.0
PIP_TIMEOUT = 600.0
STOP_TIMEOUT = 30.0


def copy_tracked(dest: Path) -> Path:
    """Copy the files git tracks (as a deployment would get them) to ``dest``."""
    git = require_binary("git")
    proc = subprocess.run([git, "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True,
                          timeout=60)
    if proc.returncode != 0:
        message = f"not a git checkout: {proc.stderr.decode(errors='replace').strip()}"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    for name in filter(None, proc.stdout.decode().split("\0")):
        source = REPO_ROOT / name
        if source.is_file():  # a tracked file deleted in the work tree is not deployed
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without what would point a child at the test setup."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LLMPROXY_", "PYTHON", "PROMETHEUS_", "GUNICORN_"))
           and not k.endswith("_API_KEY")
           and k not in ("VIRTUAL_ENV", "BIND", "WEB_CONCURRENCY", "PORT")}
    env.update(extra or {})
    return env


def pip(*args: str | Path) -> None:
    """Run this interpreter's pip (with its cache) and fail the test with pip's output."""
    proc = subprocess.run([sys.executable, "-m", "pip", *map(str, args)], capture_output=True,
                          text=True, timeout=PIP_TIMEOUT, env=_clean_env())
    assert proc.returncode == 0, f"pip {' '.join(map(str, args))} failed:\n" \
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def fresh_venv(path: Path) -> Path:
    """A new virtualenv without pip or setuptools (pip runs from outside with --python), so
    nothing the app needs can come from them. Returns its bin directory."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True,
                   timeout=120, env=_clean_env())
    return path / "bin"


def probe(python: Path, code: str, cwd: Path) -> list[str]:
    """Run ``code`` in another interpreter; its printed lines."""
    proc = subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def server_env(venv_bin: Path, fake: FakeUpstream, port: int) -> dict[str, str]:
    """What a platform would set: PORT, the venv first on PATH; providers at the fake."""
    env = _clean_env({
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "PORT": str(port),
        "WEB_CONCURRENCY": "1",
        "LOG_LEVEL": "info",
        "LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
        "GRACEFUL_TIMEOUT": "5",
    })
    for name in PROVIDERS:
        env[f"LLMPROXY_{name.upper()}_BASE_URL"] = fake.url
    return env


class Server:
    """A server command started in its own session, its output in a log file."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, port: int) -> None:
        self.proc = proc
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"

    def log_text(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def json_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def wait_ready(self) -> requests.Response:
        """The first 200 from /health; fails if the process exits or the deadline passes."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode} at start-up:\n"
                            + self.log_text())
            try:
                resp = requests.get(self.url + "/health", timeout=2)
                if resp.status_code == 200:
                    return resp
            except requests.RequestException:  # not listening yet, or the worker booting
                pass
            time.sleep(0.1)  # polling another process for readiness: no event to await
        pytest.fail(f"server not ready within {READY_TIMEOUT}s:\n" + self.log_text())

    def stop(self) -> int | None:
        """SIGTERM to the server process itself; its return code (None if it had to be
        killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        else:
            return self.proc.returncode
        self.kill_group()
        return None

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(5)


@contextmanager
def running(command: list[str], cwd: Path, env: Mapping[str, str],
            log_path: Path) -> Iterator[Server]:
    """Start ``command``, wait for /health, and stop it (and anything it left) afterwards."""
    port = int(env["PORT"])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=cwd, env=dict(env), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(proc, log_path, port)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        server.kill_group()  # workers a failed master may have left behind


def check_proxied_calls(url: str, fake: FakeUpstream) -> None:
    """A JSON and a streamed chat completion reach the fake upstream and come back whole."""
    headers = {"Authorization": "Bearer sk-packaging-test"}
    body: dict[str, Any] = {"model": "fake-model-1",
                            "messages": [{"role": "user", "content": "hi"}]}
    resp = requests.post(f"{url}/openai/v1/chat/completions", json=body, headers=headers,
                         timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == fake.scenario.text
    assert fake.last.target == "/v1/chat/completions"
    assert fake.last.header("Authorization") == "Bearer sk-packaging-test"

    resp = requests.post(f"{url}/openai/v1/chat/completions", json={**body, "stream": True},
                         headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    contents = [json.loads(line[len("data: "):])["choices"][0]["delta"].get("content", "")
                for line in resp.text.splitlines()
                if line.startswith("data: {")]
    assert "".join(contents) == fake.scenario.text
    assert resp.text.rstrip().endswith("data: [DONE]")
    assert len(fake.requests) == 2


def config_record(server: Server) -> dict[str, Any]:
    """The start-up line naming the configuration directory (exactly one: one worker)."""
    found = [r for r in server.json_lines() if r.get("message") == "config directory"]
    assert len(found) == 1, server.log_text()
    assert found[0]["level"] == "info" and found[0]["logger"].startswith("llmproxy")
    return found[0]
