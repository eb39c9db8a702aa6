"""The providers' own keys: read at start-up when auth.mode needs them, never shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmproxy.config import ConfigError, Secret, build_settings, load_raw

ALL_KEYS = {"OPENAI_API_KEY": "sk-openai-server", "ANTHROPIC_API_KEY": "sk-ant-server",
            "GEMINI_API_KEY": "AIza-server", "GROQ_API_KEY": "gsk-server"}


def settings(overrides: dict[str, Any], environ: dict[str, str]) -> Any:
    return build_settings(load_raw(overrides, environ=environ), environ=environ)


def test_passthrough_reads_no_provider_key() -> None:
    s = settings({}, dict(ALL_KEYS))
    assert s.providers["openai"].api_key_env == "OPENAI_API_KEY"
    assert all(p.api_key is None for p in s.providers.values())
    # ... so a missing one is no error either.
    assert settings({}, {}).providers["openai"].api_key is None


@pytest.mark.parametrize("mode", ["keys", "mixed"])
def test_keys_and_mixed_read_them_from_the_environment(mode: str) -> None:
    s = settings({"auth": {"mode": mode}}, dict(ALL_KEYS))
    assert s.providers["openai"].api_key == Secret("sk-openai-server")
    assert s.providers["anthropic"].api_key.reveal() == "sk-ant-server"


def test_a_missing_variable_names_the_setting_not_a_value() -> None:
    env = {k: v for k, v in ALL_KEYS.items() if k != "ANTHROPIC_API_KEY"}
    with pytest.raises(ConfigError) as err:
        settings({"auth": {"mode": "keys"}}, env)
    assert err.value.key == "providers.anthropic.api_key_env"
    assert "ANTHROPIC_API_KEY is not set" in str(err.value)
    assert not any(v in str(err.value) for v in ALL_KEYS.values())


def test_a_provider_can_do_without_a_key() -> None:
    env = {k: v for k, v in ALL_KEYS.items() if k != "GROQ_API_KEY"}
    s = settings({"auth": {"mode": "keys"}, "providers": {"groq": {"api_key_env": None}}}, env)
    assert s.providers["groq"].api_key is None


def test_a_mounted_file_wins_over_the_variable(tmp_path: Path) -> None:
    secret = tmp_path / "openai_key"
    secret.write_text("sk-from-the-file\n")
    s = settings({"auth": {"mode": "mixed"},
                  "providers": {"openai": {"api_key_file": str(secret)}}}, dict(ALL_KEYS))
    assert s.providers["openai"].api_key == Secret("sk-from-the-file")


@pytest.mark.parametrize(("content", "problem"), [
    (None, "cannot read"), ("", "is empty"), ("sk-a\nsk-b", "whitespace or control"),
])
def test_an_unusable_file_is_a_clear_error(tmp_path: Path, content: str | None,
                                           problem: str) -> None:
    path = tmp_path / "key"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        settings({"auth": {"mode": "keys"}, "providers": {"openai": {"api_key_file": str(path)}}},
                 dict(ALL_KEYS))
    assert err.value.key == "providers.openai.api_key_file"
    assert problem in str(err.value)
    assert "sk-a" not in str(err.value)


@pytest.mark.parametrize(("spec", "key"), [
    ({"api_key_env": "not a name"}, "providers.openai.api_key_env"),
    ({"api_key_env": 5}, "providers.openai.api_key_env"),
    ({"api_key_file": ""}, "providers.openai.api_key_file"),
    ({"api_key": "sk-inline"}, "providers.openai.api_key"),  # keys never go in config files
])
def test_invalid_provider_key_settings(spec: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings({"providers": {"openai": spec}}, {})
    assert err.value.key == key


def test_the_key_never_shows_in_a_repr() -> None:
    s = settings({"auth": {"mode": "keys"}}, dict(ALL_KEYS))
    text = repr(s) + str(s.providers["openai"]) + f"{s.providers['openai'].api_key}"
    assert not any(v in text for v in ALL_KEYS.values())
