"""Start-up: an invalid configuration stops gunicorn with one line naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT
from services import free_port


def test_invalid_config_stops_startup_with_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("upstream: {read_timeout: soon}\n")
    env = dict(os.environ, PORT=str(free_port()), WEB_CONCURRENCY="1",
               LLMPROXY_CONFIG=str(bad))
    proc = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0  # the master stops instead of respawning workers forever
    lines = [line for line in proc.stderr.splitlines() if "invalid config" in line]
    assert lines == ["llmproxy: invalid config: upstream.read_timeout: must be a number, "
                     "got 'soon'"]
    assert "Traceback" not in proc.stderr


def test_check_config_command(tmp_path: Path) -> None:
    good = subprocess.run([sys.executable, "-m", "llmproxy", "check-config"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, LLMPROXY_CONFIG=""))
    assert good.returncode == 0 and good.stdout.strip() == "config ok"
    bad = tmp_path / "bad.yml"
    bad.write_text("providers: {openai: {base_url: 'ftp://x'}}\n")
    proc = subprocess.run([sys.executable, "-m", "llmproxy", "check-config"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, LLMPROXY_CONFIG=str(bad)))
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("invalid config: providers.openai.base_url: must be an "
                                   "http(s) URL, got 'ftp://x'")
