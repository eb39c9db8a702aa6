"""One proxied request from arrival to its single terminal event.

Every request that reaches a provider route gets an :class:`Exchange`. Exactly one
terminal event fires for it (``completed``, ``client_aborted``, ``upstream_error`` or
``shutdown``), however the response ends: the relay's stream generator, the WSGI server
closing a response that was never iterated, or the worker ending calls still running when
it has to stop (:mod:`llmproxy.inflight`). Pricing, logging, rate-limit reconciliation,
metrics and provider health all listen to that one event, so none of them can count a
request twice or miss it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

log = logging.getLogger(__name__)


class _Word(str, Enum):
    """A closed set of words that log, serialise and compare as their plain string."""

    def __str__(self) -> str:
        return str(self.value)


class Outcome(_Word):
    """How an exchange ended."""

    COMPLETED = "completed"  # the response was sent whole (whatever its status)
    CLIENT_ABORTED = "client_aborted"  # the client left before the end
    UPSTREAM_ERROR = "upstream_error"  # the provider could not be reached, timed out or broke
    SHUTDOWN = "shutdown"  # cut by the worker stopping (graceful timeout, quick shutdown)


class ErrorKind(_Word):
    """Why an exchange failed, when it did."""

    CONNECT = "connect"  # no connection to the provider, or it closed one early
    TIMEOUT = "timeout"  # the provider did not answer in time
    MIDSTREAM = "midstream"  # the provider's response broke after it started
    TOO_LARGE = "too_large"  # the request body exceeded server.max_body_bytes
    CLIENT_GONE = "client_gone"  # the client left before its body or the answer was complete
    CLIENT_READ = "client_read"  # the client's body could not be read (malformed chunking)
    BODY_TIMEOUT = "body_timeout"  # the client's body did not arrive within server.body_timeout
    SEND_TIMEOUT = "send_timeout"  # the client read nothing for server.send_timeout
    TRANSFER_CODING = "transfer_coding"  # an upload coding other than chunked
    RATE_LIMITED = "rate_limited"  # refused by a rate limit (429)
    RATELIMIT_UNAVAILABLE = "ratelimit_unavailable"  # the limiter's store failed, on_error: closed
    CREDENTIAL_CONFLICT = "credential_conflict"  # two different credentials for one provider
    UNAUTHENTICATED = "unauthenticated"  # no proxy key where one is required, or a bad one
    FORBIDDEN = "forbidden"  # the proxy key does not allow this provider or model
    KEY_STORE_UNAVAILABLE = "key_store_unavailable"  # a proxy key could not be checked
    BUDGET_EXCEEDED = "budget_exceeded"  # a spend budget has no room for the call (429)
    UNPRICED = "unpriced"  # a budgeted call to a model with no price (budgets.unpriced: deny)


FinishListener = Callable[["Exchange"], None]


@dataclass(slots=True)
class Usage:
    """Token counts as the provider reported them; ``None`` means not reported."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    cache_creation_tokens: int | None = None


@dataclass(slots=True)
class ResponseMeta:
    """What a response said about itself: model, usage, finish reason, in-stream error."""

    model: str | None = None
    finish_reason: str | None = None
    response_id: str | None = None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)
    # Bytes of generated text (JSON-escaped) in the stream events relayed, counted by the
    # dialect's usage handler: what an aborted stream is charged when no final count came.
    output_chars: int = 0
    output_estimated: bool = False  # usage.output_tokens comes from output_chars

    def estimate_output(self, chars_per_token: float) -> None:
        """The provider's output count never came: estimate it from the text relayed."""
        usage = self.usage
        if usage.output_tokens is not None or self.output_chars <= 0:
            return
        usage.output_tokens = math.ceil(self.output_chars / chars_per_token)
        self.output_estimated = True
        if usage.total_tokens is not None:  # a total of what was reported, output missing
            usage.total_tokens += usage.output_tokens


@dataclass(slots=True)
class RequestInfo:
    """Facts a dialect read off one request; ``None`` means unknown."""

    model: str | None = None
    streaming: bool = False
    user: str | None = None
    text_chars: int | None = None  # characters of textual prompt content; None: not JSON
    max_output_tokens: int | None = None  # the output cap, times the choices asked for
    choices: int = 1  # completions asked for at once (OpenAI n, Gemini candidateCount)


@dataclass(slots=True, eq=False)
class Exchange:
    """Per-request state, filled in by the stages it passes through."""

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
    key_id: str | None = None  # the proxy key's id, when the call was made with one
    team: str | None = None  # the proxy key's team
    # the proxy key's own rate limits, (name, value) pairs over the limiter's per-key ones
    key_limits: tuple[tuple[str, int], ...] = ()
    key_budget: Any = None  # the proxy key's own Budget (llmproxy.budgets.model), if any
    client_ip: str | None = None
    streaming: bool = False
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    ttfb: float | None = None  # seconds to the first response byte leaving the proxy
    status: int | None = None  # the status the client got
    upstream_status: int | None = None  # the status the provider answered with, if it did
    # The request went to the provider (set before sending, cleared when the connection or
    # the upload failed): from then on the provider may run it, whether an answer comes or not.
    forwarded: bool = False
    outcome: Outcome | None = None
    error_kind: ErrorKind | None = None
    request_bytes: int = 0
    # A body too large to inspect (multipart uploads aside): its model is unknown unless the
    # path names it, which the rate limiter must not take for "no model".
    body_uninspected: bool = False
    response_bytes: int = 0
    meta: ResponseMeta = field(default_factory=ResponseMeta)
    request_info: RequestInfo | None = None  # set when the request was identified
    cost_usd: float | None = None  # set by pricing, the first terminal-event listener
    reservation: Any = None  # the rate limiter's Reservation when it admitted the call
    denial: Any = None  # the rate limiter's Denial when it refused the call
    # Nano-dollars charged to the call's budgets and the ledger (budgets on): the real cost,
    # or at least what an aborted stream relayed; set by the budgets' listener.
    charged_nanos: int | None = None
    counted_in_flight: bool = False  # metrics: counted in the in-flight gauge
    counted_stream: bool = False  # metrics: counted in the open-streams gauge
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

    @property
    def unanswered(self) -> bool:
        """Sent to the provider, and no answer came (a read timeout, a client that left while
        waiting, a worker that stopped): the provider may have run the call whole."""
        return self.forwarded and self.upstream_status is None

    @property
    def cut_short(self) -> bool:
        """An answer the provider gave (a success) that the client or a shutdown ended early."""
        return (self.outcome in (Outcome.CLIENT_ABORTED, Outcome.SHUTDOWN)
                and self.upstream_status is not None and self.upstream_status < 400)

    def mark_first_byte(self) -> None:
        if self.ttfb is None:
            self.ttfb = time.monotonic() - self.started

    def finish(self, outcome: Outcome | None = None) -> None:
        """Fire the terminal event once; later calls are ignored."""
        if self._finished:
            return
        self._finished = True
        self.duration = time.monotonic() - self.started
        if self.outcome is None:
            self.outcome = outcome or Outcome.COMPLETED
        if self.model is None:
            self.model = self.meta.model
        for listener in self._listeners:
            try:
                listener(self)
            except Exception:  # one broken listener must not hide the event from the rest
                log.exception("finish listener %r failed", listener)
