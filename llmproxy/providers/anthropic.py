"""Anthropic Messages API."""

from __future__ import annotations

from .base import Provider


class AnthropicProvider(Provider):
    """Auth ``x-api-key`` (or Bearer); named SSE events; cumulative output tokens."""

    dialect = "anthropic"
    browser_headers = ("x-api-key", "anthropic-version", "anthropic-beta",
                       "anthropic-dangerous-direct-browser-access", "x-stainless-*")
