"""Raw-socket client helpers for the end-to-end tests: send bytes as-is, split pipelined answers,
mint API keys that must never show up anywhere, and find the gunicorn workers."""

from __future__ import annotations

import http.client
import io
import json
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def send_raw(port: int, data: bytes, *, timeout: float = 5.0, half_close: bool = True) -> bytes:
    """Send ``data`` on a fresh connection; return all the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:  # the server already closed (and reset) the connection
                pass
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            piece = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not piece:
            break
        out += piece
    return out


class _Unclosable(io.BytesIO):
    """http.client closes its file after each response; pipelined answers share one."""

    def close(self) -> None:
        pass


class _FakeSock:
    def __init__(self, fp: io.BytesIO) -> None:
        self.fp = fp

    def makefile(self, *args: Any, **kwargs: Any) -> io.BytesIO:
        return self.fp


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    version: int  # 10 or 11

    def json(self) -> Any:
        return json.loads(self.body)


def parse_answers(data: bytes, methods: list[str] | None = None) -> list[Answer]:
    """Every HTTP response in ``data`` (pipelined answers come one after another)."""
    fp = _Unclosable(data)
    answers: list[Answer] = []
    index = 0
    while fp.tell() < len(data):
        method = methods[index] if methods and index < len(methods) else "GET"
        resp = http.client.HTTPResponse(_FakeSock(fp), method=method)  # type: ignore[arg-type]
        resp.begin()
        answers.append(Answer(resp.status, resp.headers, resp.read(), resp.version))
        index += 1
    return answers


def parse_one(data: bytes, method: str = "GET") -> Answer:
    answers = parse_answers(data, [method])
    assert answers, "no response at all"
    return answers[0]


class Secrets:
    """Fresh API keys in every shape; each one must never reach a log line or a body."""

    def __init__(self) -> None:
        self.minted: list[str] = []

    def new(self, shape: str = "plain") -> str:
        token = uuid.uuid4().hex
        value = {"openai": f"sk-proj-{token}", "anthropic": f"sk-ant-api03-{token}",
                 "gemini": f"AIzaSy{token[:33]}", "plain": f"Zq{token}xK"}[shape]
        self.minted.append(value)
        return value

    def found_in(self, blob: str | bytes) -> list[str]:
        """Keys (or their first 20 characters: a key cut short is still a key) in ``blob``."""
        text = blob.decode("utf-8", "replace") if isinstance(blob, bytes) else blob
        return [s for s in self.minted if s[:20] in text]


def credential_headers(dialect: str, key: str) -> str:
    """The header each provider's SDK would send ``key`` in (raw, CRLF-terminated);
    none for ``dialect="none"`` (the key travels elsewhere)."""
    if dialect == "none":
        return ""
    if dialect == "anthropic":
        return f"x-api-key: {key}\r\nanthropic-version: 2023-06-01\r\n"
    if dialect == "gemini":
        return f"x-goog-api-key: {key}\r\n"
    return f"Authorization: Bearer {key}\r\n"


def worker_pids(master_pid: int) -> list[int] | None:
    """The gunicorn master's child processes (Linux only; None elsewhere)."""
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children")
    if not children.exists():
        return None
    return sorted(int(p) for p in children.read_text().split())


def error_shape_ok(dialect: str, body: Any, status: int) -> bool:
    """Whether ``body`` is the provider's native JSON error shape (see llmproxy/errors.py)."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return False
    err = body["error"]
    if dialect == "anthropic":
        return body.get("type") == "error" and isinstance(err.get("type"), str) \
            and isinstance(err.get("message"), str) and bool(err["message"])
    if dialect == "gemini":
        return err.get("code") == status and isinstance(err.get("status"), str) \
            and isinstance(err.get("message"), str) and bool(err["message"])
    return isinstance(err.get("message"), str) and bool(err["message"]) \
        and isinstance(err.get("type"), str) and "param" in err
