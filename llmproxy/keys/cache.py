"""A worker's cache of looked-up proxy keys, so the database stays off the request path.

A key found in the store is trusted for ``ttl`` seconds (``auth.key_cache_seconds``): that
is how long a revocation or an edit takes to reach every worker on every host, and within
it a call with that key reads nothing from the database. A key still in use late in its TTL
is looked up again by a background greenlet, so busy keys never make a request wait. An
unknown secret is remembered for ``negative_ttl`` seconds, in a table of bounded size.
Lookups of secrets not in the cache share one query per secret (single-flight) and spend a
per-worker budget, so a flood of random keys costs at most that many queries a second.

When the store fails, keys already cached keep working (stale, until the store answers
again) and other secrets raise :class:`KeyLookupUnavailable` (the caller answers 503, not
401: the key may well be valid). After a failure the store is left alone for
``retry_after`` seconds, so an outage does not make every request wait for a timeout.
Last-used times are collected here and written in batches, off the request path.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Protocol

from .model import ProxyKey, hash_secret

log = logging.getLogger("llmproxy.keys")

#: How long an unknown secret is remembered, at most (a key created meanwhile waits that long).
NEGATIVE_TTL = 2.0
#: Unknown secrets remembered per worker; the oldest is forgotten first.
MAX_NEGATIVE = 10_000
#: Keys remembered per worker (every key in the database fits, in any real deployment).
MAX_POSITIVE = 100_000
#: Lookups a worker may send to the store per second (and at once, after a quiet spell).
LOOKUPS_PER_SECOND = 200.0
#: Share of the TTL after which a key in use is looked up again in the background.
REFRESH_AHEAD = 0.8
#: Seconds the store is left alone after it failed.
RETRY_AFTER = 1.0
#: How often last-used times are written.
TOUCH_INTERVAL = 30.0
#: A lookup waiting for another one's query gives up after this long.
WAIT_TIMEOUT = 30.0
_WARN_EVERY = 10.0


class KeySource(Protocol):
    """What the cache needs of :class:`~llmproxy.keys.store.KeyStore`."""

    def lookup(self, secret_hash: str) -> ProxyKey | None: ...

    def touch(self, used: dict[str, datetime]) -> None: ...


class KeyLookupUnavailable(Exception):
    """The key is not cached and cannot be looked up now (store down, or lookups throttled)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # store_down | throttled


_Cached = tuple[ProxyKey, float, float]


class _Flight:
    """One lookup in progress; callers asking for the same secret wait for its answer."""

    __slots__ = ("done", "failed", "key")

    def __init__(self) -> None:
        self.done = threading.Event()  # cooperative under gevent's monkey-patching
        self.key: ProxyKey | None = None
        self.failed = True  # until the lookup succeeds (an unexpected error fails it too)


class KeyCache:
    """Per-worker TTL cache in front of a key store's ``lookup``; ``store_errors`` are the
    exceptions by which the store says it cannot answer."""

    def __init__(self, store: KeySource, ttl: float, *,
                 store_errors: tuple[type[BaseException], ...],
                 negative_ttl: float = NEGATIVE_TTL, max_negative: int = MAX_NEGATIVE,
                 max_positive: int = MAX_POSITIVE, lookups_per_second: float = LOOKUPS_PER_SECOND,
                 retry_after: float = RETRY_AFTER, touch_interval: float = TOUCH_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._errors = store_errors
        self.ttl = ttl
        self.negative_ttl = min(negative_ttl, ttl)
        self._max_negative = max_negative
        self._max_positive = max_positive
        self._rate = lookups_per_second
        self._retry_after = retry_after
        self._touch_interval = touch_interval
        self._clock = clock
        # secret hash -> (key, fresh until, refreshed from); a stale entry is still served
        # while the store is down
        self._keys: dict[str, _Cached] = {}
        self._unknown: dict[str, float] = {}  # secret hash -> forgotten at (insertion order)
        self._flights: dict[str, _Flight] = {}
        self._lock = threading.Lock()
        self._down_until = -1.0
        self._tokens = lookups_per_second  # lookup budget: a token bucket
        self._refilled = clock()
        self._used: dict[str, datetime] = {}
        self._next_touch = clock() + touch_interval
        self._touching = False
        self._last_warning = -_WARN_EVERY
        self.lookups = 0  # queries sent to the store (for tests and debugging)

    # -- lookups ------------------------------------------------------------------------------
    def get(self, secret: str) -> ProxyKey | None:
        """The key for ``secret`` (usable or not), or None when no such key exists.

        Raises :class:`KeyLookupUnavailable` when that cannot be known right now.
        """
        digest = hash_secret(secret)
        now = self._clock()
        cached = self._keys.get(digest)
        if cached is not None:
            if now < cached[1]:
                if now >= cached[2] and now >= self._down_until:
                    self._refresh_in_background(digest)
                return cached[0]
        else:
            forget_at = self._unknown.get(digest)
            if forget_at is not None and now < forget_at:
                return None
        if now < self._down_until or (cached is not None and digest in self._flights):
            # The store is down, or slow with this key's refresh: the cached key stands.
            return self._stale(cached, "store_down")
        return self._load(digest, cached)

    def _stale(self, cached: _Cached | None, reason: str) -> ProxyKey:
        if cached is None:
            raise KeyLookupUnavailable(reason)
        return cached[0]

    def _load(self, digest: str, cached: _Cached | None) -> ProxyKey | None:
        with self._lock:
            flight = self._flights.get(digest)
            leader = flight is None
            if flight is None:
                if not self._spend():
                    return self._stale(cached, "throttled")
                flight = self._flights[digest] = _Flight()
        if not leader:
            if not flight.done.wait(WAIT_TIMEOUT) or flight.failed:
                return self._stale(cached, "store_down")
            return flight.key
        try:
            return self._fly(digest, flight)
        except self._errors:
            return self._stale(cached, "store_down")

    def _refresh_in_background(self, digest: str) -> None:
        """Look a key in use up again before it goes stale, so no request waits for it."""
        with self._lock:
            if digest in self._flights:
                return
            flight = self._flights[digest] = _Flight()
        threading.Thread(target=self._refresh, args=(digest, flight), daemon=True,
                         name="llmproxy-key-refresh").start()

    def _refresh(self, digest: str, flight: _Flight) -> None:
        try:
            self._fly(digest, flight)
        except self._errors:
            pass  # _fly warned; the cached key stays until the store answers
        except Exception:
            log.exception("proxy keys: refreshing a cached key failed")

    def _fly(self, digest: str, flight: _Flight) -> ProxyKey | None:
        """Run ``flight``'s query and remember its answer; store errors are re-raised."""
        try:
            self.lookups += 1
            key = self._store.lookup(digest)
        except self._errors as exc:
            self._down_until = self._clock() + self._retry_after
            self._warn("proxy-key store unavailable (%s): cached keys keep working, "
                       "others are answered 503", exc)
            raise
        else:
            flight.key, flight.failed = key, False
            self._remember(digest, key)
            return key
        finally:
            with self._lock:
                del self._flights[digest]
            flight.done.set()

    def _spend(self) -> bool:
        """Take one lookup from the budget (called under the lock)."""
        now = self._clock()
        self._tokens = min(self._rate, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _remember(self, digest: str, key: ProxyKey | None) -> None:
        now = self._clock()
        if key is None:
            self._keys.pop(digest, None)
            if self.negative_ttl <= 0:
                return
            self._unknown.pop(digest, None)
            while len(self._unknown) >= self._max_negative:
                del self._unknown[next(iter(self._unknown))]  # the oldest
            self._unknown[digest] = now + self.negative_ttl
            return
        self._unknown.pop(digest, None)
        if digest not in self._keys and len(self._keys) >= self._max_positive:
            del self._keys[next(iter(self._keys))]
        self._keys[digest] = (key, now + self.ttl, now + self.ttl * REFRESH_AHEAD)

    def _warn(self, message: str, *args: object) -> None:
        now = self._clock()
        if now - self._last_warning >= _WARN_EVERY:
            self._last_warning = now
            log.warning(message, *args)

    # -- last-used times ----------------------------------------------------------------------
    def note_used(self, key_id: str) -> None:
        """Remember that ``key_id`` was used now; written to the store in a later batch."""
        self._used[key_id] = datetime.now(timezone.utc)
        if not self._touching and self._clock() >= self._next_touch:
            self._touching = True
            # A thread is a greenlet under gevent: the write never holds up a request.
            threading.Thread(target=self.flush_used, name="llmproxy-key-touch",
                             daemon=True).start()

    def flush_used(self) -> None:
        """Write the collected last-used times; on failure they are kept for the next try."""
        used, self._used = self._used, {}
        try:
            if used:
                self._store.touch(used)
        except self._errors as exc:
            for key_id, when in used.items():
                self._used.setdefault(key_id, when)
            self._warn("proxy keys: last-used times not written (%s)", exc)
        except Exception:  # never let a bug here kill the thread silently
            log.exception("proxy keys: writing last-used times failed")
        finally:
            self._next_touch = self._clock() + self._touch_interval
            self._touching = False

    def close_at_exit(self) -> None:
        """Write what is left when the worker exits."""
        atexit.register(self.flush_used)
