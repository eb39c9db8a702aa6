"""Errors in each provider's native JSON shape, so the SDKs raise their usual exceptions."""

from __future__ import annotations

import json
from collections.abc import Mapping

from flask import Response

# HTTP status -> (OpenAI error type, Anthropic error type, Gemini status)
_KINDS: dict[int, tuple[str, str, str]] = {
    400: ("invalid_request_error", "invalid_request_error", "INVALID_ARGUMENT"),
    401: ("authentication_error", "authentication_error", "UNAUTHENTICATED"),
    403: ("permission_error", "permission_error", "PERMISSION_DENIED"),
    404: ("not_found_error", "not_found_error", "NOT_FOUND"),
    405: ("invalid_request_error", "invalid_request_error", "INVALID_ARGUMENT"),
    413: ("invalid_request_error", "request_too_large", "INVALID_ARGUMENT"),
    429: ("rate_limit_error", "rate_limit_error", "RESOURCE_EXHAUSTED"),
    500: ("server_error", "api_error", "INTERNAL"),
    501: ("invalid_request_error", "invalid_request_error", "UNIMPLEMENTED"),
    502: ("server_error", "api_error", "UNAVAILABLE"),
    503: ("server_error", "overloaded_error", "UNAVAILABLE"),
    504: ("timeout_error", "timeout_error", "DEADLINE_EXCEEDED"),
}


def error_body(dialect: str | None, status: int, message: str, code: str | None = None) -> bytes:
    """The JSON error body a provider of ``dialect`` would send for ``status``."""
    oa, an, ge = _KINDS.get(status, ("server_error", "api_error", "UNKNOWN"))
    payload: object
    if dialect == "anthropic":
        payload = {"type": "error", "error": {"type": an, "message": message}}
    elif dialect == "gemini":
        payload = {"error": {"code": status, "message": message, "status": ge}}
    else:  # OpenAI and every OpenAI-compatible provider; also the default for unknown routes
        payload = {"error": {"message": message, "type": oa, "param": None, "code": code or oa}}
    return json.dumps(payload, separators=(",", ":")).encode()


def error_response(
    dialect: str | None,
    status: int,
    message: str,
    *,
    request_id: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A complete error response; the message must not contain secrets or internal addresses."""
    if request_id:
        message = f"{message} (request id {request_id})"
    resp = Response(error_body(dialect, status, message, code), status=status,
                    content_type="application/json")
    if headers:
        for name, value in headers.items():
            resp.headers[name] = value
    return resp


def stream_error_event(dialect: str | None, message: str) -> bytes:
    """An SSE error event the SDKs raise on: Anthropic ``event: error``, else a ``data:`` error."""
    body = error_body(dialect, 502, message, "upstream_stream_error")
    if dialect == "anthropic":
        return b"event: error\ndata: " + body + b"\n\n"
    return b"data: " + body + b"\n\n"
