"""Many concurrent HTTP requests from one thread: non-blocking sockets and a selector.

A thread per request costs far more than the proxy's handling of it on a two-core machine; a
selector loop keeps the test's own CPU small, so the proxy is what the test measures.
"""

from __future__ import annotations

import selectors
import socket
import time
from dataclasses import dataclass, field


@dataclass
class _Conn:
    sock: socket.socket
    out: bytes
    received: bytearray = field(default_factory=bytearray)


def flood(port: int, requests: list[bytes], timeout: float = 60.0) -> list[int | None]:
    """Send every request on its own connection at once (each carrying
    ``Connection: close``); return the status of each answer (None: no answer)."""
    sel = selectors.DefaultSelector()
    conns: list[_Conn] = []
    for data in requests:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        conn = _Conn(sock, data)
        conns.append(conn)
        sel.register(sock, selectors.EVENT_WRITE, conn)
    open_ = len(conns)
    deadline = time.monotonic() + timeout
    try:
        while open_ and time.monotonic() < deadline:
            for key, events in sel.select(timeout=1.0):
                conn = key.data
                if events & selectors.EVENT_WRITE:
                    try:
                        sent = conn.sock.send(conn.out)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        sel.unregister(conn.sock)
                        open_ -= 1
                        continue
                    conn.out = conn.out[sent:]
                    if not conn.out:
                        sel.modify(conn.sock, selectors.EVENT_READ, conn)
                    continue
                try:
                    piece = conn.sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    piece = b""
                if piece:
                    conn.received += piece
                else:
                    sel.unregister(conn.sock)
                    open_ -= 1
    finally:
        sel.close()
        for conn in conns:
            conn.sock.close()
    return [_status(bytes(c.received)) for c in conns]


def _status(answer: bytes) -> int | None:
    if not answer.startswith(b"HTTP/1."):
        return None
    try:
        return int(answer.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None
