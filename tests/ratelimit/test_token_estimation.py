"""Smoke tests of scripts/token_estimation.py (offline path, and the API path on a stub)."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "token_estimation.py"


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("token_estimation", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "token_estimation", module)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def test_offline_run_reports_the_configured_estimate(script: ModuleType, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yml"
    config.write_text("features:\n  rate_limiting:\n    estimation:\n      chars_per_token: 4\n"
                      "      provider_chars_per_token: {openai: 2.5}\n")
    out = tmp_path / "rows.csv"
    assert script.main(["--config", str(config), "--csv", str(out), "--repeat", "3"]) == 0
    rows = list(csv.DictReader(out.open()))
    openai = [r for r in rows if r["source"] == "estimate/openai"]
    gemini = [r for r in rows if r["source"] == "estimate/gemini"]
    assert len(openai) == len(script.SAMPLES) == len(gemini)
    for r in openai:
        assert int(r["tokens"]) == math.ceil(int(r["chars"]) / 2.5)
    for r in gemini:
        assert int(r["tokens"]) == math.ceil(int(r["chars"]) / 4)
    assert "estimate/openai" in capsys.readouterr().out


def test_api_counts_through_the_proxy_minus_message_overhead(
        script: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, str]]] = []

    def fake_post(url: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
        calls.append((url, headers))
        text = body["messages"][0]["content"]
        return {"input_tokens": -(-len(text) // 3) + 7}  # 7 tokens of framing per message

    monkeypatch.setattr(script, "_post", fake_post)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    counters, skipped = script.api_counters("http://127.0.0.1:9/")
    assert list(counters) == ["api/anthropic"] and len(skipped) == 2
    count = script.without_overhead(counters["api/anthropic"])
    assert count("x" * 300) == 100
    assert calls[0][0] == "http://127.0.0.1:9/anthropic/v1/messages/count_tokens"
    assert calls[0][1]["x-api-key"] == "sk-ant-test"
