"""Version, git commit and build time, as recorded by ``make build``."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

__version__ = "0.1.0"
BUILD_FILE = Path(__file__).resolve().parent / "_build.json"


def write(path: Path = BUILD_FILE) -> dict[str, str]:
    """Record the current git commit and the time now (called by ``make build``)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
            text=True, check=True, cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        if dirty:
            commit += "-dirty"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    info = {
        "git_commit": commit,
        "build_time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    path.write_text(json.dumps(info) + "\n", encoding="utf-8")
    get.cache_clear()
    return info


@lru_cache(maxsize=1)
def get() -> dict[str, str]:
    """What ``make build`` recorded; ``unknown`` for values never recorded."""
    info = {"version": __version__, "git_commit": "unknown", "build_time": "unknown"}
    try:
        recorded = json.loads(BUILD_FILE.read_text(encoding="utf-8"))
        info.update({k: str(recorded[k]) for k in ("git_commit", "build_time") if k in recorded})
    except (OSError, ValueError):
        pass
    return info


def describe() -> str:
    info = get()
    return f"llmproxy {info['version']} (commit {info['git_commit']}, built {info['build_time']})"
