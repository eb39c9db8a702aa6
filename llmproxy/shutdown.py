"""How a gunicorn worker stops without losing a record.

On SIGTERM gunicorn's gevent worker stops accepting and lets running calls go on; the master
sends SIGKILL ``graceful_timeout`` seconds after its SIGTERM, and a call still running then
would vanish without its terminal event: no usage record, no access record, no limiter
correction. So the worker ends such calls itself, :func:`margin` seconds before that
SIGKILL (:meth:`~llmproxy.inflight.InFlight.cut`, ``outcome: shutdown``), then waits for the
usage-record writer, writes the spend ledger and sends the limiter's held-back corrections.
SIGINT and SIGQUIT (quick shutdown: gunicorn exits the worker 0.1 s after calling
``worker_int``) do the same at once.

``gunicorn.conf.py`` calls :func:`install` from ``post_worker_init`` (in the worker, once
gevent has patched it and the app is loaded) and :func:`quick` from ``worker_int``.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from typing import Any

import gevent
from flask import Flask

from .budgets.ledger import get_ledger
from .observe.records import get_sink
from .ratelimit import get_ratelimit
from .state import EXTENSION_KEY, get_state

log = logging.getLogger(__name__)

#: Seconds a quick shutdown waits for cut calls to record themselves.
QUICK_WAIT = 0.5


def margin(graceful_timeout: float) -> float:
    """How long before the master's SIGKILL running calls are cut.

    Enough for them to record themselves and for gunicorn's once-a-second check to find the
    worker idle and let it exit by itself; a quarter of a graceful timeout under 8 s, which
    leaves most of a short one to the streams.
    """
    return min(2.0, graceful_timeout / 4)


class Shutdown:
    """The end of one worker's app: cut what still runs, then write what is queued."""

    def __init__(self, app: Flask, graceful_timeout: float) -> None:
        self.app = app
        self.graceful_timeout = graceful_timeout
        self.begun = False
        self.scheduled: Any = None  # the greenlet that will run end()

    def on_sigterm(self) -> None:
        """Schedule the cut; called from the signal handler, so it only spawns."""
        if self.begun:
            return
        self.begun = True
        early = margin(self.graceful_timeout)
        self.scheduled = gevent.spawn_later(max(self.graceful_timeout - early, 0.0), self.end,
                                            early / 4)

    def end(self, wait: float) -> int:
        """Cut every running call, wait up to ``wait`` s for their records, flush; return
        how many calls were cut."""
        cut = get_state(self.app).inflight.cut(wait)
        if cut:
            log.warning("shutdown: %d call(s) still running were cut before the worker's end",
                        cut)
        sink = get_sink(self.app)
        if sink is not None and not sink.flush(max(wait, 0.1)):
            log.error("shutdown: usage records still queued when the worker stops")
        ledger = get_ledger(self.app)
        if ledger is not None:  # the spend of the calls just cut, and of every other one
            ledger.flush()
        limiter = get_ratelimit(self.app)
        # Only the Redis store holds corrections back (reconcile_delay_ms); send them now.
        flush: Callable[[], None] | None = getattr(limiter.store, "flush", None) \
            if limiter is not None else None
        if flush is not None:
            flush()
        return cut


def _ours(worker: Any) -> Flask | None:
    app = getattr(worker, "wsgi", None)
    return app if isinstance(app, Flask) and EXTENSION_KEY in app.extensions else None


def install(worker: Any) -> Shutdown | None:
    """Chain a SIGTERM handler before gunicorn's that schedules :meth:`Shutdown.end`."""
    app = _ours(worker)
    if app is None:
        return None
    shutdown = Shutdown(app, float(worker.cfg.graceful_timeout))
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        shutdown.on_sigterm()
        if callable(previous):
            previous(signum, frame)  # gunicorn's: stop accepting, let running calls go on

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn has it: no EINTR in requests
    return shutdown


def quick(worker: Any) -> None:
    """``worker_int``: the worker exits in 0.1 s; cut and record everything now."""
    app = _ours(worker)
    if app is not None:
        Shutdown(app, 0.0).end(QUICK_WAIT)
