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
import socket
import threading
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import gevent.lock
import hiredis
import redis
from gevent import monkey
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..socketpoll import connected_now, readable_now
from .store import (
    Adjustment,
    BudgetSpec,
    BudgetState,
    CounterSpec,
    CounterState,
    Decision,
    Settlement,
    StoreError,
)

HASH_TAG = "{rl}"
#: How long the reply to a reservation that timed out is still awaited (by a greenlet of its
#: own, on the abandoned connection), so that what it charged can be settled.
LATE_REPLY_GRACE = 5.0
#: At most this many such waits at once: an outage must not pile up sockets.
MAX_LATE_WAITS = 64
_late_waits = threading.BoundedSemaphore(MAX_LATE_WAITS)
# Per thread (per greenlet under gevent): whether the running call wants its reply even after
# a timeout (reservations only), and the late reply handed over when it timed out.
_late_call = threading.local()
_NO_REPLY = object()


def _script_text(name: str) -> str:
    """A Lua script with the shared functions prepended (scripts cannot import)."""
    files = resources.files(__package__)
    return "\n".join(files.joinpath(n).read_text(encoding="utf-8")
                     for n in ("clock.lua", "adjust.lua", "budget.lua", name))


class _PatientSocket:
    """A connection's socket whose read timeout counts only when no reply is waiting.

    Under load a gevent worker resumes a greenlet long after its reply arrived (every other
    runnable greenlet goes first), and gevent then fires the timer rather than read the ready
    socket. A reply already in the buffer is Redis having answered in time: it is read
    instead of reported as a timeout, which ``on_error: open`` would turn into an unlimited
    admission. A Redis that really is slow still times out.
    """

    __slots__ = ("_sock",)

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        try:
            got: int = self._sock.recv_into(buffer, nbytes, flags)
        except TimeoutError:
            if not readable_now(self._sock):
                raise
            got = self._sock.recv_into(buffer, nbytes, flags)
        return got

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        try:
            data: bytes = self._sock.recv(bufsize, flags)
        except TimeoutError:
            if not readable_now(self._sock):
                raise
            data = self._sock.recv(bufsize, flags)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _LateReply:
    """The reply to a call that timed out, read by :func:`_await_late` if Redis sends it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = False
        self._value: Any = None
        self._callbacks: list[Callable[[Any], None]] = []

    def then(self, callback: Callable[[Any], None]) -> None:
        with self._lock:
            if not self._done:
                self._callbacks.append(callback)
                return
        callback(self._value)

    def deliver(self, value: Any) -> None:
        with self._lock:
            if self._done:
                return
            self._done, self._value = True, value
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(value)


def _await_late(sock: Any, late: _LateReply, grace: float) -> None:
    """Read one reply off an abandoned connection within ``grace`` seconds, then close it."""
    reply: Any = None
    try:
        reader = hiredis.Reader()
        deadline = time.monotonic() + grace
        got: Any = False
        while got is False:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            data = sock.recv(65536)
            if not data:
                break
            reader.feed(data)
            got = reader.gets()
        if got is not False and not isinstance(got, Exception):
            reply = got
    except (OSError, hiredis.ProtocolError):  # timeouts included: no reply, then
        pass
    finally:
        try:
            sock.close()
        except OSError:
            pass
        _late_waits.release()
        late.deliver(reply)


class _CheapCheck:
    """redis-py's pool asks ``can_read()`` of every connection it hands out (leftover data
    means a reply was not consumed; EOF means the server closed it). When the socket has
    nothing waiting — the usual case — say so with a real zero-timeout poll (socketpoll.py)
    instead of gevent's; anything else gets redis-py's own, thorough check. Its socket is a
    :class:`_PatientSocket`."""

    _sock: Any
    disconnect: Callable[..., None]  # redis-py's

    def _connect(self) -> Any:
        return _PatientSocket(super()._connect())  # type: ignore[misc]

    def send_command(self, *args: Any, **kwargs: Any) -> None:
        # Armed for the reservation script only, not for a new connection's handshake.
        self._late_armed = bool(args) and args[0] in ("EVALSHA", "EVAL") and \
            getattr(_late_call, "wanted", False)
        super().send_command(*args, **kwargs)  # type: ignore[misc]

    def send_script(self, sha: str, keys: list[str], args: list[str | int]) -> None:
        """``send_command("EVALSHA", ...)`` packed by hiredis in one C call: redis-py's
        packer encodes each argument in Python first, at six times the cost, and a
        reservation carries a few dozen of them on every call."""
        self._late_armed = getattr(_late_call, "wanted", False)
        # (hiredis' stub types the tuple as of one element)
        packed = hiredis.pack_command(("EVALSHA", sha, len(keys), *keys, *args))  # type: ignore[arg-type]
        self.send_packed_command([packed])  # type: ignore[attr-defined]

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        """redis-py's, except that a reservation that times out keeps its connection open
        for its reply (see :meth:`_hand_over`): Redis may run the script after all."""
        armed, self._late_armed = getattr(self, "_late_armed", False), False
        if not armed or kwargs.get("disconnect_on_error") is False:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        kwargs["disconnect_on_error"] = False
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.TimeoutError:
            self._hand_over()
            raise
        except redis.ResponseError:  # an error reply: the connection is sound
            raise
        except BaseException:
            self.disconnect()
            raise

    def _hand_over(self) -> None:
        """Give the socket to a greenlet that waits for the late reply, and disconnect."""
        sock = self._sock
        late = None
        if sock is not None and not self._buffered() and _late_waits.acquire(blocking=False):
            self._sock = None  # the next call on this connection gets a fresh socket
            late = _LateReply()
        self.disconnect()
        if late is not None:
            _late_call.reply = late
            try:
                threading.Thread(target=_await_late, args=(sock, late, LATE_REPLY_GRACE),
                                 name="redis-late-reply", daemon=True).start()
            except RuntimeError:  # no thread to be had (shutting down): no reply, then
                try:
                    sock.close()
                finally:
                    _late_waits.release()
                    late.deliver(None)

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


class _PatientConnect(redis.Connection):
    """redis-py's TCP connect, but a connect timeout counts only when the connection is not
    established by the time the greenlet looks (the same reason as :class:`_PatientSocket`:
    a burst that grows the pool opens many connections while the worker is busiest)."""

    def _connect(self) -> Any:
        err: OSError | None = None
        for family, socktype, proto, _, address in socket.getaddrinfo(
                self.host, self.port, self.socket_type, socket.SOCK_STREAM):
            sock = None
            try:
                sock = socket.socket(family, socktype, proto)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.socket_keepalive:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                    for k, v in self.socket_keepalive_options.items():
                        sock.setsockopt(socket.IPPROTO_TCP, k, v)
                sock.settimeout(self.socket_connect_timeout)
                try:
                    sock.connect(address)
                except TimeoutError:
                    if not connected_now(sock):
                        raise
                sock.settimeout(self.socket_timeout)
                return sock
            except OSError as exc:
                err = exc
                if sock is not None:
                    sock.close()
        raise err if err is not None else OSError("getaddrinfo returned nothing")


class _Connection(_CheapCheck, _PatientConnect):
    pass


class _SSLConnection(_CheapCheck, redis.SSLConnection, _PatientConnect):  # TLS over it
    pass


class _UnixConnection(_CheapCheck, redis.UnixDomainSocketConnection):
    pass


_CONNECTION_CLASSES = {"redis": _Connection, "rediss": _SSLConnection, "unix": _UnixConnection}


#: Budget settlements a worker keeps while Redis cannot take them (then they are lost to the
#: counters, not to the ledger).
MAX_QUEUED_SETTLEMENTS = 10_000
#: At most this many queued settlements ride on one reservation (the rest wait for the next
#: call or the timer): after an outage, one script carrying thousands would outlast its
#: timeout, and then be sent again, whole, by the next call.
MAX_CARRIED_SETTLEMENTS = 100

#: Pool size when none is given (tests, scripts): gunicorn's default worker_connections + 1.
DEFAULT_MAX_CONNECTIONS = 4097


def connect(url: str, timeout_ms: int,
            max_connections: int = DEFAULT_MAX_CONNECTIONS) -> redis.Redis:
    """A client that fails fast: short timeouts and no retries (the caller applies on_error).

    The pool holds up to ``max_connections``, sized to the worker's concurrency so that a
    call never finds it exhausted (redis-py's default pool refuses the 101st concurrent call,
    which ``on_error: open`` would let through unlimited). Should every connection be busy
    anyway, a call waits for one up to the same timeout. Connections are opened as needed and
    the pool reconnects on the next command, so service resumes by itself once Redis is back.
    """
    timeout = timeout_ms / 1000
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        connection_class=_CONNECTION_CLASSES[url.split("://", 1)[0].lower()],
    )
    return redis.Redis(connection_pool=pool)


def _semaphore(value: int) -> Any:
    """gevent's own semaphore in a gevent worker: threading's, patched, is a Condition over
    a patched lock, and cost a reservation ~20 us of CPU to take and give back a connection;
    threading's elsewhere (plain threads: tests, the CLI)."""
    if monkey.is_module_patched("threading"):
        return gevent.lock.BoundedSemaphore(value)
    return threading.BoundedSemaphore(value)


class _Lease:
    """The scripts' connections: made by the client's pool, handed out last-in first-out,
    at most ``max_connections`` at once, waiting up to the pool's timeout for one.

    What redis-py's ``BlockingConnectionPool`` does, without what it adds per call in
    version 8 (operation and connection-state metrics, maintenance-mode checks), which
    cost as much CPU as the script call itself. A connection is checked before use, as
    there: leftover bytes or the server's EOF mean it is reconnected.
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._free: list[Any] = []
        self._slots = _semaphore(pool.max_connections)
        self._timeout = pool.timeout

    def get(self) -> Any:
        if not self._slots.acquire(timeout=self._timeout):
            raise redis.ConnectionError("No connection available.")
        conn: Any = None
        try:
            conn = self._free.pop() if self._free else self._pool.make_connection()
            conn.connect()
            try:
                stale = conn.can_read()  # a reply left unread
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                stale = True  # the server closed it
            if stale:
                conn.disconnect()
                conn.connect()
        except BaseException:
            self.put(conn)
            raise
        return conn

    def put(self, conn: Any) -> None:
        if conn is not None:
            self._free.append(conn)
        self._slots.release()


def _decision(specs: Sequence[CounterSpec], reply: Any, budgets: int = 0) -> Decision:
    """reserve.lua's reply as a :class:`Decision`."""
    if int(reply[0]) < 0:  # budget counters missing: indexes are 1-based
        return Decision(False, {}, [], [], [int(k) - 1 for k in reply[2:]])
    allowed = bool(int(reply[0]))
    charged: dict[str, int] = {}
    states: list[CounterState] = []
    for i, spec in enumerate(specs):
        bucket, used, retry, reset = (int(v) for v in reply[2 + 4 * i: 6 + 4 * i])
        if allowed:
            charged[spec.key] = bucket
        states.append(CounterState(used, None if retry < 0 else retry / 1000, reset / 1000))
    first = 2 + 4 * len(specs)
    funds = [BudgetState(int(reply[first + 2 * k]), int(reply[first + 2 * k + 1]))
             for k in range(budgets)]
    return Decision(allowed, charged, states, funds)


class _LateDecision:
    """A :class:`~.store.LateDecision` from the late reply of a reservation."""

    def __init__(self, late: _LateReply, specs: Sequence[CounterSpec], budgets: int) -> None:
        self._late = late
        self._specs = list(specs)
        self._budgets = budgets

    def then(self, callback: Callable[[Decision | None], None]) -> None:
        def convert(raw: Any) -> None:
            try:
                decision = None if raw is None else _decision(self._specs, raw, self._budgets)
            except (TypeError, ValueError, LookupError):  # not reserve.lua's reply
                decision = None
            callback(decision)

        self._late.then(convert)


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
        self._lease = _Lease(client.connection_pool)
        self._reserve = client.register_script(_script_text("reserve.lua"))
        self._reconcile = client.register_script(_script_text("reconcile.lua"))
        self._pending: _Pending = {}
        self._settling: list[Settlement] = []  # budget settlements queued like _pending
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
            return self._evalsha(script, keys, args)
        except redis.RedisError as exc:
            # Only the exception class: a message may echo the URL with its password.
            raise StoreError(type(exc).__name__) from None

    def _evalsha(self, script: Any, keys: list[str], args: list[str | int]) -> Any:
        """EVALSHA on a pooled connection, without redis-py's per-command layers.

        Every call of every request comes here, and redis-py's command path (retry
        wrapper, response callbacks, its own operation metrics) costs more CPU than
        sending the command and reading its reply. Retries are off anyway (the caller
        applies ``on_error``); a connection that failed is dropped, as redis-py would; a
        script Redis does not know yet (a restart, a flush) is loaded by redis-py's own
        ``Script`` call.
        """
        conn = self._lease.get()
        try:
            conn.send_script(script.sha, keys, args)
            return conn.read_response()
        except redis.exceptions.NoScriptError:
            pass
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            conn.disconnect()
            raise
        finally:
            self._lease.put(conn)
        return script(keys=keys, args=args)

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:  # the message may name the URL (a password): not kept
            raise StoreError(type(exc).__name__) from None

    def reserve(self, specs: Sequence[CounterSpec], budgets: Sequence[BudgetSpec] = (),
                hold: str = "", hold_ttl: float = 0.0) -> Decision:
        keys = [self.prefix + s.key for s in specs]
        carried, settling = self._take_pending(MAX_CARRIED_SETTLEMENTS)
        args: list[str | int] = [self._now_arg(), len(specs), len(budgets), hold,
                                 int(hold_ttl * 1000), len(settling)]
        for s in specs:
            args += [s.limit, s.cost, s.need, s.granularity * 1000, s.span, int(s.optimistic)]
        for b in budgets:
            keys += [self.prefix + b.key, self.prefix + b.key + ":z"]
            args += [b.limit, b.cost, b.expires_at * 1000, "" if b.seed is None else b.seed]
        self._add_settlements(keys, args, settling)
        if carried:
            self._add_corrections(keys, args, carried)
        _late_call.wanted, _late_call.reply = True, None
        try:
            reply = self._run(self._reserve, keys, args)
        except StoreError as exc:
            late: _LateReply | None = _late_call.reply
            if late is not None:
                exc.late = _LateDecision(late, specs, len(budgets))
            self._requeue(settling, exc)  # settling twice is harmless: sent again
            # The script may have run (a reply lost or too late to wait for): its holds are
            # released by a later call, unless the late reply comes and settles them.
            # Releasing a hold that was never taken changes nothing.
            releases = [Settlement(b.key, hold, 0, b.expires_at) for b in budgets]
            if late is None:
                self._requeue(releases, exc)
                if carried:
                    self._lost(exc)
            else:
                late.then(self._unless_answered(exc, bool(carried), releases))
            raise
        finally:
            _late_call.wanted, _late_call.reply = False, None
        return _decision(specs, reply, len(budgets))

    def adjust(self, adjustments: Sequence[Adjustment],
               settlements: Sequence[Settlement] = ()) -> None:
        """Apply corrections and settlements now, or (``reconcile_delay`` > 0) queue them
        for the next reservation or the timer; see the module doc. A queued settlement keeps
        its hold a little longer, which only makes its budget look poorer meanwhile."""
        todo: _Pending = {}
        for a in adjustments:
            if a.delta:
                k = (a.key, a.bucket, a.granularity, a.span, a.delta < 0)
                todo[k] = todo.get(k, 0) + a.delta
        if not todo and not settlements:
            return
        if self.reconcile_delay <= 0:
            try:
                self._send(todo, settlements)
            except StoreError as exc:
                self._requeue(settlements, exc)  # for the next reservation to carry
                raise
            return
        timer: threading.Timer | None = None
        with self._lock:
            pending = self._pending
            for k, delta in todo.items():
                pending[k] = pending.get(k, 0) + delta
            self._settling.extend(settlements)
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
        pending, settling = self._take_pending()
        if not pending and not settling:
            return
        # Settlements go in scripts of a bounded size (see MAX_CARRIED_SETTLEMENTS), the
        # corrections with the first.
        step = 10 * MAX_CARRIED_SETTLEMENTS
        for start in range(0, max(len(settling), 1), step):
            try:
                self._send(pending, settling[start:start + step])
            except StoreError as exc:
                self._requeue(settling[start:], exc)
                if pending:
                    self._lost(exc)
                return
            pending = {}

    def _requeue(self, settlements: Sequence[Settlement], exc: StoreError) -> None:
        """Keep settlements that may not have reached Redis for the next call to carry.

        Unlike a rate-limit correction, a settlement dropped would leave its spend out of
        the budget for good (a total never expires); settling is idempotent (budget.lua),
        so sending one twice is harmless. At most :data:`MAX_QUEUED_SETTLEMENTS` wait.
        """
        if not settlements:
            return
        with self._lock:
            room = MAX_QUEUED_SETTLEMENTS - len(self._settling)
            kept = list(settlements[:max(room, 0)])
            self._settling[:0] = kept
        if len(kept) < len(settlements):
            self._lost(exc)

    def _take_pending(self, most: int | None = None) -> tuple[_Pending, list[Settlement]]:
        """The queued corrections, and the queued settlements (``most`` of them, if given)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            settling = self._settling[:most]
            del self._settling[:most]
        return pending, settling

    def _add_settlements(self, keys: list[str], args: list[str | int],
                         settlements: Sequence[Settlement]) -> None:
        for st in settlements:
            keys += [self.prefix + st.key, self.prefix + st.key + ":z"]
            args += [st.hold, st.amount, st.expires_at * 1000]

    def _add_corrections(self, keys: list[str], args: list[str | int], todo: _Pending) -> None:
        for (key, bucket, granularity, span, _), delta in todo.items():
            keys.append(self.prefix + key)
            args += [bucket, delta, granularity * 1000, span]

    def _send(self, todo: _Pending, settlements: Sequence[Settlement] = ()) -> None:
        keys: list[str] = []
        args: list[str | int] = [self._now_arg(), len(settlements)]
        self._add_settlements(keys, args, settlements)
        self._add_corrections(keys, args, todo)
        self._run(self._reconcile, keys, args)

    def _unless_answered(self, exc: StoreError, carried: bool,
                         releases: list[Settlement]) -> Callable[[Any], None]:
        """What a reservation's late reply that never came leaves to do: the corrections it
        carried are lost, and the holds it may have taken are released by a later call."""
        def settle(raw: Any) -> None:
            if raw is None:
                self._requeue(releases, exc)
                if carried:
                    self._lost(exc)
        return settle

    def _lost(self, exc: StoreError) -> None:
        if self.on_lost is not None:
            self.on_lost(exc)

    def close(self) -> None:
        self.flush()
        atexit.unregister(self.flush)
        self.client.close()
