"""Error responses in the provider's own JSON shape, so the SDKs raise their usual exceptions.

The shape itself belongs to each dialect (``providers/<dialect>.py``); requests that reach
no provider get OpenAI's, the most widely understood.
"""

from __future__ import annotations

from collections.abc import Mapping

from flask import Response

from .providers import DEFAULT_DIALECT, DIALECTS, Dialect


def error_response(
    dialect: Dialect | str | None,
    status: int,
    message: str,
    *,
    request_id: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A complete error response; the message must not contain secrets or internal addresses.

    ``dialect`` may be given by name (``Exchange.dialect``); unknown names get OpenAI's shape.
    """
    if request_id:
        message = f"{message} (request id {request_id})"
    if not isinstance(dialect, Dialect):
        dialect = DIALECTS.get(dialect or "", DEFAULT_DIALECT)
    body = dialect.error_body(status, message, code)
    resp = Response(body, status=status, content_type="application/json")
    if headers:
        for name, value in headers.items():
            resp.headers[name] = value
    return resp
