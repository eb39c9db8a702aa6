"""Where a proxy key sits in a request, and the request as forwarded without it.

A client puts its proxy key exactly where its SDK puts a provider key (the dialect's
credential slots). What goes upstream has none of the client's credentials: every
credential header and every credential query parameter is dropped, as is any other header
or parameter holding something shaped like a proxy key, and the provider's own key is
added in its native header.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote_plus

from ..providers import DIALECTS
from ..providers.base import HeadersLike
from .model import KEY_PREFIX

# Every header a client of any dialect may authenticate with, plus Azure OpenAI's.
CREDENTIAL_HEADERS = frozenset(
    {name.lower() for d in DIALECTS.values() for name in d.credential_headers}
    | {d.credential_header("x")[0].lower() for d in DIALECTS.values()}
    | {"api-key", "proxy-authorization"}
)


def find_proxy_key(headers: HeadersLike, query: str, header_names: Iterable[str],
                   params: Iterable[str]) -> str | None:
    """The first proxy key (``llmp-...``) in the dialect's credential slots, if any."""
    for name in header_names:
        value = headers.get(name)
        if not value:
            continue
        if name.lower() == "authorization":
            scheme, _, value = value.partition(" ")
            if scheme.lower() != "bearer":
                continue
        value = value.strip()
        if value.startswith(KEY_PREFIX):
            return value
    names = tuple(params)
    if names and query:  # parsed: a client may percent-encode the name or the value
        for name, value in parse_qsl(query):
            if name in names and value.strip().startswith(KEY_PREFIX):
                return value.strip()
    return None


def forward_target(target: str, params: Iterable[str]) -> str:
    """``target`` (raw path and query) without credential parameters or proxy keys."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    names = set(params)
    kept = []
    for piece in query.split("&"):
        name, _, value = piece.partition("=")
        if unquote_plus(name) in names or unquote_plus(value).strip().startswith(KEY_PREFIX):
            continue
        kept.append(piece)
    return path + "?" + "&".join(kept) if kept else path


def forward_headers(headers: dict[str, str], credential: tuple[str, str] | None
                    ) -> dict[str, str]:
    """``headers`` without the client's credentials, with the provider's own (if any)."""
    out = {name: value for name, value in headers.items()
           if name.lower() not in CREDENTIAL_HEADERS and KEY_PREFIX not in value}
    if credential is not None:
        out[credential[0]] = credential[1]
    return out
