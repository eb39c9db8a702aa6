"""llmproxy: a small, fast reverse proxy for the OpenAI, Anthropic and Gemini APIs.

Importing the package is cheap and imports neither Flask nor requests: gunicorn's master
imports ``llmproxy.gunicorn_conf`` and must not load ssl before the workers patch it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

    from .config import Settings


def create_app(config: Mapping[str, Any] | Settings | None = None) -> Flask:
    """Build the WSGI app; ``config`` is deep-merged over the YAML files (or ready Settings)."""
    from .app import build_app

    return build_app(config)
