"""Redis counter store: one Lua script reserves across all scopes, a second reconciles.

All workers and hosts share the counters and the Redis server clock, so limits hold across
them. Keys share one ``{...}`` hash tag because a script may only touch keys of one slot.

Corrections can be deferred (``reconcile_delay`` > 0): they are summed per counter bucket and
sent with the worker's next reservation, or by a timer after ``reconcile_delay`` seconds when
no reservation comes first. A busy worker then makes one round trip per request instead of
two; the price is that a correction reaches other workers up to that delay later.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..socketpoll import readable_now
from .store import Adjustment, CounterSpec, CounterState, Decision, StoreError

HASH_TAG = "{rl}"


def _script_text(name: str) -> str:
    """A Lua script with the shared functions prepended (scripts cannot import)."""
    files = resources.files(__package__)
    return "\n".join(files.joinpath(n).read_text(encoding="utf-8")
                     for n in ("clock.lua", "adjust.lua", name))


class _CheapCheck:
    """redis-py's pool asks ``can_read()`` of every connection it hands out (leftover data
    means a reply was not consumed; EOF means the server closed it). When the socket has
    nothing waiting — the usual case — say so with a real zero-timeout poll (socketpoll.py)
    instead of gevent's; anything else gets redis-py's own, thorough check."""

    _sock: Any

    def can_read(self, timeout: float = 0) -> bool:
        sock = self._sock
        if timeout == 0 and sock is not None and not getattr(sock, "pending", lambda: 0)() \
                and not readable_now(sock) and not self._buffered():
            return False
        result: bool = super().can_read(timeout)  # type: ignore[misc]
        return result

    def _buffered(self) -> bool:
        """Whether the parser may hold bytes already read off the socket (True when it
        cannot tell: then redis-py's own check runs)."""
        parser = getattr(self, "_parser", None)
        has_data = getattr(getattr(parser, "_reader", None), "has_data", None)  # hiredis
        if callable(has_data):
            return bool(has_data())
        unread = getattr(getattr(parser, "_buffer", None), "unread_bytes", None)  # pure Python
        if callable(unread):
            return bool(unread())
        return True


class _Connection(_CheapCheck, redis.Connection):
    pass


class _SSLConnection(_CheapCheck, redis.SSLConnection):
    pass


class _UnixConnection(_CheapCheck, redis.UnixDomainSocketConnection):
    pass


_CONNECTION_CLASSES = {"redis": _Connection, "rediss": _SSLConnection, "unix": _UnixConnection}


def connect(url: str, timeout_ms: int) -> redis.Redis:
    """A client that fails fast: short timeouts and no retries (the caller applies on_error).

    The connection pool reconnects on the next command, so service resumes by itself once
    Redis is back.
    """
    timeout = timeout_ms / 1000
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        connection_class=_CONNECTION_CLASSES[url.split("://", 1)[0].lower()],
    )


# (counter key, bucket, granularity, span, refund?) -> summed delta. Refunds and charges are
# summed apart: a refund to a bucket that left the window is dropped while a charge is not,
# so their sum would not do what the two do one after the other.
_Pending = dict[tuple[str, int, int, int, bool], int]


class RedisStore:
    """Counters as Redis hashes; see reserve.lua for the layout."""

    def __init__(self, client: redis.Redis, key_prefix: str = "llmproxy:",
                 clock: Callable[[], float] | None = None, reconcile_delay: float = 0.0,
                 on_lost: Callable[[StoreError], None] | None = None) -> None:
        self.client = client
        self.prefix = key_prefix + HASH_TAG + ":"
        # None: the Redis server clock, the same for every host. Tests inject a fake clock.
        self.clock = clock
        self.reconcile_delay = reconcile_delay
        # Told when deferred corrections could not be delivered (nobody else is to blame).
        self.on_lost = on_lost
        self._reserve = client.register_script(_script_text("reserve.lua"))
        self._reconcile = client.register_script(_script_text("reconcile.lua"))
        self._pending: _Pending = {}
        self._timer: threading.Timer | None = None
        # Guards _pending and _timer; nothing inside it does I/O or waits, so it never yields
        # to gevent.
        self._lock = threading.Lock()
        if reconcile_delay > 0:
            # Worker exit (SIGTERM, after in-flight requests ended): send what is still queued.
            atexit.register(self.flush)

    def _now_arg(self) -> str:
        return "" if self.clock is None else str(int(self.clock() * 1000))

    def _run(self, script: Any, keys: list[str], args: list[str | int]) -> Any:
        try:
            return script(keys=keys, args=args)
        except redis.RedisError as exc:
            # Only the exception class: a message may echo the URL with its password.
            raise StoreError(type(exc).__name__) from None

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:  # the message may name the URL (a password): not kept
            raise StoreError(type(exc).__name__) from None

    def reserve(self, specs: Sequence[CounterSpec]) -> Decision:
        keys = [self.prefix + s.key for s in specs]
        args: list[str | int] = [self._now_arg(), len(specs)]
        for s in specs:
            args += [s.limit, s.cost, s.need, s.granularity * 1000, s.span, int(s.optimistic)]
        carried = self._take_pending()
        if carried:
            self._add_corrections(keys, args, carried)
        try:
            reply = self._run(self._reserve, keys, args)
        except StoreError as exc:
            if carried:
                self._lost(exc)
            raise
        allowed = bool(int(reply[0]))
        charged: dict[str, int] = {}
        states: list[CounterState] = []
        for i, spec in enumerate(specs):
            bucket, used, retry, reset = (int(v) for v in reply[2 + 4 * i: 6 + 4 * i])
            if allowed:
                charged[spec.key] = bucket
            states.append(CounterState(used, None if retry < 0 else retry / 1000, reset / 1000))
        return Decision(allowed, charged, states)

    def adjust(self, adjustments: Sequence[Adjustment]) -> None:
        """Apply corrections now, or (``reconcile_delay`` > 0) queue them; see the module doc."""
        todo: _Pending = {}
        for a in adjustments:
            if a.delta:
                k = (a.key, a.bucket, a.granularity, a.span, a.delta < 0)
                todo[k] = todo.get(k, 0) + a.delta
        if not todo:
            return
        if self.reconcile_delay <= 0:
            self._send(todo)
            return
        timer: threading.Timer | None = None
        with self._lock:
            pending = self._pending
            for k, delta in todo.items():
                pending[k] = pending.get(k, 0) + delta
            if self._timer is None:
                # One timer at a time, never cancelled: a busy worker starts at most one per
                # delay, and a timer that finds nothing left to send just ends.
                timer = self._timer = threading.Timer(self.reconcile_delay, self._timer_fired)
                timer.daemon = True
        if timer is not None:
            # Started outside the lock: under gevent, start() waits for the new greenlet.
            try:
                timer.start()
            except RuntimeError:  # no thread to be had (shutting down): the next call retries
                with self._lock:
                    if self._timer is timer:
                        self._timer = None

    def _timer_fired(self) -> None:
        with self._lock:
            self._timer = None
        self.flush()

    def flush(self) -> None:
        """Send the queued corrections now (the timer, worker exit, tests)."""
        pending = self._take_pending()
        if not pending:
            return
        try:
            self._send(pending)
        except StoreError as exc:
            self._lost(exc)

    def _take_pending(self) -> _Pending:
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def _add_corrections(self, keys: list[str], args: list[str | int], todo: _Pending) -> None:
        for (key, bucket, granularity, span, _), delta in todo.items():
            keys.append(self.prefix + key)
            args += [bucket, delta, granularity * 1000, span]

    def _send(self, todo: _Pending) -> None:
        keys: list[str] = []
        args: list[str | int] = [self._now_arg()]
        self._add_corrections(keys, args, todo)
        self._run(self._reconcile, keys, args)

    def _lost(self, exc: StoreError) -> None:
        if self.on_lost is not None:
            self.on_lost(exc)

    def close(self) -> None:
        self.flush()
        atexit.unregister(self.flush)
        self.client.close()
