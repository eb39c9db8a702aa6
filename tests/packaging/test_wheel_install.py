"""The built wheel, installed into a fresh virtualenv without test extras, serves from any
directory with ``llmproxy serve`` and the configuration it carries."""

from __future__ import annotations

import zipfile
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


def check_wheel_contents(wheel: Path, source: Path) -> None:
    """Every tracked file of the package is in the wheel, and configs/ as llmproxy/configs."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        missing = sorted(
            str(path.relative_to(source)) for path in (source / "llmproxy").rglob("*")
            if path.is_file() and str(path.relative_to(source)) not in names)
        assert not missing, f"not in the wheel: {missing}"
        configs = sorted(p for p in (source / "configs").iterdir() if p.is_file())
        assert configs
        for path in configs:
            assert zf.read(f"llmproxy/configs/{path.name}") == path.read_bytes(), path.name


def test_wheel_serves_from_any_directory(tmp_path: Path, fake_upstream: FakeUpstream) -> None:
    source = copy_tracked(tmp_path / "source")
    dist = tmp_path / "dist"
    pip("wheel", "--no-deps", "--wheel-dir", dist, source)
    (wheel,) = dist.glob("llmproxy-*.whl")
    check_wheel_contents(wheel, source)

    venv = tmp_path / "venv"
    bin_dir = fresh_venv(venv)
    pip("--python", bin_dir / "python", "install", wheel)

    elsewhere = tmp_path / "elsewhere"  # no configs/, no source tree
    elsewhere.mkdir()
    package_file, pytest_missing = probe(
        bin_dir / "python",
        "import importlib.util, llmproxy; print(llmproxy.__file__); "
        "print(importlib.util.find_spec('pytest') is None)", elsewhere)
    assert Path(package_file).is_relative_to(venv)
    assert pytest_missing == "True"  # no test extras: the app must not need them

    env = server_env(bin_dir, fake_upstream, free_port())
    with running([str(bin_dir / "llmproxy"), "serve"], elsewhere, env,
                 tmp_path / "serve.log") as server:
        health = requests.get(server.url + "/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "healthy"
        check_proxied_calls(server.url, fake_upstream)
        record = config_record(server)
        assert record["config_source"] == "packaged"
        assert Path(record["config_dir"]).is_relative_to(venv)
        # `serve` became gunicorn (exec): SIGTERM to the started process is a clean stop
        assert server.stop() == 0, server.log_text()
