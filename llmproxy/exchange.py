"""One proxied request from arrival to its single terminal event.

Every request that reaches a provider route gets an :class:`Exchange`. Exactly one
terminal event fires for it (``completed``, ``client_aborted`` or ``upstream_error``),
however the response ends: the relay's stream generator, or the WSGI server closing a
response that was never iterated. Logging, rate-limit reconciliation, metrics and
provider health all listen to that one event, so none of them can count a request twice
or miss it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .usage import ResponseMeta

log = logging.getLogger(__name__)

COMPLETED = "completed"
CLIENT_ABORTED = "client_aborted"
UPSTREAM_ERROR = "upstream_error"

FinishListener = Callable[["Exchange"], None]


@dataclass(slots=True, eq=False)
class Exchange:
    """Per-request state; plugins keep their own state in :attr:`extras`."""

    request_id: str
    method: str
    path: str  # path and query as received, secrets redacted; safe to log
    provider: str | None = None  # route name: openai, anthropic, gemini, groq, ...
    dialect: str | None = None  # wire format: openai | anthropic | gemini
    upstream_path: str = ""  # path + query sent upstream (not redacted: never log it)
    model: str | None = None
    user: str | None = None
    user_source: str | None = None
    api_key: str | None = None  # raw credential: never log, never store
    key_fingerprint: str | None = None
    client_ip: str | None = None
    streaming: bool = False
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    ttfb: float | None = None  # seconds to the first response byte leaving the proxy
    status: int | None = None
    outcome: str | None = None
    error_kind: str | None = None  # connect | timeout | midstream | body_too_large | ...
    request_bytes: int = 0
    response_bytes: int = 0
    meta: ResponseMeta = field(default_factory=ResponseMeta)
    request_info: Any = None  # llmproxy.request_info.RequestInfo when the body was inspected
    extras: dict[str, Any] = field(default_factory=dict)
    duration: float | None = None
    # Streams: response chunks relayed and when the last one arrived (monotonic), for the
    # time per output chunk; the relay updates both per chunk, nothing else.
    chunks: int = 0
    last_chunk_at: float | None = None
    span: Any = None  # the OpenTelemetry span of this call, when telemetry is on
    _listeners: tuple[FinishListener, ...] = ()
    _finished: bool = False

    @property
    def finished(self) -> bool:
        return self._finished

    def mark_first_byte(self) -> None:
        if self.ttfb is None:
            self.ttfb = time.monotonic() - self.started

    def finish(self, outcome: str | None = None) -> None:
        """Fire the terminal event once; later calls are ignored."""
        if self._finished:
            return
        self._finished = True
        self.duration = time.monotonic() - self.started
        if self.outcome is None:
            self.outcome = outcome or COMPLETED
        if self.model is None:
            self.model = self.meta.model
        for listener in self._listeners:
            try:
                listener(self)
            except Exception:  # one broken listener must not hide the event from the rest
                log.exception("finish listener %r failed", listener)
