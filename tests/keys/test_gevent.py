"""A slow PostgreSQL query does not stall the other greenlets of a gevent worker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT

PROBE = Path(__file__).with_name("gevent_probe.py")


def _probe(url: str, call: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(PROBE), url, call], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_pg_sleep_lets_other_greenlets_run_and_query(postgres_url: str) -> None:
    result = _probe(postgres_url, "pg_sleep")
    assert result["slow"] >= 1.0
    # another greenlet looked a key up through the same engine while pg_sleep(1) ran
    assert result["lookup"] < result["slow"] - 0.3, result
    # and the hub kept scheduling: no gap near the query's second (generous for a busy box)
    assert result["max_gap"] < 0.3, result


@pytest.mark.parametrize("call", ["blocking"])
def test_the_probe_sees_a_stall(postgres_url: str, call: str) -> None:
    """The control: a call that blocks the process shows up as a gap and a late lookup."""
    result = _probe(postgres_url, call)
    assert result["max_gap"] >= 0.9, result
    assert result["lookup"] >= result["slow"], result
