"""Estimated cost of a request in USD, from its reported usage and the ``pricing`` table.

Prices are USD per million tokens, per provider route name (``openai``, ``anthropic``,
``gemini``, ...). A model is found by its exact name, then an alias, then by removing a
dated-snapshot suffix (``gpt-4o-2024-08-06`` -> ``gpt-4o``, ``claude-sonnet-4-20250514`` ->
``claude-sonnet-4``, ``gemini-2.0-flash-001`` -> ``gemini-2.0-flash``). Nothing else is
guessed: a model that does not resolve, or a response without usage, costs ``None``.

Token counts mean what llmproxy/parsers.py says: ``output_tokens`` includes reasoning for
every provider; ``cached_tokens`` is part of ``input_tokens`` for OpenAI and Gemini, but for
Anthropic ``input_tokens`` excludes both cache reads (``cached_tokens``) and cache writes
(``cache_creation_tokens``), which are billed on top at their own prices.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import ConfigError
from .exchange import Exchange
from .usage import Usage

PER_TOKENS = 1_000_000
_PRICE_KEYS = ("input", "output", "cached_input", "cache_write")

# Suffixes that name a dated snapshot or a release channel of the same model, removed one
# step at a time until a priced name is found. Only these: a model is never matched by prefix
# (``gpt-4o-mini-tts`` is not ``gpt-4o-mini``), and experimental names are never stripped.
_SNAPSHOT_SUFFIXES = (
    (re.compile(r"-\d{4}-\d{2}-\d{2}$"), ""),  # OpenAI: gpt-4o-2024-08-06
    (re.compile(r"-\d{8}$"), ""),  # Anthropic: claude-sonnet-4-20250514
    (re.compile(r"(-preview)-\d{2}-\d{2,4}$"), r"\1"),  # Gemini: ...-preview-09-2025
    (re.compile(r"-preview$"), ""),  # gemini-2.5-flash-preview -> gemini-2.5-flash
    (re.compile(r"-\d{3}$"), ""),  # Gemini stable revisions: gemini-2.0-flash-001
    (re.compile(r"-latest$"), ""),  # claude-3-7-sonnet-latest
)


class PricingError(ConfigError):
    """The pricing table is malformed; the message names the entry."""


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens for one prompt-length band."""

    input: float
    output: float
    cached_input: float
    cache_write: float


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A model's base rates and, where the provider prices by prompt length, higher bands."""

    name: str
    base: Rates
    tiers: tuple[tuple[int, Rates], ...] = ()  # (above_prompt_tokens, rates), ascending

    def rates_for(self, prompt_tokens: int) -> Rates:
        rates = self.base
        for threshold, tier in self.tiers:
            if prompt_tokens > threshold:
                rates = tier
        return rates


def _price(entry: Mapping[str, Any], key: str, where: str, default: float | None) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise PricingError(f"pricing.{where}.{key}", f"must be a number >= 0, got {value!r}")
    return float(value)


def _rates(entry: Mapping[str, Any], where: str, inherit: Rates | None) -> Rates:
    unknown = set(entry) - set(_PRICE_KEYS) - {"tiers", "above_prompt_tokens"}
    if unknown:
        raise PricingError(f"pricing.{where}", f"unknown keys {sorted(unknown)}")
    input_ = _price(entry, "input", where, inherit.input if inherit else None)
    output = _price(entry, "output", where, inherit.output if inherit else None)
    # Without a discount listed, cached and cache-write tokens cost the input price.
    cached = _price(entry, "cached_input", where, inherit.cached_input if inherit else input_)
    write = _price(entry, "cache_write", where, inherit.cache_write if inherit else input_)
    return Rates(input_, output, cached, write)


def _model(name: str, entry: Any, where: str) -> ModelPrice:
    if not isinstance(entry, Mapping):
        raise PricingError(f"pricing.{where}", "must be a mapping of prices")
    base = _rates(entry, where, None)
    tiers = []
    for i, tier in enumerate(entry.get("tiers") or ()):
        tier_where = f"{where}.tiers[{i}]"
        if not isinstance(tier, Mapping):
            raise PricingError(f"pricing.{tier_where}", "must be a mapping")
        threshold = tier.get("above_prompt_tokens")
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise PricingError(f"pricing.{tier_where}.above_prompt_tokens",
                               "must be an integer")
        tiers.append((threshold, _rates(tier, tier_where, base)))
    return ModelPrice(name, base, tuple(sorted(tiers, key=lambda t: t[0])))


_FOUND_CACHE_SIZE = 4096
_CACHED_NAME_MAX = 256  # longer model names (from request bodies) are looked up uncached
_NOT_CACHED = object()


class PricingTable:
    """Model prices per provider, with alias and snapshot resolution."""

    def __init__(self, raw: Mapping[str, Any] | None) -> None:
        self._models: dict[str, dict[str, ModelPrice]] = {}
        self._aliases: dict[str, dict[str, str]] = {}
        # (provider, model) -> answer of lookup(): the suffix-stripping regexes then run once
        # per model name, not once per request. Names come from clients, so it is bounded.
        self._found: dict[tuple[str, str], ModelPrice | None] = {}
        self.as_of: str | None = None
        for provider, spec in (raw or {}).items():
            if provider == "as_of":
                self.as_of = str(spec)
                continue
            if spec is None:
                continue
            if not isinstance(spec, Mapping):
                raise PricingError(f"pricing.{provider}", "must be a mapping with models")
            models = {
                str(name): _model(str(name), entry, f"{provider}.models.{name}")
                for name, entry in (spec.get("models") or {}).items()
            }
            aliases = {str(a): str(t) for a, t in (spec.get("aliases") or {}).items()}
            for alias, target in aliases.items():
                if target not in models:
                    raise PricingError(f"pricing.{provider}.aliases.{alias}",
                                       f"unknown model {target!r}")
            self._models[str(provider)] = models
            self._aliases[str(provider)] = aliases

    def known_names(self, provider: str) -> frozenset[str]:
        """Model names and aliases listed for ``provider`` (exact names only)."""
        return frozenset(self._models.get(provider, {})) | frozenset(
            self._aliases.get(provider, {}))

    def lookup(self, provider: str | None, model: str | None) -> ModelPrice | None:
        """The price entry for ``model`` at ``provider``, or ``None`` when not listed."""
        if not provider or not model:
            return None
        if len(model) > _CACHED_NAME_MAX:  # a client's oversized name: not worth keeping
            return self._search(provider, model)
        key = (provider, model)
        found = self._found.get(key, _NOT_CACHED)
        if found is _NOT_CACHED:
            found = self._search(provider, model)
            if len(self._found) >= _FOUND_CACHE_SIZE:
                self._found.clear()
            self._found[key] = found
        return found  # type: ignore[return-value]

    def _search(self, provider: str, model: str) -> ModelPrice | None:
        models = self._models.get(provider)
        if not models:
            return None
        aliases = self._aliases[provider]
        name = model.strip()
        if name.startswith("models/"):  # Gemini reports "models/gemini-2.5-pro" in places
            name = name[len("models/"):]
        while True:
            if name in models:
                return models[name]
            if name in aliases:
                return models[aliases[name]]
            for pattern, replacement in _SNAPSHOT_SUFFIXES:
                shorter = pattern.sub(replacement, name)
                if shorter != name:
                    name = shorter
                    break
            else:
                return None

    def cost(self, provider: str | None, model: str | None, usage: Usage,
             dialect: str | None = None) -> float | None:
        price = self.lookup(provider, model)
        if price is None:
            return None
        return _cost(price, usage, dialect or provider or "openai")


def normalized_tokens(usage: Usage, dialect: str | None) -> dict[str, int]:
    """Token counts with one meaning across dialects (the metric ``kind`` label).

    ``input`` is the whole prompt (cached and cache-written tokens included), ``output``
    everything generated (reasoning included); ``cached``, ``cache_creation`` and
    ``reasoning`` are parts of those. Counts not reported are 0. Only Anthropic reports
    cache reads and writes outside ``input_tokens``.
    """
    input_ = usage.input_tokens or 0
    output = usage.output_tokens or 0
    cached = usage.cached_tokens or 0
    written = usage.cache_creation_tokens or 0
    reasoning = usage.reasoning_tokens or 0
    if dialect == "anthropic":
        input_ += cached + written
    return {"input": input_, "output": output, "cached": min(cached, input_),
            "cache_creation": written, "reasoning": reasoning}


def _cost(price: ModelPrice, usage: Usage, dialect: str) -> float | None:
    if usage.input_tokens is None and usage.output_tokens is None:
        return None  # nothing reported (error, aborted before usage): unknown, not zero
    tokens = normalized_tokens(usage, dialect)
    cached, written = tokens["cached"], tokens["cache_creation"]
    uncached = max(tokens["input"] - cached - written, 0)
    rates = price.rates_for(tokens["input"])
    dollars = (uncached * rates.input + cached * rates.cached_input
               + written * rates.cache_write + tokens["output"] * rates.output) / PER_TOKENS
    return round(dollars, 10)


def cost_usd(pricing: PricingTable, provider: str | None, model: str | None, usage: Usage,
             dialect: str | None = None) -> float | None:
    """Estimated USD cost of one response, or ``None`` when the model or usage is unknown.

    ``dialect`` defaults to ``provider`` (right for openai, anthropic and gemini routes);
    pass it for other routes, e.g. ``groq`` speaks ``openai``.
    """
    return pricing.cost(provider, model, usage, dialect)


def is_token_count(ex: Exchange) -> bool:
    """Anthropic ``/messages/count_tokens`` and Gemini ``:countTokens``: free, and their
    ``input_tokens`` is a measurement, not usage."""
    path = ex.upstream_path.partition("?")[0]
    return path.endswith("/count_tokens") or path.endswith(":countTokens")


def exchange_cost(pricing: PricingTable, ex: Exchange) -> float | None:
    """The exchange's cost, computed once and kept in ``ex.extras["cost_usd"]``.

    The model the response names (a dated snapshot, what was billed) wins over the one
    requested.
    """
    if "cost_usd" not in ex.extras:
        if is_token_count(ex) and ex.status is not None and ex.status < 400:
            ex.extras["cost_usd"] = 0.0
        else:
            ex.extras["cost_usd"] = pricing.cost(ex.provider, ex.meta.model or ex.model,
                                                 ex.meta.usage, ex.dialect)
    cost: float | None = ex.extras["cost_usd"]
    return cost
