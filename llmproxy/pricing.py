"""Estimated cost of a request in USD, from its reported usage and the ``pricing`` table.

Prices are USD per million tokens, per provider route name (``openai``, ``anthropic``,
``gemini``, ...). A model is found by its exact name, then an alias, then by removing a
dated-snapshot suffix (``gpt-4o-2024-08-06`` -> ``gpt-4o``, ``claude-sonnet-4-20250514`` ->
``claude-sonnet-4``, ``gemini-2.0-flash-001`` -> ``gemini-2.0-flash``). Nothing else is
guessed: a model that does not resolve, or a response without usage, costs ``None``.
Model names come from clients, so a lookup is bounded: a name longer than
:data:`MAX_MODEL_CHARS` is never priced, and at most :data:`_MAX_STRIPS` suffixes are removed.

Token counts are first normalised by the provider's dialect (``Dialect.normalized_tokens``):
input is the whole prompt, cached and cache-written tokens included, which are then billed at
their own prices; output includes reasoning.
"""

from __future__ import annotations

import re

from .config import ModelPrice, PricingSettings
from .exchange import Exchange, Usage
from .providers import DIALECTS, Dialect

PER_TOKENS = 1_000_000

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


#: No priced model name comes near this; longer ones (from request bodies) cost None at once.
MAX_MODEL_CHARS = 256
# The longest real chain is two steps (gemini-2.5-flash-preview-09-2025 -> ...-preview ->
# gemini-2.5-flash); without a bound, "x-001-001-..." would take one pass per suffix over an
# ever shorter copy of the name: quadratic in its length.
_MAX_STRIPS = 4
_FOUND_CACHE_SIZE = 4096
_NOT_CACHED = object()


class PricingTable:
    """Model prices per provider, with alias and snapshot resolution."""

    def __init__(self, settings: PricingSettings) -> None:
        self._models = settings.models
        self._aliases = settings.aliases
        self.as_of = settings.as_of
        # (provider, model) -> answer of lookup(): the suffix-stripping regexes then run once
        # per model name, not once per request. Names come from clients, so it is bounded.
        self._found: dict[tuple[str, str], ModelPrice | None] = {}

    def known_names(self, provider: str) -> frozenset[str]:
        """Model names and aliases listed for ``provider`` (exact names only)."""
        return frozenset(self._models.get(provider, {})) | frozenset(
            self._aliases.get(provider, {}))

    def lookup(self, provider: str | None, model: str | None) -> ModelPrice | None:
        """The price entry for ``model`` at ``provider``, or ``None`` when not listed."""
        if not provider or not model or len(model) > MAX_MODEL_CHARS:
            return None
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
        for _ in range(_MAX_STRIPS + 1):
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
        return None

    def cost(self, provider: str | None, model: str | None, usage: Usage,
             dialect: Dialect) -> float | None:
        """USD for ``usage`` of ``model`` at ``provider``, or None when either is unknown."""
        price = self.lookup(provider, model)
        if price is None:
            return None
        if usage.input_tokens is None and usage.output_tokens is None:
            return None  # nothing reported (error, aborted before usage): unknown, not zero
        tokens = dialect.normalized_tokens(usage)
        cached, written = tokens["cached"], tokens["cache_creation"]
        uncached = max(tokens["input"] - cached - written, 0)
        rates = price.rates_for(tokens["input"])
        dollars = (uncached * rates.input + cached * rates.cached_input
                   + written * rates.cache_write + tokens["output"] * rates.output) / PER_TOKENS
        return round(dollars, 10)

    def price_exchange(self, ex: Exchange) -> None:
        """The first terminal-event listener: ``ex.cost_usd``, computed once for every other.

        The model the response names (a dated snapshot, what was billed) wins over the one
        requested, when it is priced; free token-counting calls cost 0.
        """
        dialect = DIALECTS.get(ex.dialect or "")
        if dialect is None:  # not a provider call
            return
        if dialect.is_token_count(ex.upstream_path.partition("?")[0].rstrip("/")) \
                and ex.status is not None and ex.status < 400:
            ex.cost_usd = 0.0
        else:
            ex.cost_usd = self.cost(ex.provider, ex.meta.model or ex.model, ex.meta.usage,
                                    dialect)
            if ex.cost_usd is None and ex.meta.model and ex.model \
                    and ex.meta.model != ex.model:
                # a name the table does not know (a new snapshot): the one asked for
                ex.cost_usd = self.cost(ex.provider, ex.model, ex.meta.usage, dialect)
