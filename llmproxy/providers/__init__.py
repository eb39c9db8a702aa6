"""Provider routes and the wire formats (dialects) they speak.

Every module in this package other than ``base`` that defines ``DIALECT`` (a
:class:`Dialect` instance) is a wire format, found here by name: adding one means adding its
module and nothing else (see docs/architecture.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Dialect, Provider, response_reader


def _discover() -> dict[str, Dialect]:
    found: dict[str, Dialect] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "base" or info.name.startswith("_"):
            continue
        dialect = getattr(importlib.import_module(f"{__name__}.{info.name}"), "DIALECT", None)
        if isinstance(dialect, Dialect):
            found[dialect.name] = dialect
    return found


#: Dialect name (the ``dialect:`` of a provider in the config) -> the dialect.
DIALECTS: dict[str, Dialect] = _discover()
#: The error shape for requests that name no provider (OpenAI's is the most widely parsed).
DEFAULT_DIALECT = DIALECTS["openai"]

__all__ = ["DEFAULT_DIALECT", "DIALECTS", "Dialect", "Provider", "response_reader"]
