"""Google Gemini (Generative Language API), every API version (v1, v1beta, v1alpha)."""

from __future__ import annotations

from .base import Provider


class GeminiProvider(Provider):
    """Auth ``x-goog-api-key`` or ``?key=``; SSE with ``alt=sse``, else a streamed JSON array."""

    dialect = "gemini"
    browser_headers = ("x-goog-api-key", "x-goog-api-client", "x-goog-user-project")
