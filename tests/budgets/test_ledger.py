"""LedgerWriter over a real SQLite key store: sums, batches, outages, its bound, shutdown."""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from llmproxy.budgets.ledger import LedgerWriter, get_ledger, open_ledger
from llmproxy.budgets.model import SpendRow
from llmproxy.keys.store import KeyStore, KeyStoreError
from llmproxy.shutdown import Shutdown

DAY = date(2030, 3, 4)
HOUR = 3600.0  # a flush interval no test waits for


def row(key: str = "key_a", cost: int = 100, model: str = "gpt-4o") -> SpendRow:
    return SpendRow(day=DAY, key_id=key, user="alice", team="ml", model=model,
                    provider="openai", cost_nanos=cost, requests=1, input_tokens=10,
                    output_tokens=2)


class Store:
    """The real SQLite store, which can be taken down; counts and signals its writes."""

    def __init__(self, real: KeyStore) -> None:
        self.real = real
        self.down = False
        self.batches: list[int] = []
        self.written = threading.Event()

    def add_spend(self, rows: Sequence[SpendRow]) -> None:
        if self.down:
            raise KeyStoreError("key database error (OperationalError: down)")
        self.real.add_spend(rows)
        self.batches.append(len(rows))
        self.written.set()

    def spent(self, key: str = "key_a") -> int:
        return self.real.spent("key", key, None)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    real = KeyStore.from_url(f"sqlite:///{tmp_path / 'keys.db'}")
    real.migrate()
    yield Store(real)
    real.close()


@pytest.fixture
def make_writer(store: Store) -> Iterator[Callable[..., LedgerWriter]]:
    made: list[LedgerWriter] = []

    def factory(flush_seconds: float = HOUR, **kwargs: Any) -> LedgerWriter:
        writer = LedgerWriter(store, flush_seconds, **kwargs)
        made.append(writer)
        return writer

    yield factory
    for writer in made:
        writer.close()


def test_rows_of_one_identity_are_summed_into_one_written_row(
        store: Store, make_writer: Callable[..., LedgerWriter]) -> None:
    writer = make_writer()
    for cost in (100, 200, 300):
        writer.add(row(cost=cost))
    writer.add(row(model="o3", cost=5))
    assert writer.pending() == 2 and store.batches == []  # add() never writes
    assert writer.flush()
    assert store.batches == [2] and writer.pending() == 0
    assert store.spent() == 605
    summed = store.real.spend_rows("model", None, None)[0]
    assert (summed["model"], summed["requests"], summed["input_tokens"],
            summed["output_tokens"]) == ("gpt-4o", 3, 30, 6)
    assert writer.flush() and store.batches == [2]  # nothing queued: nothing written


def test_the_background_writer_flushes_every_interval(
        store: Store, make_writer: Callable[..., LedgerWriter]) -> None:
    writer = make_writer(flush_seconds=0.05)
    writer.add(row(cost=7))
    assert store.written.wait(10)
    assert store.spent() == 7 and writer.pending() == 0


def test_an_outage_keeps_the_rows_and_a_later_flush_writes_them_once(
        store: Store, make_writer: Callable[..., LedgerWriter],
        caplog: pytest.LogCaptureFixture) -> None:
    writer = make_writer()
    writer.add(row(cost=100))
    store.down = True
    assert not writer.flush()
    writer.add(row(cost=1))  # merged with the queued row
    writer.add(row(key="key_b", cost=10))
    assert not writer.flush()
    assert writer.pending() == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not written" in warnings[0].getMessage()  # throttled
    store.down = False
    assert writer.flush()
    assert (store.spent(), store.spent("key_b"), writer.pending()) == (101, 10, 0)
    assert store.batches == [2]


def test_past_max_pending_new_identities_are_dropped_and_counted(
        store: Store, make_writer: Callable[..., LedgerWriter]) -> None:
    drops: list[int] = []
    writer = make_writer(max_pending=2, on_dropped=drops.append)
    writer.add(row(key="key_a"))
    writer.add(row(key="key_b"))
    writer.add(row(key="key_c"))  # a third identity: dropped
    writer.add(row(key="key_d"))
    writer.add(row(key="key_a", cost=1))  # a queued identity still sums
    assert (drops, writer.dropped, writer.pending()) == ([1, 1], 2, 2)
    assert writer.flush()
    assert (store.spent("key_a"), store.spent("key_b"), store.spent("key_c")) == (101, 100, 0)
    writer.add(row(key="key_c"))  # room again
    assert writer.pending() == 1 and writer.dropped == 2


def test_rows_of_a_failed_write_are_kept_past_the_bound(
        store: Store, make_writer: Callable[..., LedgerWriter]) -> None:
    writer = make_writer(max_pending=2)
    writer.add(row(key="key_a"))
    writer.add(row(key="key_b"))
    store.down = True
    assert not writer.flush()
    writer.add(row(key="key_c"))  # the failed batch is back: full
    assert writer.pending() == 2 and writer.dropped == 1
    store.down = False
    assert writer.flush()
    assert (store.spent("key_a"), store.spent("key_b")) == (100, 100)


def test_close_flushes_and_stops_the_background_writer(
        store: Store, make_writer: Callable[..., LedgerWriter]) -> None:
    writer = make_writer()
    writer.add(row(cost=3))
    timer = writer._timer
    assert timer is not None and timer.is_alive()
    writer.close()
    assert store.spent() == 3 and not timer.is_alive()
    writer.close()  # again: nothing more
    assert store.batches == [1]


def test_open_ledger_registers_it_for_the_shutdown_and_exit(
        store: Store, make_app: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[Callable[[], None]] = []
    monkeypatch.setattr(atexit, "register", registered.append)
    app = make_app()
    assert get_ledger(app) is None
    writer = open_ledger(app, store, HOUR)
    assert get_ledger(app) is writer and registered == [writer.close]
    writer.add(row(cost=9))
    Shutdown(app, 10).end(wait=0.1)  # a worker's graceful end writes the ledger
    assert store.spent() == 9
    writer.close()


def test_flush_seconds_must_be_positive(store: Store) -> None:
    with pytest.raises(ValueError):
        LedgerWriter(store, 0)
