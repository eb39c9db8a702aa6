"""Usage records: one JSON line per finished request, appended to a size-rotated file.

The request path only serialises the record and puts it on a bounded in-memory queue; a
:class:`logging.handlers.QueueListener` thread (a greenlet under gevent, where writes to the
page cache take microseconds) does the file I/O. A full queue drops the record and counts it;
a failed write (full disk, unwritable path) is logged at most once a minute and never raised.

Several gunicorn workers append to the same file: each line is written whole under an
exclusive ``flock`` on ``<path>.lock``, and a worker that finds the file rotated by another
reopens it before writing, so no line is lost or written into a rotated-away file.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from flask import Flask

from ..config import UsageRecordSettings
from ..exchange import Exchange

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 10_000
#: Longest text a record field holds. Model names, user ids, paths and the provider's ids are
#: chosen by others; longer ones are cut here, the one builder of access and usage records,
#: so a 2 MiB model name makes a 256-character field, not a 2 MiB log line.
MAX_FIELD_CHARS = 256
_ERROR_LOG_INTERVAL = 60.0


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def cut(text: str | None) -> str | None:
    """``text``, or its first :data:`MAX_FIELD_CHARS` characters ending in "…" when longer."""
    if text is None or len(text) <= MAX_FIELD_CHARS:
        return text
    return text[:MAX_FIELD_CHARS - 1] + "\u2026"


def record_of(ex: Exchange) -> dict[str, Any]:
    """The one record of a finished exchange, written to the access log and the usage file:
    what was called, by whom, how it ended, what it used (never a key or a request body)."""
    usage = ex.meta.usage
    return {
        "ts": _iso(ex.started_wall + (ex.duration or 0.0)),
        "started_at": _iso(ex.started_wall),
        "request_id": ex.request_id,
        "method": cut(ex.method),
        "path": cut(ex.path),
        "provider": ex.provider,
        "dialect": ex.dialect,
        "model": cut(ex.model),
        "response_model": cut(ex.meta.model),
        "status": ex.status,
        "outcome": ex.outcome,
        "error_kind": ex.error_kind,
        "streaming": ex.streaming,
        "duration_ms": _ms(ex.duration),
        "ttfb_ms": _ms(ex.ttfb),
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "output_estimated": ex.meta.output_estimated,
        "total_tokens": usage.total_tokens,
        "cached_tokens": usage.cached_tokens,
        "cache_creation_tokens": usage.cache_creation_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "finish_reason": cut(ex.meta.finish_reason),
        "user": cut(ex.user),
        "user_source": ex.user_source,
        "key_fingerprint": ex.key_fingerprint,
        "key_id": ex.key_id,
        "team": ex.team,
        "request_bytes": ex.request_bytes,
        "response_bytes": ex.response_bytes,
        "upstream_request_id": cut(ex.meta.response_id),
        "cost_usd": ex.cost_usd,
    }


class _LockedRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler safe for several processes appending to one file."""

    def __init__(self, path: str, max_bytes: int, backups: int,
                 on_error: Callable[[BaseException], None]) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8",
                         delay=True)
        self.setFormatter(logging.Formatter("%(message)s"))
        self._lock_path = path + ".lock"
        self._lock_fd: int | None = None
        self._on_error = on_error

    @contextmanager
    def _interprocess_lock(self) -> Iterator[None]:
        if self._lock_fd is None:
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _reopen_if_rotated(self) -> None:
        if self.stream is None:
            return
        try:
            current = os.stat(self.baseFilename)
        except FileNotFoundError:
            current = None
        mine = os.fstat(self.stream.fileno())
        if current is None or (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
            self.stream.close()
            self.stream = None  # reopened by the next write

    def emit(self, record: logging.LogRecord) -> None:
        try:
            with self._interprocess_lock():
                self._reopen_if_rotated()
                if self.shouldRollover(record):
                    self.doRollover()
                logging.FileHandler.emit(self, record)
        except Exception:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        """Called by emit with the exception active: report it instead of printing to stderr."""
        exc = sys.exc_info()[1]
        self._discard_stream()
        if exc is not None:
            self._on_error(exc)

    def _discard_stream(self) -> None:
        # After a failed write the buffer may hold a partial line: drop it with the stream,
        # so the next record starts on a fresh, complete line.
        stream, self.stream = self.stream, None
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass

    def close(self) -> None:
        super().close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class _FlushMark(logging.LogRecord):
    """Not a record: set by the writer when it reaches it (see UsageRecordSink.flush)."""

    def __init__(self) -> None:
        super().__init__("llmproxy.records", logging.INFO, "", 0, "", None, None)
        self.written = threading.Event()


class _QueueListener(logging.handlers.QueueListener):
    def handle(self, record: logging.LogRecord) -> None:
        if isinstance(record, _FlushMark):
            record.written.set()
            return
        super().handle(record)

    def enqueue_sentinel(self) -> None:
        # The stdlib uses put_nowait, which fails on a full queue: wait for the writer instead.
        self.queue.put(self._sentinel)  # type: ignore[attr-defined]


class UsageRecordSink:
    """Non-blocking JSONL writer with size-based rotation."""

    def __init__(self, path: str, max_bytes: int, backups: int,
                 queue_size: int = DEFAULT_QUEUE_SIZE,
                 on_drop: Callable[[str], None] | None = None) -> None:
        self.path = path
        self._on_drop = on_drop
        self._last_error_log = 0.0
        self._queue: queue.Queue[logging.LogRecord] = queue.Queue(queue_size)
        self._handler = _LockedRotatingFileHandler(path, max_bytes, backups, self._write_failed)
        self._listener = _QueueListener(self._queue, self._handler)
        self._listener.start()
        self._closed = False

    def on_finish(self, ex: Exchange) -> None:
        """Terminal-event listener: queue the exchange's record."""
        if ex.provider is not None:
            self.write(record_of(ex))

    def write(self, record: dict[str, Any]) -> bool:
        """Queue one record; ``False`` when it was dropped (queue full or sink closed)."""
        if self._closed:
            self._dropped("closed")
            return False
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str)
        item = logging.makeLogRecord({"msg": line, "levelno": logging.INFO,
                                      "levelname": "INFO"})
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._dropped("queue_full")
            self._log_error("usage records: queue full, record dropped")
            return False
        return True

    def flush(self, timeout: float = 1.0) -> bool:
        """Wait until every record queued so far is written; ``False`` after ``timeout`` s.

        A mark queued behind them is seen by the writer once they are written (the queue is
        FIFO). The sink stays open: records of calls still ending are written as usual.
        """
        if self._closed:
            return True
        mark = _FlushMark()
        try:
            self._queue.put(mark, timeout=timeout)
        except queue.Full:
            return False
        return mark.written.wait(timeout)

    def close(self) -> None:
        """Write what is queued, then stop; safe to call twice (atexit and worker_exit)."""
        if self._closed:
            return
        self._closed = True
        self._listener.stop()  # drains the queue before returning
        self._handler.close()

    def _write_failed(self, exc: BaseException) -> None:
        self._dropped("write_error")
        self._log_error("usage records: cannot write %s: %s", self.path, exc)

    def _dropped(self, reason: str) -> None:
        if self._on_drop is not None:
            self._on_drop(reason)

    def _log_error(self, message: str, *args: object) -> None:
        # A full disk fails every write: one line a minute says so without flooding the log.
        now = time.monotonic()
        if now - self._last_error_log >= _ERROR_LOG_INTERVAL or not self._last_error_log:
            self._last_error_log = now
            log.error(message, *args)


EXTENSION_KEY = "llmproxy.records"


def get_sink(app: Flask) -> UsageRecordSink | None:
    """The app's usage-record sink, when usage records are enabled."""
    sink: UsageRecordSink | None = app.extensions.get(EXTENSION_KEY)
    return sink


def open_sink(app: Flask, settings: UsageRecordSettings,
              on_drop: Callable[[str], None] | None = None) -> UsageRecordSink:
    """The configured sink for ``app``, flushed at worker exit; its directory is created."""
    path = settings.path
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as exc:  # the sink logs each failed write; start anyway
        log.error("usage records: cannot create the directory of %s: %s", path, exc)
    sink = UsageRecordSink(path, settings.max_bytes, settings.backups, on_drop=on_drop)
    # Worker exit (SIGTERM, after in-flight streams finished): write what is still queued.
    atexit.register(sink.close)
    app.extensions[EXTENSION_KEY] = sink
    return sink
