"""The worker's end, without gunicorn: when calls are cut, and what is written by then."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gevent
import gevent.event
import pytest

from llmproxy.exchange import Exchange, Outcome
from llmproxy.shutdown import Shutdown, install, margin
from llmproxy.state import get_state


@pytest.mark.parametrize(("graceful", "expected"), [(120, 2.0), (8, 2.0), (4, 1.0), (0, 0.0)])
def test_calls_are_cut_two_seconds_before_the_kill_or_a_quarter_of_a_short_timeout(
        graceful: float, expected: float) -> None:
    assert margin(graceful) == expected


def test_end_cuts_running_calls_and_their_records_are_written(
        make_app: Callable[..., Any], tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    app = make_app({"usage_records": {"enabled": True, "path": str(path)}})
    state = get_state(app)
    started = gevent.event.Event()
    ex = Exchange("cut-me-1234", "POST", "/openai/v1/chat/completions", provider="openai",
                  dialect="openai", _listeners=tuple(state.listeners))

    def waiting_for_the_provider() -> None:
        state.inflight.add(ex, None)
        started.set()
        gevent.sleep(60)

    call = gevent.spawn(waiting_for_the_provider)
    started.wait(5)
    assert Shutdown(app, 10).end(wait=1) == 1
    assert call.dead
    [record] = [json.loads(line) for line in path.read_text().splitlines()]
    assert (record["request_id"], record["outcome"]) == ("cut-me-1234", "shutdown")
    assert ex.outcome == Outcome.SHUTDOWN
    assert Shutdown(app, 10).end(wait=1) == 0  # nothing left


def test_install_chains_before_gunicorns_sigterm_handler(make_app: Callable[..., Any]) -> None:
    app = make_app()
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        worker = SimpleNamespace(wsgi=app, cfg=SimpleNamespace(graceful_timeout=30))
        shutdown = install(worker)
        assert shutdown is not None and not shutdown.begun
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        handler(signal.SIGTERM, None)
        assert shutdown.begun and seen == [signal.SIGTERM]
        shutdown.scheduled.kill()  # due in 28 s
        assert install(SimpleNamespace(wsgi=object(), cfg=worker.cfg)) is None  # not our app
    finally:
        signal.signal(signal.SIGTERM, previous)
