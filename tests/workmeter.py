"""Deterministic work counts, to show that code stays linear without timing it.

Timing a test on a shared machine is noise; counting is not. :func:`measure` runs a function
under a profile hook and tracemalloc and returns three counts, each the same on every run of
the same input, whatever the machine's load:

- ``calls``: Python function calls plus calls into C (every method and builtin call);
- ``scanned``: the sizes of the bytes/str objects whose methods were called (``buf.find``,
  ``chunk.split``, ``line.startswith``...): an upper bound on what those C methods read;
- ``allocated``: bytes allocated, summed over the intervals between two calls (a lower bound:
  what one interval allocates and frees again counts at its peak).

A quadratic algorithm shows in at least one of them: a loop that runs n times per byte
(``calls``), re-reads a growing buffer per byte (``scanned``), or copies one per byte
(``allocated``). Not seen: the work inside one C call that does not allocate and is not a
bytes/str method (e.g. the scan of a compiled regex; its calls are counted).

:func:`assert_linear` compares the counts for an input of size n and the same input at 8n:
linear work grows about 8 times, quadratic about 64. The bound (:data:`MAX_GROWTH`) sits well
between, and a small floor absorbs fixed costs.
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
FLOOR = {"calls": 200, "scanned": 4096, "allocated": 64 * 1024}  # fixed costs, not growth


@dataclass(frozen=True)
class Work:
    calls: int
    scanned: int
    allocated: int

    def as_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "scanned": self.scanned, "allocated": self.allocated}


PACKAGE_DIR = str(Path(__file__).resolve().parent.parent / "llmproxy")


def measure(fn: Callable[[], Any], watch: tuple[str, ...] = (PACKAGE_DIR,)) -> Work:
    """Run ``fn()`` once and count its work (see the module docstring).

    Allocation is sampled at every line run in files under ``watch`` (tracemalloc is too slow
    to sample at every call); calls and scanned bytes are counted everywhere.
    """
    calls = scanned = allocated = 0
    last = 0

    def sample() -> None:
        nonlocal allocated, last
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

    get_traced_memory = tracemalloc.get_traced_memory
    reset_peak = tracemalloc.reset_peak
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
    return Work(calls, scanned, allocated)


def growth(small: Work, large: Work) -> dict[str, float]:
    """How many times each count grew from ``small`` to ``large`` (fixed costs floored)."""
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
    small = measure(prepare(n), watch)
    large = measure(prepare(SCALE * n), watch)
    grew = growth(small, large)
    worst = max(grew, key=lambda k: grew[k])
    assert grew[worst] <= MAX_GROWTH, (
        f"{label}: work grew {grew[worst]:.1f}x ({worst}) for {SCALE}x the input "
        f"(at most {MAX_GROWTH:.0f}x allowed); n={n}: {small}, {SCALE}n: {large}"
    )
    return grew
