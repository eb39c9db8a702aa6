"""A proxy pointed at the real provider APIs, for the opt-in live tests.

Each test needs its provider's key in the environment and is skipped without it; the keys
go to the test's SDK client only, never into the proxy's environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from conftest import ProxyProcess
from services import free_port


def require_key(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        pytest.skip(f"{name} is not set")
    return value


class _LazyProxy:
    """Starts the live proxy on first use, so that skipped tests never start it."""

    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self.tmp = tmp
        self.proc: ProxyProcess | None = None

    def get(self) -> ProxyProcess:
        if self.proc is None:
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith("LLMPROXY_") and not k.endswith("_API_KEY")}
            port = free_port()
            env.update({"PORT": str(port), "WEB_CONCURRENCY": "1", "LOG_LEVEL": "info",
                        "LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1",
                        "GRACEFUL_TIMEOUT": "5"})
            self.proc = ProxyProcess(self.tmp.mktemp("live") / "proxy.log", env, port).start()
        return self.proc


@pytest.fixture(scope="session")
def _live_proxies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_LazyProxy]:
    lazy = _LazyProxy(tmp_path_factory)
    yield lazy
    if lazy.proc is not None:
        lazy.proc.stop()


@pytest.fixture
def live_proxy(request: pytest.FixtureRequest, _live_proxies: _LazyProxy) -> ProxyProcess:
    """The proxy with its configured (real) upstreams, one worker, JSON logs; the test module's
    KEY_ENV must be set or the test is skipped before anything starts."""
    require_key(request.module.KEY_ENV)
    return _live_proxies.get()
