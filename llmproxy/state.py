"""Per-app state kept in ``app.extensions``: settings, providers, the upstream client, the
running calls, listeners."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flask import Flask

from .config import Settings
from .exchange import FinishListener
from .inflight import InFlight
from .providers import Provider
from .upstream import Upstream

if TYPE_CHECKING:  # the store's module loads SQLAlchemy: only when keys are in use
    from .keys.guard import KeyGuard
    from .keys.store import KeyStore

EXTENSION_KEY = "llmproxy"


@dataclass(slots=True)
class ProxyState:
    settings: Settings
    providers: dict[str, Provider]
    upstream: Upstream
    #: The provider calls running in this worker (slow-client deadlines, shutdown).
    inflight: InFlight
    #: Terminal-event listeners of provider calls, in order (pricing first).
    listeners: list[FinishListener] = field(default_factory=list)
    #: Listeners of every other request (/health, /metrics, unknown routes): the access log.
    other_listeners: list[FinishListener] = field(default_factory=list)
    #: The proxy-key database, when auth.mode uses keys or the admin API is on.
    key_store: KeyStore | None = None
    #: Proxy-key checks, with auth.mode keys or mixed; None for pass-through.
    keys: KeyGuard | None = None

    def on_finish(self, listener: FinishListener) -> FinishListener:
        """Register a terminal-event listener for provider calls (usable as a decorator)."""
        self.listeners.append(listener)
        return listener


def get_state(app: Flask) -> ProxyState:
    state: ProxyState = app.extensions[EXTENSION_KEY]
    return state
