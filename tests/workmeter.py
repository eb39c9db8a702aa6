"""Deterministic work counts, to show that code stays linear without timing it.

Timing a test on a shared machine is noise; counting is not. :func:`measure` runs a function
under a profile hook, a line trace and tracemalloc, and returns three counts, each the same on
every run of the same input, whatever the machine's load:

- ``calls``: Python function calls plus calls into C (every method and builtin call);
- ``scanned``: the sizes of the bytes/str objects whose methods were called (``buf.find``,
  ``chunk.split``, ``line.startswith``...): an upper bound on what those C methods read;
- ``allocated``: bytes allocated, summed over the steps between two lines run in the watched
  files (a lower bound: what one step allocates and frees again counts at its peak), less what
  the meter's own sampling allocates.

A quadratic algorithm shows in at least one of them: a loop that runs n times per byte
(``calls``), re-reads a growing buffer per byte (``scanned``), or copies one per byte
(``allocated``). Not seen: the work inside one C call that does not allocate and is not a
bytes/str method (e.g. the scan of a compiled regex; its calls are counted).

:func:`assert_linear` compares the counts for an input of size n and the same input at 8n:
linear work grows about 8 times, quadratic about 64. The bound (:data:`MAX_GROWTH`) sits well
between, and a floor under each count of the small run keeps fixed costs from counting as
growth. The input must be large enough for the work that grows with it to pass the floor.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

SCALE = 8
MAX_GROWTH = 1.5 * SCALE  # linear: about SCALE; quadratic: about SCALE ** 2
FLOOR = {"calls": 200, "scanned": 4096, "allocated": 16 * 1024}  # about the fixed costs
PACKAGE_DIR = str(Path(__file__).resolve().parent.parent / "llmproxy")


@dataclass(frozen=True)
class Work:
    calls: int
    scanned: int
    allocated: int

    def as_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "scanned": self.scanned, "allocated": self.allocated}


def _count(fn: Callable[[], Any], watch: tuple[str, ...]) -> tuple[Work, int]:
    """The raw counts, and how many allocation samples were taken."""
    calls = scanned = allocated = samples = 0
    last = 0
    get_traced_memory = tracemalloc.get_traced_memory
    reset_peak = tracemalloc.reset_peak

    def sample() -> None:
        nonlocal allocated, last, samples
        samples += 1
        current, peak = get_traced_memory()
        if peak > last:
            allocated += peak - last
        reset_peak()
        last = current

    def on_line(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" or event == "return":
            sample()
        return on_line

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename.startswith(watch):
            sample()
            return on_line
        return None

    def on_profile(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal calls, scanned
        if event == "call":
            calls += 1
        elif event == "c_call":
            calls += 1
            owner = getattr(arg, "__self__", None)
            if isinstance(owner, (bytes, bytearray, str, memoryview)):
                scanned += len(owner)

    was_tracing = tracemalloc.is_tracing()
    gc_was_enabled = gc.isenabled()
    if not was_tracing:
        tracemalloc.start()
    gc.disable()  # a collection mid-run would run finalizers and count them as our work
    try:
        last = get_traced_memory()[0]
        reset_peak()
        sys.settrace(on_call)
        sys.setprofile(on_profile)
        try:
            fn()
        finally:
            sys.setprofile(None)
            sys.settrace(None)
        sample()
    finally:
        if gc_was_enabled:
            gc.enable()
        if not was_tracing:
            tracemalloc.stop()
    return Work(calls, scanned, allocated), samples


def _sample_cost() -> float:
    """Bytes that one sample adds to ``allocated`` by itself (its reading, its sums),
    measured on a loop that allocates nothing."""
    zeros = [0] * 2000

    def idle() -> None:
        for _ in zeros:
            pass

    work, samples = _count(idle, (__file__,))
    return work.allocated / samples


_SAMPLE_COST = _sample_cost()


def measure(fn: Callable[[], Any], watch: tuple[str, ...] = (PACKAGE_DIR,)) -> Work:
    """Run ``fn()`` once and count its work (see the module docstring).

    Allocation is sampled at every line run in files under ``watch`` (tracemalloc is too slow
    to sample at every call); calls and scanned bytes are counted everywhere.
    """
    work, samples = _count(fn, watch)
    own = round(samples * _SAMPLE_COST)
    return Work(work.calls, work.scanned, max(0, work.allocated - own))


#: Runs of each job: tracemalloc counts every thread's allocations, so another thread of
#: the test process (a background writer of an app built by an earlier test) can only add to
#: a run's ``allocated``; the least of a few runs is the job's own.
RUNS = 3


def _least(prepare: Callable[[int], Callable[[], Any]], k: int,
           watch: tuple[str, ...]) -> Work:
    runs = [measure(prepare(k), watch) for _ in range(RUNS)]
    return Work(min(w.calls for w in runs), min(w.scanned for w in runs),
                min(w.allocated for w in runs))


def growth(small: Work, large: Work) -> dict[str, float]:
    """How many times each count grew from ``small`` to ``large`` (counts below the floor,
    mostly fixed costs, are taken as the floor)."""
    out = {}
    for key, value in large.as_dict().items():
        out[key] = value / max(small.as_dict()[key], FLOOR[key])
    return out


def assert_linear(
    prepare: Callable[[int], Callable[[], Any]],
    n: int,
    label: str = "",
    watch: tuple[str, ...] = (PACKAGE_DIR,),
) -> dict[str, float]:
    """Fail unless the job for size ``SCALE * n`` does at most MAX_GROWTH times the work of
    the job for size ``n``.

    ``prepare(k)`` builds the input of size k (not measured) and returns the job to measure.
    """
    small = _least(prepare, n, watch)
    large = _least(prepare, SCALE * n, watch)
    grew = growth(small, large)
    worst = max(grew, key=lambda k: grew[k])
    assert grew[worst] <= MAX_GROWTH, (
        f"{label}: work grew {grew[worst]:.1f}x ({worst}) for {SCALE}x the input "
        f"(at most {MAX_GROWTH:.0f}x allowed); n={n}: {small}, {SCALE}n: {large}"
    )
    return grew
