"""A raw TCP upstream that records the exact bytes a proxy sends it, framing included.

The fake upstream parses requests with a lenient HTTP server (it takes a connection closed
before the last chunk for the end of the body), so it cannot tell a complete body from a
truncated one. This sink can: it keeps every byte of each connection, knows whether the
request's framing was completed (``Content-Length`` bytes or the ``0`` chunk arrived) and
when the proxy closed the connection. Once a request is complete it answers with a small
OpenAI-shaped JSON body, unless told to stay silent.
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass, field

REPLY_BODY = b'{"sink": "ok"}'
REPLY = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
         b"Connection: close\r\n\r\n%s" % (len(REPLY_BODY), REPLY_BODY))


@dataclass
class Connection:
    """One connection the proxy opened to the sink."""

    data: bytearray = field(default_factory=bytearray, repr=False)  # may hold test keys
    complete: threading.Event = field(default_factory=threading.Event)  # framing finished
    closed: threading.Event = field(default_factory=threading.Event)  # EOF or reset seen

    @property
    def head(self) -> bytes:
        return bytes(self.data).split(b"\r\n\r\n", 1)[0]

    @property
    def framing(self) -> bytes:
        """The request line and the framing headers only: safe to print (no credentials)."""
        lines = self.head.split(b"\r\n")
        keep = [line for line in lines[1:] if line.lower().startswith(
            (b"content-length:", b"transfer-encoding:"))]
        return b" | ".join(lines[:1] + keep)

    @property
    def body(self) -> bytes:
        """The body bytes as sent, chunk framing included."""
        return bytes(self.data).split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.data else b""


def framing_complete(data: bytes) -> bool:
    """Whether ``data`` holds one whole HTTP/1.1 request (head and body)."""
    if b"\r\n\r\n" not in data:
        return False
    head, body = data.split(b"\r\n\r\n", 1)
    lhead = head.lower()
    if re.search(rb"\r\ntransfer-encoding:[^\r\n]*chunked", lhead):
        pos = 0
        while True:  # walk the chunks: size line, data, CRLF ... then "0" and the trailer
            end = body.find(b"\r\n", pos)
            if end < 0:
                return False
            try:
                size = int(body[pos:end].split(b";", 1)[0], 16)
            except ValueError:
                return False
            if size == 0:
                return body.find(b"\r\n\r\n", end) >= 0  # the (possibly empty) trailer ended
            pos = end + 2 + size + 2
            if pos > len(body):
                return False
    match = re.search(rb"\r\ncontent-length:\s*(\d+)", lhead)
    return len(body) >= (int(match.group(1)) if match else 0)


class RawSink:
    """Listens on a free loopback port; ``silent`` sinks never answer."""

    def __init__(self, silent: bool = False) -> None:
        self.silent = silent
        self.connections: list[Connection] = []
        self.accepted = threading.Condition()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._stopped = False
        threading.Thread(target=self._accept, name="hostile-sink", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def reset(self) -> None:
        with self.accepted:
            self.connections = []

    def wait_connection(self, timeout: float = 5.0) -> Connection:
        with self.accepted:
            if not self.accepted.wait_for(lambda: bool(self.connections), timeout):
                raise AssertionError("the proxy never connected to the sink")
            return self.connections[-1]

    def stop(self) -> None:
        self._stopped = True
        self._sock.close()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            record = Connection()
            with self.accepted:
                self.connections.append(record)
                self.accepted.notify_all()
            threading.Thread(target=self._serve, args=(conn, record), daemon=True).start()

    def _serve(self, conn: socket.socket, record: Connection) -> None:
        with conn:
            while True:
                try:
                    piece = conn.recv(65536)
                except OSError:
                    break
                if not piece:
                    break
                record.data.extend(piece)
                if not record.complete.is_set() and framing_complete(bytes(record.data)):
                    record.complete.set()
                    if not self.silent:
                        try:
                            conn.sendall(REPLY)
                        except OSError:
                            break
        record.closed.set()
