"""The pricing table: model resolution and cost arithmetic per dialect, on the shipped table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmproxy.config import ConfigError, parse_pricing
from llmproxy.exchange import Exchange, ResponseMeta, Usage
from llmproxy.pricing import PricingTable
from llmproxy.providers import DIALECTS

PRICING_FILE = Path(__file__).resolve().parents[1] / "configs" / "pricing.yml"
M = 1_000_000


@pytest.fixture(scope="module")
def raw_table() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(PRICING_FILE.read_text())["pricing"]
    return data


@pytest.fixture(scope="module")
def table(raw_table: dict[str, Any]) -> PricingTable:
    return table_of(raw_table)


def table_of(raw: dict[str, Any]) -> PricingTable:
    return PricingTable(parse_pricing({"pricing": raw}))


def cost_usd(table: PricingTable, provider: str | None, model: str | None, usage: Usage,
             dialect: str | None = None) -> float | None:
    return table.cost(provider, model, usage,
                      DIALECTS.get(dialect or provider or "", DIALECTS["openai"]))


def entry(raw: dict[str, Any], provider: str, model: str) -> dict[str, Any]:
    e: dict[str, Any] = raw[provider]["models"][model]
    return e


def test_shipped_table_covers_the_three_providers(table: PricingTable,
                                                  raw_table: dict[str, Any]) -> None:
    for provider in ("openai", "anthropic", "gemini"):
        names = table.known_names(provider)
        assert len(names) >= 5
        for name in raw_table[provider]["models"]:
            assert table.lookup(provider, name) is not None


@pytest.mark.parametrize(("provider", "reported", "family"), [
    ("openai", "gpt-4o-2024-08-06", "gpt-4o"),
    ("openai", "gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("openai", "gpt-4.1-2025-04-14", "gpt-4.1"),
    ("openai", "gpt-5-chat-latest", "gpt-5"),  # alias
    ("anthropic", "claude-sonnet-4-20250514", "claude-sonnet-4"),
    ("anthropic", "claude-opus-4-1-20250805", "claude-opus-4-1"),
    ("anthropic", "claude-haiku-4-5-20251001", "claude-haiku-4-5"),
    ("anthropic", "claude-3-7-sonnet-latest", "claude-3-7-sonnet"),
    ("anthropic", "claude-opus-4-0", "claude-opus-4"),  # alias
    ("gemini", "gemini-2.0-flash-001", "gemini-2.0-flash"),
    ("gemini", "models/gemini-2.5-pro", "gemini-2.5-pro"),
    ("gemini", "gemini-2.5-flash-preview-05-20", "gemini-2.5-flash"),
    ("gemini", "gemini-2.5-flash-lite-preview-09-2025", "gemini-2.5-flash-lite"),
    ("gemini", "gemini-3-pro-preview", "gemini-3-pro-preview"),
])
def test_snapshots_and_aliases_resolve_to_their_family(table: PricingTable, provider: str,
                                                       reported: str, family: str) -> None:
    found = table.lookup(provider, reported)
    assert found is not None
    assert found == table.lookup(provider, family)


def test_a_listed_snapshot_keeps_its_own_price(table: PricingTable,
                                               raw_table: dict[str, Any]) -> None:
    old = table.lookup("openai", "gpt-4o-2024-05-13")
    assert old is not None
    assert old.base.input == entry(raw_table, "openai", "gpt-4o-2024-05-13")["input"]
    assert old.base.input != entry(raw_table, "openai", "gpt-4o")["input"]


@pytest.mark.parametrize(("provider", "model"), [
    ("openai", "gpt-4o-mini-tts"),  # a prefix of a priced name is not that model
    ("openai", "gpt-4o-realtime-preview-2024-12-17"),
    ("openai", "gpt-3.5-turbo-0613"),  # old snapshots were priced differently: no guess
    ("gemini", "gemini-2.0-flash-exp"),  # experimental models are not their family
    ("openai", "claude-sonnet-4"),  # prices belong to the provider that bills them
    ("groq", "llama-3.3-70b-versatile"),  # provider without a table
    ("openai", None),
    (None, "gpt-4o"),
])
def test_unknown_models_are_not_guessed(table: PricingTable, provider: str | None,
                                        model: str | None) -> None:
    assert table.lookup(provider, model) is None
    assert cost_usd(table, provider, model, Usage(input_tokens=10, output_tokens=10)) is None


def test_openai_cost_splits_cached_input(table: PricingTable, raw_table: dict[str, Any]) -> None:
    p = entry(raw_table, "openai", "gpt-4o")
    usage = Usage(input_tokens=12_000, output_tokens=800, cached_tokens=2_000,
                  reasoning_tokens=300, total_tokens=12_800)
    expected = (10_000 * p["input"] + 2_000 * p["cached_input"] + 800 * p["output"]) / M
    assert cost_usd(table, "openai", "gpt-4o-2024-08-06", usage) == pytest.approx(expected)


def test_anthropic_cost_adds_cache_reads_and_writes(table: PricingTable,
                                                    raw_table: dict[str, Any]) -> None:
    p = entry(raw_table, "anthropic", "claude-haiku-4-5")
    # Anthropic's input_tokens leaves out cache reads and writes: they are billed on top.
    usage = Usage(input_tokens=1_000, output_tokens=500, cached_tokens=4_000,
                  cache_creation_tokens=2_000)
    expected = (1_000 * p["input"] + 4_000 * p["cached_input"] + 2_000 * p["cache_write"]
                + 500 * p["output"]) / M
    assert cost_usd(table, "anthropic", "claude-haiku-4-5-20251001", usage) == pytest.approx(
        expected)


def test_gemini_cost_counts_cached_inside_input(table: PricingTable,
                                               raw_table: dict[str, Any]) -> None:
    p = entry(raw_table, "gemini", "gemini-2.5-flash")
    # The parser already adds thoughtsTokenCount to output_tokens: reasoning is not added again.
    usage = Usage(input_tokens=3_000, output_tokens=1_000, cached_tokens=1_000,
                  reasoning_tokens=600)
    expected = (2_000 * p["input"] + 1_000 * p["cached_input"] + 1_000 * p["output"]) / M
    assert cost_usd(table, "gemini", "gemini-2.5-flash", usage) == pytest.approx(expected)


@pytest.mark.parametrize(("provider", "model", "prompt"), [
    ("gemini", "gemini-2.5-pro", "input_tokens"),
    ("anthropic", "claude-sonnet-4-5", "cached_tokens"),
])
def test_long_prompts_are_billed_at_the_tier_price(table: PricingTable,
                                                   raw_table: dict[str, Any], provider: str,
                                                   model: str, prompt: str) -> None:
    e = entry(raw_table, provider, model)
    tier = e["tiers"][0]
    threshold = tier["above_prompt_tokens"]
    # At the threshold: base prices. One token over: every token at the tier's prices.
    at = Usage(input_tokens=threshold, output_tokens=1_000)
    over = Usage(input_tokens=threshold + 1, output_tokens=1_000)
    assert cost_usd(table, provider, model, at) == pytest.approx(
        (threshold * e["input"] + 1_000 * e["output"]) / M)
    assert cost_usd(table, provider, model, over) == pytest.approx(
        ((threshold + 1) * tier["input"] + 1_000 * tier["output"]) / M)
    if prompt == "cached_tokens":
        # Anthropic counts cache reads into the prompt length that selects the tier.
        mixed = Usage(input_tokens=1_000, cached_tokens=threshold, output_tokens=10)
        assert cost_usd(table, provider, model, mixed) == pytest.approx(
            (1_000 * tier["input"] + threshold * tier["cached_input"] + 10 * tier["output"]) / M)


def test_no_usage_means_unknown_cost_not_zero(table: PricingTable) -> None:
    assert cost_usd(table, "openai", "gpt-4o", Usage()) is None
    assert cost_usd(table, "openai", "gpt-4o", Usage(input_tokens=0, output_tokens=0)) == 0


def test_groq_route_uses_its_own_table_with_openai_semantics() -> None:
    table = table_of({"groq": {"models": {"llama-3.3-70b-versatile": {
        "input": 0.59, "output": 0.79}}}})
    usage = Usage(input_tokens=1_000, output_tokens=1_000, cached_tokens=100)
    # No cached price listed: cached tokens cost the input price.
    assert cost_usd(table, "groq", "llama-3.3-70b-versatile", usage, dialect="openai") == (
        pytest.approx((1_000 * 0.59 + 1_000 * 0.79) / M))


def test_exchange_cost_prefers_the_response_model(
        table: PricingTable, raw_table: dict[str, Any]) -> None:
    ex = Exchange("rid", "POST", "/openai/v1/chat/completions", provider="openai",
                  dialect="openai", model="gpt-4o")
    ex.meta = ResponseMeta(model="gpt-4o-2024-05-13",
                           usage=Usage(input_tokens=1_000, output_tokens=100))
    old = entry(raw_table, "openai", "gpt-4o-2024-05-13")
    expected = (1_000 * old["input"] + 100 * old["output"]) / M
    table.price_exchange(ex)
    assert ex.cost_usd == pytest.approx(expected)


@pytest.mark.parametrize(("raw", "where"), [
    ({"openai": {"models": {"m": {"input": -1, "output": 1}}}}, "openai.models.m.input"),
    ({"openai": {"models": {"m": {"input": 1}}}}, "openai.models.m.output"),
    ({"openai": {"models": {"m": {"input": 1, "output": 1, "typo": 2}}}}, "typo"),
    ({"openai": {"models": {"m": {"input": 1, "output": 1}}, "aliases": {"a": "n"}}},
     "openai.aliases.a"),
    ({"openai": {"models": {"m": {"input": 1, "output": 1, "tiers": [{"input": 2}]}}}},
     "above_prompt_tokens"),
])
def test_malformed_tables_name_the_entry(raw: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        table_of(raw)


def test_lookups_are_remembered_but_not_for_oversized_names(table: PricingTable) -> None:
    first = table.lookup("openai", "gpt-4o-mini-2024-07-18")
    assert first is not None
    assert table.lookup("openai", "gpt-4o-mini-2024-07-18") is first
    assert table.lookup("openai", "no-such-model") is None
    assert table.lookup("openai", "no-such-model") is None  # a remembered miss stays a miss
    held = len(table._found)
    huge = "gpt-4o-mini" + "x" * 2_000_000  # a client can send any model name
    assert table.lookup("openai", huge) is None
    assert len(table._found) == held  # looked up, not kept


@pytest.mark.parametrize("model", [
    "x" + "-001" * 4_000,  # 16 KB of snapshot suffixes: seconds of CPU when stripped one by one
    "gpt-4o" + "-2024-08-06" * 2_000,
    "gemini-2.5-flash" + "-preview" * 3_000,
    "x" * 2_000_000,
])
def test_lookup_of_a_hostile_name_is_cheap(table: PricingTable, model: str) -> None:
    """Clients choose model names: a lookup costs microseconds whatever they send."""
    started = time.perf_counter()
    assert table.lookup("gemini", model) is None
    assert table.lookup("gemini", model[:200]) is None
    assert time.perf_counter() - started < 0.05


def test_names_up_to_the_bound_still_resolve_their_snapshots(table: PricingTable) -> None:
    assert table.lookup("gemini", "gemini-2.5-flash-preview-09-2025") is not None
    assert table.lookup("gemini", "gemini-2.0-flash-001") is not None
    assert table.lookup("openai", "gpt-4o-2024-08-06") is not None
    assert table.lookup("openai", "gpt-4o" + "-2024-08-06" * 2) is not None
