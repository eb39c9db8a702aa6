"""Where the YAML files come from: $LLMPROXY_CONFIG_DIR, then ./configs, then the package."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO_ROOT

from llmproxy.config import ConfigDir, ConfigError, config_dir, load_raw

pytestmark = pytest.mark.packaging


def config_tree(path: Path, origin: str) -> Path:
    path.mkdir(parents=True)
    (path / "base.yml").write_text(f"origin: {origin}\n")
    return path


def test_environment_variable_comes_first(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config_tree(tmp_path / "cwd" / "configs", "cwd")
    chosen = config_tree(tmp_path / "chosen", "env")
    monkeypatch.chdir(tmp_path / "cwd")
    env = {"LLMPROXY_CONFIG_DIR": str(chosen)}
    assert config_dir(env) == ConfigDir(chosen.resolve(), "LLMPROXY_CONFIG_DIR")
    assert load_raw(environ=env) == {"origin": "env"}


def test_missing_environment_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        config_dir({"LLMPROXY_CONFIG_DIR": str(tmp_path / "absent")})
    assert err.value.key == "LLMPROXY_CONFIG_DIR"
    assert str(err.value) == ("invalid config: LLMPROXY_CONFIG_DIR: not a directory: "
                              f"{tmp_path / 'absent'}")


def test_configs_in_the_current_directory_come_next(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    local = config_tree(tmp_path / "configs", "cwd")
    monkeypatch.chdir(tmp_path)
    assert config_dir({}) == ConfigDir(local.resolve(), "./configs")
    assert load_raw(environ={}) == {"origin": "cwd"}


def test_a_configs_directory_without_base_yml_is_not_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "settings.json").write_text("{}")  # someone else's configs/
    monkeypatch.chdir(tmp_path)
    assert config_dir({}).source == "packaged"


def test_the_packaged_copy_comes_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    found = config_dir({})
    # In a checkout the packaged copy is configs/ itself (pyproject maps it into the wheel).
    assert found == ConfigDir(REPO_ROOT / "configs", "packaged")
    assert load_raw(environ={})["providers"]["openai"]["base_url"] == "https://api.openai.com"
