"""Provider registry: a dialect name to the class that speaks it."""

from __future__ import annotations

from ..config import ProviderSettings
from .anthropic import AnthropicProvider
from .base import Provider
from .gemini import GeminiProvider
from .openai import OpenAIProvider

DIALECTS: dict[str, type[Provider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "gemini": GeminiProvider,
}


def build(settings: ProviderSettings) -> Provider:
    return DIALECTS[settings.dialect](settings)


__all__ = ["DIALECTS", "Provider", "build"]
