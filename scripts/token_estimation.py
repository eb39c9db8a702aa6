#!/usr/bin/env python3
"""Measure tokens per 1,000 characters, to set ``estimation.provider_chars_per_token``.

Counts the same sample texts (prose, code, JSON, numbers, German, Chinese) with every counter
available and prints a table, a summary with the suggested ``provider_chars_per_token`` and,
with ``--csv``, the raw rows:

- ``estimate/<provider>``: what the proxy's rate limiter estimates today (always available);
- ``tiktoken/<encoding>``: a local tokenizer, offline, when the ``tiktoken`` package and its
  encoding files are installed (OpenAI models);
- ``api/<provider>``: the providers' own token counters through a running proxy (``--proxy``),
  for each provider whose key is set: ``OPENAI_API_KEY`` (``/v1/responses/input_tokens``),
  ``ANTHROPIC_API_KEY`` (``/v1/messages/count_tokens``), ``GEMINI_API_KEY`` (``:countTokens``).
  Counting calls are not billed as generation. The fixed per-message overhead is measured on a
  one-character text and subtracted.

Usage::

    python scripts/token_estimation.py [--config configs/base.yml] [--csv out.csv|-]
                                       [--proxy http://127.0.0.1:9002] [--repeat 20]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

SAMPLES: dict[str, str] = {
    "prose": (
        "The proxy forwards each request to the provider and streams the answer back as it "
        "arrives. Teams put it in front of their language model APIs to see who uses what, "
        "and to stop a runaway script from spending the whole monthly budget in an afternoon. "
    ),
    "code": (
        "def fibonacci(n: int) -> list[int]:\n    seq = [0, 1]\n    while len(seq) < n:\n"
        "        seq.append(seq[-1] + seq[-2])\n    return seq[:n]\n\n"
        "for i, value in enumerate(fibonacci(20)):\n    print(f\"{i:>3} {value}\")\n"
    ),
    "json": json.dumps({"user": {"id": 4711, "name": "Ada", "roles": ["admin", "dev"],
                                 "settings": {"theme": "dark", "limits": [10, 20, 30]}},
                        "items": [{"sku": f"A-{i:04d}", "qty": i % 7} for i in range(6)]}) + "\n",
    "numbers": " ".join(str(n * 7919 % 100003) for n in range(1, 60)) + "\n",
    "german": (
        "Der Stellvertreter leitet jede Anfrage an den Anbieter weiter und überträgt die "
        "Antwort Stück für Stück zurück. Übermäßige Nutzung wird frühzeitig begrenzt. "
    ),
    "chinese": ("代理将每个请求转发给提供商，并在回答到达时将其流式传回。"
                "团队用它来了解谁在使用什么。"),
}

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest",
          "gemini": "gemini-2.0-flash"}
DEFAULT_CPT = {"openai": 5.0, "anthropic": 3.0}


@dataclass
class Row:
    source: str
    sample: str
    chars: int
    tokens: int

    @property
    def per_1k(self) -> float:
        return 1000 * self.tokens / self.chars if self.chars else 0.0


Counter = Callable[[str], int]


def configured_divisors(config: Path | None) -> tuple[float, dict[str, float]]:
    """chars_per_token and provider_chars_per_token from a config file (or the defaults)."""
    if config is None or not config.exists():
        return 4.0, dict(DEFAULT_CPT)
    import yaml

    raw = yaml.safe_load(config.read_text()) or {}
    est = ((raw.get("features") or {}).get("rate_limiting") or {}).get("estimation") or {}
    per = {str(k): float(v) for k, v in (est.get("provider_chars_per_token") or {}).items()}
    return float(est.get("chars_per_token", 4)), per or dict(DEFAULT_CPT)


def _divide_by(chars_per_token: float) -> Counter:
    return lambda text: math.ceil(len(text) / chars_per_token)


def estimate_counters(config: Path | None) -> dict[str, Counter]:
    default, per = configured_divisors(config)
    out: dict[str, Counter] = {}
    for provider in MODELS:
        cpt = per.get(provider, default)
        out[f"estimate/{provider}"] = _divide_by(cpt)
    return out


def _encoder_counter(encoding: Any) -> Counter:
    return lambda text: len(encoding.encode(text))


def tiktoken_counters() -> tuple[dict[str, Counter], str | None]:
    """Local tokenizers; (counters, why none) — tiktoken needs its encoding files locally."""
    try:
        import tiktoken  # type: ignore[import-not-found]
    except ImportError:
        return {}, "tiktoken is not installed (pip install tiktoken)"
    out: dict[str, Counter] = {}
    problems = []
    for name in ("o200k_base", "cl100k_base"):
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as exc:  # no network and no cached encoding file
            problems.append(f"{name}: {type(exc).__name__}")
            continue
        out[f"tiktoken/{name}"] = _encoder_counter(enc)
    return out, ("; ".join(problems) or None) if not out else None


def _post(url: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - the user's proxy URL
        return json.load(resp)


def api_counters(proxy: str) -> tuple[dict[str, Counter], list[str]]:
    """Provider token-count endpoints through the proxy, for each provider with a key."""
    base = proxy.rstrip("/")
    out: dict[str, Counter] = {}
    skipped = []
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        def openai(text: str, key: str = key) -> int:
            return int(_post(f"{base}/openai/v1/responses/input_tokens",
                             {"model": MODELS["openai"], "input": text},
                             {"Authorization": f"Bearer {key}"})["input_tokens"])
        out["api/openai"] = openai
    else:
        skipped.append("openai (OPENAI_API_KEY not set)")
    key = os.environ.get("ANTHROPIC_API_KEY")
    if key:
        def anthropic(text: str, key: str = key) -> int:
            return int(_post(f"{base}/anthropic/v1/messages/count_tokens",
                             {"model": MODELS["anthropic"],
                              "messages": [{"role": "user", "content": text}]},
                             {"x-api-key": key, "anthropic-version": "2023-06-01"})
                       ["input_tokens"])
        out["api/anthropic"] = anthropic
    else:
        skipped.append("anthropic (ANTHROPIC_API_KEY not set)")
    key = os.environ.get("GEMINI_API_KEY")
    if key:
        def gemini(text: str, key: str = key) -> int:
            return int(_post(f"{base}/gemini/v1beta/models/{MODELS['gemini']}:countTokens",
                             {"contents": [{"parts": [{"text": text}]}]},
                             {"x-goog-api-key": key})["totalTokens"])
        out["api/gemini"] = gemini
    else:
        skipped.append("gemini (GEMINI_API_KEY not set)")
    return out, skipped


def without_overhead(counter: Counter) -> Counter:
    """Subtract the fixed per-message tokens (measured once on a one-character text)."""
    overhead: list[int] = []

    def count(text: str) -> int:
        if not overhead:
            overhead.append(max(counter("a") - 1, 0))
        return max(counter(text) - overhead[0], 0)
    return count


def measure(counters: dict[str, Counter], repeat: int) -> list[Row]:
    rows = []
    for source, count in counters.items():
        for sample, text in SAMPLES.items():
            body = text * repeat
            try:
                tokens = count(body)
            except (urllib.error.URLError, KeyError, ValueError) as exc:
                print(f"  {source} {sample}: failed ({type(exc).__name__})", file=sys.stderr)
                continue
            rows.append(Row(source, sample, len(body), tokens))
    return rows


def summary(rows: Iterable[Row]) -> dict[str, tuple[int, int]]:
    totals: dict[str, tuple[int, int]] = {}
    for r in rows:
        chars, tokens = totals.get(r.source, (0, 0))
        totals[r.source] = (chars + r.chars, tokens + r.tokens)
    return totals


def print_table(rows: list[Row]) -> None:
    print(f"{'source':<24} {'sample':<9} {'chars':>7} {'tokens':>7} {'tok/1k chars':>13}")
    for r in rows:
        print(f"{r.source:<24} {r.sample:<9} {r.chars:>7} {r.tokens:>7} {r.per_1k:>13.1f}")
    print()
    print(f"{'source':<24} {'tok/1k chars':>13} {'chars/token':>12}   suggested setting")
    for source, (chars, tokens) in summary(rows).items():
        per_1k = 1000 * tokens / chars if chars else 0.0
        cpt = chars / tokens if tokens else 0.0
        provider = source.split("/", 1)[1]
        hint = f"provider_chars_per_token.{provider}: {cpt:.1f}" if source.startswith("api/") \
            else ""
        print(f"{source:<24} {per_1k:>13.1f} {cpt:>12.2f}   {hint}")


def write_csv(rows: list[Row], target: str) -> None:
    out = sys.stdout if target == "-" else open(target, "w", newline="")  # noqa: SIM115
    try:
        writer = csv.writer(out)
        writer.writerow(["source", "sample", "chars", "tokens", "tokens_per_1k_chars"])
        for r in rows:
            writer.writerow([r.source, r.sample, r.chars, r.tokens, f"{r.per_1k:.2f}"])
    finally:
        if out is not sys.stdout:
            out.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "base.yml",
                        help="config whose estimation settings to compare against")
    parser.add_argument("--proxy", help="base URL of a running llmproxy, for the API counters")
    parser.add_argument("--csv", help="write the rows as CSV to this file ('-' = stdout)")
    parser.add_argument("--repeat", type=int, default=20,
                        help="repeat each sample this many times (longer = steadier ratio)")
    args = parser.parse_args(argv)

    counters = estimate_counters(args.config)
    local, why_not = tiktoken_counters()
    counters.update(local)
    if why_not:
        print(f"local tokenizer unavailable: {why_not}", file=sys.stderr)
    if args.proxy:
        remote, skipped = api_counters(args.proxy)
        counters.update({name: without_overhead(c) for name, c in remote.items()})
        for item in skipped:
            print(f"skipped api/{item}", file=sys.stderr)
    rows = measure(counters, max(args.repeat, 1))
    print_table(rows)
    if args.csv:
        write_csv(rows, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
