"""Per-app state kept in ``app.extensions``: settings, providers and terminal-event listeners."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flask import Flask

from .config import Settings
from .exchange import FinishListener

if TYPE_CHECKING:
    from .health import HealthTracker
    from .providers.base import Provider
    from .upstream import Upstream

EXTENSION_KEY = "llmproxy"


@dataclass(slots=True)
class ProxyState:
    settings: Settings
    providers: dict[str, Provider]
    upstream: Upstream
    health: HealthTracker
    listeners: list[FinishListener] = field(default_factory=list)

    def on_finish(self, listener: FinishListener) -> FinishListener:
        """Register a terminal-event listener (usable as a decorator)."""
        self.listeners.append(listener)
        return listener


def get_state(app: Flask) -> ProxyState:
    state: ProxyState = app.extensions[EXTENSION_KEY]
    return state
