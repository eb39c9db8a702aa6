"""OpenAI and every OpenAI-compatible provider (Groq, Together, vLLM, ...)."""

from __future__ import annotations

from .base import Provider


class OpenAIProvider(Provider):
    """Auth ``Authorization: Bearer``; streams are ``data:`` SSE ending in ``[DONE]``."""

    dialect = "openai"
    browser_headers = ("authorization", "openai-organization", "openai-project",
                       "openai-beta", "x-stainless-*")
