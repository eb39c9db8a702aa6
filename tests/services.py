"""Local services for the tests: loopback ports and a throwaway redis-server.

The one place that finds ports and starts Redis, so every test gets the same loopback-only,
no-persistence server and the same rule for a missing binary: skip, but fail under CI=true
(a CI run must not go green by skipping what it was meant to check).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

HOST = "127.0.0.1"
REDIS_START_TIMEOUT = 10.0


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_binary(name: str) -> str:
    """Path of executable ``name``; skip the test without it (fail instead under CI=true)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if in_ci():
            pytest.fail(f"{message} (required under CI=true)")
        pytest.skip(message)
    return path


def free_port() -> int:
    """A loopback port nobody listens on right now, for a server the test is about to start.

    The port is released before returning: another process could take it in between, so use
    :func:`closed_port` when the port must stay unanswered.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections for as long as the block runs.

    The socket is bound but never listens, so nothing else can take the port and every
    connection to it is refused: a dead upstream that stays dead.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        yield int(s.getsockname()[1])


class RedisServer:
    """A throwaway redis-server: no persistence, loopback only; can be killed and restarted
    (on the same port, so clients configured with :attr:`url` reconnect to the new one)."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def required(cls, workdir: Path) -> RedisServer:
        """A server for ``workdir``, not started; skips (fails under CI=true) without Redis."""
        return cls(require_binary("redis-server"), workdir)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> RedisServer:
        """Start the server and return once it answers PING."""
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", HOST, "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"redis-server did not start on port {self.port}")
                time.sleep(0.02)  # polling another process for readiness: no event to await
        finally:
            client.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Kill -9: what a crashed Redis looks like to the proxy."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
