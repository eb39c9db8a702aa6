"""What every provider shares: URL building, request inspection, response parsing, a blueprint."""

from __future__ import annotations

import re
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

from flask import Blueprint

from ..config import ProviderSettings
from ..identity import HeadersLike
from ..parsers import ResponseParser, make_parser
from ..request_info import RequestInfo, inspect_request

# Characters never allowed in a forwarded path: controls, space, backslash (some servers
# treat it as '/'), and their percent-encoded forms.
_BAD_PATH_RE = re.compile(r"[\x00-\x20\x7f\\]|%(?:0[0-9a-f]|1[0-9a-f]|5c|7f)", re.IGNORECASE)


class Provider:
    """A provider route: ``/<name>/<rest>`` forwarded to ``<base_url><rest>``."""

    dialect: ClassVar[str] = "openai"
    #: Headers the provider's browser SDKs send; they must pass CORS preflights.
    browser_headers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: ProviderSettings) -> None:
        self.name = settings.name
        self.base_url = settings.base_url
        self._scheme = settings.scheme
        self._netloc = settings.netloc

    def upstream_url(self, rest: str) -> str | None:
        """``base_url + rest`` if ``rest`` cannot leave the base URL, else ``None``.

        ``rest`` is the raw request target after the route prefix (path and query,
        still percent-encoded). Dot segments are refused even when encoded, because the
        HTTP client would resolve them and climb out of the base path.
        """
        path, sep, query = rest.partition("?")
        if not path.startswith("/") or path.startswith("//") or _BAD_PATH_RE.search(path):
            return None
        for segment in path.split("/"):
            if "." in segment or "%" in segment:
                decoded = segment
                for _ in range(3):  # %252e%252e is as dangerous as %2e%2e after decoding
                    decoded = unquote(decoded)
                if "\\" in decoded or any(p in (".", "..") for p in decoded.split("/")):
                    return None
        if any(c in query for c in "\x00\r\n\\ #"):
            return None
        url = self.base_url + path + sep + query
        parts = urlsplit(url)
        if parts.scheme != self._scheme or parts.netloc != self._netloc:
            return None
        return url

    def inspect(self, method: str, path: str, query: str, headers: HeadersLike,
                body: bytes | None) -> RequestInfo:
        return inspect_request(self.dialect, method, path, query, headers, body)

    def parser(self, path: str, content_type: str | None,
               content_encoding: str | None) -> ResponseParser:
        return make_parser(self.dialect, path, content_type, content_encoding)

    def blueprint(self, view: Any) -> Blueprint:
        """One blueprint per provider; register it under ``/<name>`` and ``/meta/<user>/<name>``."""
        bp = Blueprint(self.name, __name__)
        bp.add_url_rule("/<path:rest>", "proxy", view,
                        methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
        return bp

