"""Fixtures for the observability tests: the shipped pricing table and metric readers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

PRICING_FILE = Path(__file__).resolve().parents[2] / "configs" / "pricing.yml"


@pytest.fixture(scope="session")
def pricing_raw() -> dict[str, Any]:
    """The ``pricing`` mapping of configs/pricing.yml."""
    data: dict[str, Any] = yaml.safe_load(PRICING_FILE.read_text())["pricing"]
    return data


def sample(name: str, **labels: str) -> float:
    """Current value of a metric sample in this process (0 when not created yet)."""
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
def delta() -> Callable[..., Callable[[], float]]:
    """delta(name, **labels)() -> how much the sample grew since delta() was called."""

    def start(name: str, **labels: str) -> Callable[[], float]:
        before = sample(name, **labels)
        return lambda: sample(name, **labels) - before

    return start


@pytest.fixture
def records_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog for ``llmproxy.observe.records``, attached to it directly: once an app is built the
    ``llmproxy`` logger no longer propagates to the root logger caplog listens on."""
    logger = logging.getLogger("llmproxy.observe.records")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.ERROR)
    logger.propagate = False  # whether or not an app turned it off: each record caught once
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)
    logger.propagate = propagate
