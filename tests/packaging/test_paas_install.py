"""A classic WSGI platform: a fresh virtualenv from requirements.txt alone, the tracked files
copied elsewhere, and the Procfile's web command run there with PORT set."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from deploy_helpers import (
    check_proxied_calls,
    config_record,
    copy_tracked,
    fresh_venv,
    pip,
    probe,
    running,
    server_env,
)
from fake_upstream import FakeUpstream
from services import free_port

pytestmark = [pytest.mark.packaging, pytest.mark.e2e]


def procfile_command(procfile: Path, process: str) -> str:
    for line in procfile.read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() == process:
            return command.strip()
    raise AssertionError(f"no {process!r} process in {procfile}")


def test_requirements_and_procfile_serve_like_a_platform(tmp_path: Path,
                                                          fake_upstream: FakeUpstream) -> None:
    app_dir = copy_tracked(tmp_path / "app")
    bin_dir = fresh_venv(tmp_path / "venv")
    pip("--python", bin_dir / "python", "install", "-r", app_dir / "requirements.txt")
    # Only the pinned dependencies are installed: the proxy runs from the copied tree.
    assert probe(bin_dir / "python",
                 "import importlib.util as u; "
                 "print(u.find_spec('llmproxy') is None, u.find_spec('pytest') is None)",
                 tmp_path) == ["True True"]

    web = procfile_command(app_dir / "Procfile", "web")
    env = server_env(bin_dir, fake_upstream, free_port())
    # Platforms run the line with a shell (which expands $PORT); exec makes the server the
    # process that gets the platform's SIGTERM.
    with running(["sh", "-c", f"exec {web}"], app_dir, env, tmp_path / "web.log") as server:
        health = requests.get(server.url + "/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "healthy"
        check_proxied_calls(server.url, fake_upstream)
        record = config_record(server)
        assert record["config_source"] == "./configs"
        assert Path(record["config_dir"]) == (app_dir / "configs").resolve()
        assert server.stop() == 0, server.log_text()
