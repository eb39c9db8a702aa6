"""The ledger writer: a worker's spend, summed in memory and written to the database in batches.

A finished call hands its :class:`~llmproxy.budgets.model.SpendRow` to :meth:`LedgerWriter.add`,
which only adds numbers under a lock (no I/O, so it never yields to gevent). A background
thread (a greenlet under gevent) writes the sums every ``flush_seconds``, in one transaction,
off the request path. When the database fails, the sums stay queued, merged with newer ones,
and are written at a later interval; while more than ``max_pending`` rows are queued, rows of
new identities are dropped and counted rather than letting memory grow without bound.

:func:`open_ledger` registers the writer with the app, where the worker's shutdown
(:mod:`llmproxy.shutdown`) flushes it, and with ``atexit``, which closes it when the worker
exits. This module does not import the database layer: the store is anything with
``add_spend``.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from flask import Flask

from .model import SpendRow

log = logging.getLogger("llmproxy.budgets")

EXTENSION_KEY = "llmproxy.ledger"
#: Seconds between two warnings of the same kind (an outage fails every flush).
_WARN_EVERY = 60.0
#: How long close() waits for a write in progress in the background.
_JOIN_TIMEOUT = 10.0

_Identity = tuple[object, ...]


class SpendStore(Protocol):
    """What the writer needs of :class:`~llmproxy.keys.store.KeyStore`."""

    def add_spend(self, rows: Sequence[SpendRow]) -> None: ...


def _sum(a: SpendRow, b: SpendRow) -> SpendRow:
    return dataclasses.replace(a, cost_nanos=a.cost_nanos + b.cost_nanos,
                               requests=a.requests + b.requests,
                               input_tokens=a.input_tokens + b.input_tokens,
                               output_tokens=a.output_tokens + b.output_tokens)


class LedgerWriter:
    """Sums spend rows per identity and writes them to ``store`` every ``flush_seconds``."""

    def __init__(self, store: SpendStore, flush_seconds: float, max_pending: int = 10_000,
                 on_dropped: Callable[[int], None] | None = None) -> None:
        if flush_seconds <= 0:
            raise ValueError("flush_seconds must be > 0")
        self._store = store
        self.flush_seconds = flush_seconds
        self.max_pending = max_pending
        self._on_dropped = on_dropped
        self._pending: dict[_Identity, SpendRow] = {}
        # Guards _pending and dropped; nothing inside it does I/O or waits, so add() never
        # yields to gevent.
        self._lock = threading.Lock()
        # One write at a time (the timer's, flush()'s, close()'s): two batches written at
        # once could be re-queued in the wrong order on failure, and would only compete.
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._last_warning: dict[str, float] = {}
        self.dropped = 0  # rows refused because too many were queued

    # -- the request path ---------------------------------------------------------------------
    def add(self, row: SpendRow) -> None:
        """Queue ``row``, summed with a queued row of the same identity; no I/O."""
        identity: _Identity = row.identity
        dropped = False
        with self._lock:
            queued = self._pending.get(identity)
            if queued is not None:
                self._pending[identity] = _sum(queued, row)
            elif len(self._pending) < self.max_pending:
                self._pending[identity] = row
            else:
                self.dropped += 1
                dropped = True
        if dropped:  # outside the lock: the callback and the log may do I/O
            self._dropped()
        if self._timer is None and not self._stop.is_set():
            self._start()

    def pending(self) -> int:
        """How many distinct rows are queued."""
        return len(self._pending)

    # -- writing ------------------------------------------------------------------------------
    def flush(self) -> bool:
        """Write what is queued now; False when the database failed (the rows stay queued)."""
        with self._write_lock:
            with self._lock:
                batch, self._pending = self._pending, {}
            if not batch:
                return True
            try:
                self._store.add_spend(list(batch.values()))
            except Exception as exc:  # the store's error, or a bug: keep the rows either way
                self._requeue(batch)
                self._warn("write", "spend ledger: %d row(s) not written, retried in %gs (%s)",
                           len(batch), self.flush_seconds, exc)
                return False
            return True

    def _requeue(self, batch: dict[_Identity, SpendRow]) -> None:
        """Put a failed batch back, merged with rows added meanwhile.

        These rows were accepted once: they are kept even past ``max_pending``.
        """
        with self._lock:
            newer, self._pending = self._pending, batch
            for identity, row in newer.items():
                queued = self._pending.get(identity)
                self._pending[identity] = row if queued is None else _sum(queued, row)

    def close(self) -> None:
        """Stop the background writer and write what is queued; safe to call again."""
        self._stop.set()
        timer = self._timer
        if timer is not None and timer is not threading.current_thread():
            timer.join(_JOIN_TIMEOUT)
        if not self.flush():
            log.error("spend ledger: %d row(s) lost at exit: the database failed",
                      self.pending())

    # -- the background writer ----------------------------------------------------------------
    def _start(self) -> None:
        with self._lock:
            if self._timer is not None:
                return
            # Started on first use, in the worker: a thread started before gunicorn forks
            # would not exist in the workers.
            self._timer = threading.Thread(target=self._run, name="llmproxy-ledger",
                                           daemon=True)
        self._timer.start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            try:
                self.flush()
            except Exception:  # never let a bug end the writer silently
                log.exception("spend ledger: flush failed")

    # -- logs ---------------------------------------------------------------------------------
    def _dropped(self) -> None:
        if self._on_dropped is not None:
            self._on_dropped(1)
        self._warn("drop", "spend ledger: %d rows queued (max_pending), new rows are dropped "
                           "(%d so far)", self.max_pending, self.dropped)

    def _warn(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last_warning.get(kind)
        if last is None or now - last >= _WARN_EVERY:
            self._last_warning[kind] = now
            log.warning(message, *args)


def open_ledger(app: Flask, store: SpendStore, flush_seconds: float, *,
                max_pending: int = 10_000,
                on_dropped: Callable[[int], None] | None = None) -> LedgerWriter:
    """A writer for ``app``'s worker: flushed at shutdown, closed at exit."""
    writer = LedgerWriter(store, flush_seconds, max_pending, on_dropped)
    # Worker exit (after in-flight calls ended and recorded their spend): write the rest.
    atexit.register(writer.close)
    app.extensions[EXTENSION_KEY] = writer
    return writer


def get_ledger(app: Flask) -> LedgerWriter | None:
    """The app's ledger writer, when budgets are on."""
    writer: LedgerWriter | None = app.extensions.get(EXTENSION_KEY)
    return writer
