"""Static checks of what the wheel and the platform files declare (fast; no installs)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from conftest import REPO_ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from llmproxy import gunicorn_conf

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest brings tomli to Python 3.10
    import tomli as tomllib

pytestmark = pytest.mark.packaging

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
HOOKS = ("on_starting", "child_exit", "on_exit", "post_fork")


def test_every_package_under_llmproxy_is_listed() -> None:
    setuptools = PYPROJECT["tool"]["setuptools"]
    on_disk = {".".join(path.parent.relative_to(REPO_ROOT).parts)
               for path in (REPO_ROOT / "llmproxy").rglob("*.py")
               if "__pycache__" not in path.parts}
    listed = set(setuptools["packages"])
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - on_disk == {"llmproxy.configs"}
    assert setuptools["package-dir"] == {"llmproxy.configs": "configs"}


def test_requirements_pin_what_pyproject_asks_for() -> None:
    pins: dict[str, Version] = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"not pinned: {line}"
            pins[canonicalize_name(req.name)] = Version(spec.version)
    for dependency in PYPROJECT["project"]["dependencies"]:
        req = Requirement(dependency)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements.txt: run make requirements"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"requirements.txt pins {name}=={pins[name]}, pyproject asks {req}: " \
            "run make requirements"


def gunicorn_config(location: str) -> Any:
    """The settings gunicorn reads from a ``-c`` location, read the way gunicorn does."""
    from gunicorn.app.base import Application

    class ConfigOnly(Application):
        def init(self, parser: Any, opts: Any, args: Any) -> None:
            return None

        def load_config(self) -> None:
            self.load_config_from_module_name_or_filename(location)

        def load(self) -> None:
            raise AssertionError("only the configuration is read")

    try:
        return ConfigOnly().cfg
    finally:
        sys.modules.pop("__config__", None)  # where gunicorn executes a config file


@pytest.mark.parametrize("location", ["gunicorn.conf.py", "python:llmproxy.gunicorn_conf"])
def test_gunicorn_takes_settings_and_hooks_from_both_config_forms(location: str) -> None:
    cfg = gunicorn_config(location if location.startswith("python:")
                          else str(REPO_ROOT / location))
    assert cfg.worker_class_str == "gevent"
    assert cfg.preload_app is False
    assert cfg.accesslog is None
    for hook in HOOKS:  # hooks imported into gunicorn.conf.py count as defined there
        assert getattr(cfg, hook) is getattr(gunicorn_conf, hook), hook


def test_gunicorn_conf_imports_nothing_heavy() -> None:
    code = ("import sys, llmproxy.gunicorn_conf; "
            "print(sorted(m for m in ('ssl', 'requests', 'flask', 'gevent', 'yaml') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=REPO_ROOT, check=True).stdout
    assert out.strip() == "[]"
