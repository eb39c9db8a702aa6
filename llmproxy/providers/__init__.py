"""Provider routes and the wire formats (dialects) they speak.

Adding a wire format means adding one module here with a :class:`Dialect` subclass and
naming it in :data:`DIALECTS`; see docs/architecture.md.
"""

from __future__ import annotations

from . import anthropic, gemini, openai
from .base import Dialect, Provider, response_reader

#: Dialect name (the ``dialect:`` of a provider in the config) -> the dialect.
DIALECTS: dict[str, Dialect] = {
    d.name: d for d in (openai.DIALECT, anthropic.DIALECT, gemini.DIALECT)
}
#: The error shape for requests that name no provider (OpenAI's is the most widely parsed).
DEFAULT_DIALECT = openai.DIALECT

__all__ = ["DEFAULT_DIALECT", "DIALECTS", "Dialect", "Provider", "response_reader"]
