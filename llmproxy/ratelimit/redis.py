"""Redis counter store: one Lua script reserves across all scopes, a second reconciles.

All workers and hosts share the counters and the Redis server clock, so limits hold across
them. Keys share one ``{...}`` hash tag because a script may only touch keys of one slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .store import Adjustment, CounterSpec, CounterState, Decision, StoreError

HASH_TAG = "{rl}"


def _script_text(name: str) -> str:
    """A Lua script with the shared ``clock`` function prepended (scripts cannot import)."""
    files = resources.files(__package__)
    return "\n".join(files.joinpath(n).read_text(encoding="utf-8") for n in ("clock.lua", name))


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
    )


class RedisStore:
    """Counters as Redis hashes; see reserve.lua for the layout."""

    def __init__(self, client: redis.Redis, key_prefix: str = "llmproxy:",
                 clock: Callable[[], float] | None = None) -> None:
        self.client = client
        self.prefix = key_prefix + HASH_TAG + ":"
        # None: the Redis server clock, the same for every host. Tests inject a fake clock.
        self.clock = clock
        self._reserve = client.register_script(_script_text("reserve.lua"))
        self._reconcile = client.register_script(_script_text("reconcile.lua"))

    def _now_arg(self) -> str:
        return "" if self.clock is None else str(int(self.clock() * 1000))

    def _run(self, script: Any, keys: list[str], args: list[str | int]) -> Any:
        try:
            return script(keys=keys, args=args)
        except redis.RedisError as exc:
            # Only the exception class: a message may echo the URL with its password.
            raise StoreError(type(exc).__name__) from None

    def reserve(self, specs: Sequence[CounterSpec]) -> Decision:
        args: list[str | int] = [self._now_arg()]
        for s in specs:
            args += [s.limit, s.cost, s.need, s.granularity * 1000, s.span, int(s.optimistic)]
        reply = self._run(self._reserve, [self.prefix + s.key for s in specs], args)
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
        todo = [a for a in adjustments if a.delta != 0]
        if not todo:
            return
        args: list[str | int] = [self._now_arg()]
        for a in todo:
            args += [a.bucket, a.delta, a.granularity * 1000, a.span]
        self._run(self._reconcile, [self.prefix + a.key for a in todo], args)

    def close(self) -> None:
        self.client.close()
