"""The registry of running calls: body and send deadlines, and the cut at shutdown.

These run greenlets on gevent's own sockets (no monkey-patching needed) and drive the sweep
with an explicit clock value, so no test waits for a deadline to pass. The sweep runs in the
hub, as its timer runs it: a greenlet it throws into gives control back to the hub.
"""

from __future__ import annotations

import socket as stdlib_socket
import time
from typing import Any

import gevent
import gevent.event
import pytest
from gevent import socket

from llmproxy.exchange import ErrorKind, Exchange, Outcome
from llmproxy.inflight import BodyTimeout, InFlight


def sweep(inflight: InFlight, at: float) -> None:
    """Run one sweep in the hub, at clock value ``at``, and wait for it."""
    done = gevent.event.Event()

    def run() -> None:
        inflight.sweep(at)
        done.set()

    gevent.get_hub().loop.run_callback(run)
    assert done.wait(5)


def exchange(finished: list[Exchange]) -> Exchange:
    return Exchange("rid", "POST", "/openai/v1/chat/completions", provider="openai",
                    _listeners=(finished.append,))


def test_a_body_read_past_body_timeout_gets_body_timeout_thrown_in() -> None:
    inflight = InFlight(body_timeout=30, send_timeout=60)
    ours, theirs = socket.socketpair()
    outcome: list[str] = []
    registered = gevent.event.Event()

    def read_body() -> None:
        call = inflight.add(exchange([]), ours)
        call.reading = time.monotonic()
        registered.set()
        try:
            ours.recv(100)  # the client never sends
            outcome.append("data")
        except BodyTimeout:
            outcome.append("timeout")
        finally:
            call.reading = 0.0

    reader = gevent.spawn(read_body)
    registered.wait(5)
    gevent.sleep(0)  # let it park in recv
    sweep(inflight, time.monotonic() + 29)
    assert outcome == []  # not yet
    sweep(inflight, time.monotonic() + 31)
    reader.join(5)
    assert outcome == ["timeout"]
    ours.close()
    theirs.close()


def test_a_write_blocked_past_send_timeout_drops_the_client() -> None:
    inflight = InFlight(body_timeout=30, send_timeout=60)
    ours, theirs = socket.socketpair()
    ours.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_SNDBUF, 4096)
    ex = exchange([])
    errors: list[BaseException] = []
    blocked = gevent.event.Event()

    def write_forever() -> None:
        call = inflight.add(ex, ours)
        try:
            while True:
                call.writing = time.monotonic()
                blocked.set()
                ours.sendall(b"x" * 65536)  # the peer reads nothing: this soon blocks
                call.writing = 0.0
        except OSError as exc:
            errors.append(exc)

    writer = gevent.spawn(write_forever)
    blocked.wait(5)
    gevent.sleep(0.05)
    assert not writer.dead, "the write should be blocked on the full socket"
    sweep(inflight, time.monotonic() + 61)
    writer.join(5)
    assert writer.dead
    # EPIPE (what gunicorn drops quietly), not gevent's "closed in another greenlet" (EBADF)
    assert isinstance(errors[0], BrokenPipeError), errors
    assert (ex.outcome, ex.error_kind) == (Outcome.CLIENT_ABORTED, ErrorKind.SEND_TIMEOUT)
    theirs.close()
    ours.close()


def test_marks_at_zero_are_never_late() -> None:
    inflight = InFlight(body_timeout=1, send_timeout=1)
    call = inflight.add(exchange([]), None)
    sweep(inflight, time.monotonic() + 1e9)
    assert (call.reading, call.writing) == (0.0, 0.0)
    assert len(inflight) == 1


def test_cut_ends_every_running_call_once_as_shutdown() -> None:
    inflight = InFlight(body_timeout=30, send_timeout=60)
    finished: list[Exchange] = []
    streaming, waiting = exchange(finished), exchange(finished)
    release = gevent.event.Event()
    started = gevent.event.Event()

    def stream() -> Any:
        inflight.add(streaming, None)
        started.set()
        try:
            release.wait()  # an upstream read that never returns
        finally:
            streaming.finish(Outcome.COMPLETED)  # what the relay's generator does

    def wait_for_provider() -> None:
        inflight.add(waiting, None)
        release.wait()  # killed here: nothing of its own records it

    greenlets = [gevent.spawn(stream), gevent.spawn(wait_for_provider)]
    started.wait(5)
    gevent.sleep(0)
    assert inflight.cut(wait=1) == 2
    assert all(g.dead for g in greenlets)
    assert finished == [streaming, waiting] or finished == [waiting, streaming]
    assert streaming.outcome == waiting.outcome == Outcome.SHUTDOWN
    assert len(inflight) == 0


def test_cut_leaves_finished_calls_alone() -> None:
    inflight = InFlight(body_timeout=30, send_timeout=60)
    finished: list[Exchange] = []
    ex = exchange(finished)
    call = inflight.add(ex, None)
    ex.finish()
    assert inflight.cut(wait=0) == 0
    assert (ex.outcome, finished) == (Outcome.COMPLETED, [ex])
    call.done()
    assert len(inflight) == 0


@pytest.mark.parametrize(("body", "send", "tick"), [(30, 60, 1.0), (2, 60, 0.5), (30, 1, 0.25)])
def test_the_sweep_ticks_at_least_four_times_per_timeout(body: float, send: float,
                                                         tick: float) -> None:
    assert InFlight(body, send).tick == tick
