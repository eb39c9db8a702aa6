"""The worker's running provider calls: deadlines for slow clients, and an end at shutdown.

Every provider call is registered from the moment it is identified until its response is
closed. A call marks the two things a client can stall by storing a start time in
``reading`` (its body is being read) or ``writing`` (a response write is under way) and
zero afterwards; that is all it costs per chunk. One repeating timer per worker (its tick
at most a second) sweeps the calls:

* a body read that began more than ``body_timeout`` ago gets :class:`BodyTimeout` thrown
  into its greenlet, which waits in the socket read: what ``gevent.Timeout`` does, without
  a timer armed and cancelled for every read (gunicorn's gevent worker reads request
  bodies with no timeout at all);
* a response write blocked for more than ``send_timeout`` (the client reads nothing, so its
  socket buffer stays full) gets the client socket shut down: the blocked ``sendall`` then
  fails with EPIPE, which gunicorn drops quietly, and the stream generator closes the
  upstream response and records ``client_aborted``. A socket timeout would need no sweep,
  but gunicorn logs a timed-out write with a traceback (one per stalled client) and would
  apply the timeout to its own keep-alive reads too.

When the worker has to stop, :meth:`InFlight.cut` ends every call still running with
``outcome: shutdown``, so each gets its terminal event (records, limiter correction)
before the process is gone; :mod:`llmproxy.shutdown` decides when.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import gevent

from .exchange import ErrorKind, Exchange, Outcome

log = logging.getLogger(__name__)

#: The longest sweep interval; shorter when a timeout is under four seconds.
MAX_TICK = 1.0


class BodyTimeout(Exception):
    """Thrown into a greenlet whose request body did not arrive within ``body_timeout``."""


class Call:
    """One registered call: its exchange, greenlet, client socket and stall marks."""

    __slots__ = ("exchange", "greenlet", "client", "reading", "writing", "_calls")

    def __init__(self, exchange: Exchange, greenlet: Any, client: Any,
                 calls: dict[Exchange, Call]) -> None:
        self.exchange = exchange
        self.greenlet = greenlet
        self.client = client  # gunicorn's client socket; None under other servers
        self.reading = 0.0  # time.monotonic() when the current body read began, else 0
        self.writing = 0.0  # time.monotonic() when the current response write began, else 0
        self._calls = calls

    def done(self) -> None:
        """The response was closed: forget the call (a ``call_on_close`` callback)."""
        self._calls.pop(self.exchange, None)

    def hang_up(self) -> None:
        """Shut the client connection down, both ways.

        After a body timeout the connection's framing is lost (part of the body may still
        come): reading on would take the rest of the body for the next request.
        """
        if self.client is not None:
            # The OS-level socket under gevent's wrapper: gevent's own shutdown() would fail a
            # write waiting on it with EBADF, which gunicorn logs with a traceback; shut down
            # underneath, the waiting write wakes up to EPIPE, which gunicorn drops quietly.
            raw = getattr(self.client, "_sock", self.client)
            try:
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed or reset
                pass


class InFlight:
    """The provider calls running in this worker (one per app)."""

    def __init__(self, body_timeout: float, send_timeout: float) -> None:
        self.body_timeout = body_timeout
        self.send_timeout = send_timeout
        self.tick = min(MAX_TICK, body_timeout / 4, send_timeout / 4)
        self._calls: dict[Exchange, Call] = {}
        self._timer: Any = None  # the hub's repeating timer, made with the first call

    def __len__(self) -> int:
        return len(self._calls)

    def add(self, ex: Exchange, client: Any) -> Call:
        """Register ``ex``, served by the current greenlet on ``client``."""
        call = Call(ex, gevent.getcurrent(), client, self._calls)
        self._calls[ex] = call
        timer = self._timer
        if timer is None:
            timer = self._timer = gevent.get_hub().loop.timer(self.tick, self.tick)
        if not timer.active:
            timer.start(self.sweep)
        return call

    def sweep(self, now: float | None = None) -> None:
        """Act on every call stalled past its timeout.

        Runs in the hub (its timer's callback): a greenlet thrown into switches back to the
        hub when it next waits, so called from any other greenlet it would never return.
        """
        if not self._calls:
            if self._timer is not None:
                self._timer.stop()  # restarted by the next add()
            return
        now = time.monotonic() if now is None else now
        read_limit = now - self.body_timeout
        write_limit = now - self.send_timeout
        late = [call for call in self._calls.values()
                if 0.0 < call.reading <= read_limit or 0.0 < call.writing <= write_limit]
        for call in late:  # acted on after the scan: a thrown-into greenlet may end its call
            if 0.0 < call.reading <= read_limit:
                call.reading = 0.0
                self._throw(call, BodyTimeout())
            elif 0.0 < call.writing <= write_limit:
                call.writing = 0.0
                ex = call.exchange
                if not ex.finished:
                    ex.outcome = ex.outcome or Outcome.CLIENT_ABORTED
                    ex.error_kind = ex.error_kind or ErrorKind.SEND_TIMEOUT
                call.hang_up()

    @staticmethod
    def _throw(call: Call, exc: BaseException) -> None:
        greenlet = call.greenlet
        if greenlet.dead or greenlet is gevent.getcurrent():
            return
        try:
            # Switches to the greenlet now, as gevent.Timeout does: it is parked in the
            # read the mark was set around, and comes back here when it next waits.
            greenlet.throw(exc)
        except Exception:  # a greenlet that died of it: nothing left to end
            log.exception("throwing %s into a stalled call failed", type(exc).__name__)

    def cut(self, wait: float) -> int:
        """End every unfinished call as ``shutdown``; return how many there were.

        Each call's client connection is shut down and its greenlet killed (an upstream
        read or send under way is abandoned, and urllib3 closes the connection); a stream
        then records itself from its generator's ``finally``. Calls that have not recorded
        themselves within ``wait`` seconds (no response started yet) are finished here.
        """
        calls = [call for call in self._calls.values() if not call.exchange.finished]
        current = gevent.getcurrent()
        for call in calls:
            call.exchange.outcome = call.exchange.outcome or Outcome.SHUTDOWN
            call.hang_up()
            if not call.greenlet.dead and call.greenlet is not current:
                gevent.kill(call.greenlet)  # raises GreenletExit where it waits; returns at once
        greenlets = [c.greenlet for c in calls if isinstance(c.greenlet, gevent.Greenlet)
                     and c.greenlet is not current]
        if greenlets:
            gevent.joinall(greenlets, timeout=wait)
        for call in calls:
            call.exchange.finish()  # once only: a no-op for those that finished themselves
            call.done()
        return len(calls)
