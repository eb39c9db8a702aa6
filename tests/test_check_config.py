"""``python -m llmproxy check-config`` refuses exactly what the app refuses, with its message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from llmproxy import create_app
from llmproxy.config import ConfigError

# One invalid value per section of the settings tree.
BAD_SECTIONS = {
    "server": "server: {max_body_bytes: 0}",
    "upstream": "upstream: {read_timeout: soon}",
    "providers": "providers: {openai: {base_url: 'ftp://x'}}",
    "cors": "cors: {origins: 5}",
    "logging": "logging: {format: xml}",
    "metrics": "metrics: {max_models: many}",
    "usage_records": "usage_records: {backups: -1}",
    "pricing": "pricing: {openai: {models: {m: {input: cheap, output: 1}}}}",
    "features.rate_limiting": "features: {rate_limiting: {backend: memcached}}",
    "telemetry": "telemetry: {protocol: carrier-pigeon}",
    "auth": "auth: {mode: open}",
    "budgets": "budgets: {unpriced: maybe}",
}


@pytest.mark.parametrize("section", sorted(BAD_SECTIONS))
def test_check_config_fails_like_the_app(section: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(BAD_SECTIONS[section] + "\n")
    monkeypatch.setenv("LLMPROXY_CONFIG", str(bad))
    with pytest.raises(ConfigError) as err:
        create_app()
    assert err.value.key.startswith(section)
    proc = subprocess.run([sys.executable, "-m", "llmproxy", "check-config"], cwd=REPO_ROOT,
                          env=dict(os.environ, LLMPROXY_CONFIG=str(bad)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip() == str(err.value)
