"""The admin HTTP API under ``/admin``: create, list, show, update and revoke proxy keys.

JSON in and out, one error shape ``{"error": {"message", "type"}}``. Every route is behind
``Authorization: Bearer <auth.admin_token>``, checked once in ``before_request``; every call
is audited on the ``llmproxy.audit`` logger (method, path, action, key id, changed field
names, status, outcome), never with a secret. The app registers this blueprint only while an
admin token is set, so without one everything under /admin is an unknown route (404).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from typing import Any

from flask import Blueprint, Response, current_app, g, json, request
from werkzeug.exceptions import HTTPException

from .. import identity
from ..state import get_state
from .model import KeyValidationError, ProxyKey, is_key_id, validate_fields
from .store import KeyStore, KeyStoreError, UnknownKeyError

audit_log = logging.getLogger("llmproxy.audit")
MAX_BODY_BYTES = 64 * 1024
# Every route takes every method and answers 405 itself: routing then never fails before
# this blueprint's hooks, so a wrong method is authenticated and audited like any call.
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "method_not_allowed", 413: "request_too_large", 415: "invalid_request_error",
          500: "internal_error", 503: "database_unavailable"}
_ACTIONS = {("keys", "POST"): "create", ("keys", "GET"): "list", ("key", "GET"): "show",
            ("key", "HEAD"): "show", ("keys", "HEAD"): "list", ("key", "PATCH"): "update",
            ("key", "DELETE"): "revoke"}
_OUTCOMES = {400: "invalid", 401: "unauthorized", 404: "not_found", 405: "invalid",
             413: "invalid", 500: "error", 503: "error"}


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    resp = Response(json.dumps(payload), status=status, content_type="application/json")
    resp.headers["Cache-Control"] = "no-store"  # a created key's secret must not be cached
    for name, value in (headers or {}).items():
        resp.headers[name] = value
    return resp


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The admin API's one error shape; ``message`` must hold no secret."""
    return _json({"error": {"message": message, "type": _TYPES.get(status, "error")}},
                 status, headers)


def _method_not_allowed(*allowed: str) -> Response:
    return error(405, f"Method not allowed; use {', '.join(allowed)}.",
                 {"Allow": ", ".join(allowed)})


def _body() -> dict[str, Any]:
    request.max_content_length = MAX_BODY_BYTES  # also bounds a chunked body
    data = request.get_data(cache=True)
    try:
        payload = json.loads(data) if data.strip() else None
    except ValueError:
        raise KeyValidationError("body", "is not valid JSON") from None
    if not isinstance(payload, dict):
        raise KeyValidationError("body", "must be a JSON object")
    return payload


def _loggable_path(key_id: str | None) -> str:
    """The path without anything a caller typed freely (a pasted secret, say)."""
    endpoint = (request.endpoint or "").rpartition(".")[2]
    if endpoint == "keys":
        return "/admin/keys"
    if endpoint == "key":
        return f"/admin/keys/{key_id}" if key_id else "/admin/keys/<invalid id>"
    return "/admin/<unknown>"


def _key_or_404(store: KeyStore, key_id: str) -> ProxyKey | Response:
    key = store.get(key_id)
    return error(404, "No key with this id.") if key is None else key


def blueprint(store: KeyStore, admin_token: str, providers: Iterable[str]) -> Blueprint:
    """The /admin blueprint over ``store``; ``providers``: the configured provider names."""
    if not admin_token:
        raise ValueError("the admin API needs an admin token")
    bp = Blueprint("admin", __name__)
    # Compare digests: equal lengths, so the comparison time says nothing about the token.
    token_digest = hashlib.sha256(admin_token.encode()).digest()
    known = tuple(providers)

    @bp.before_request
    def authenticate() -> Response | None:
        endpoint = (request.endpoint or "").rpartition(".")[2]
        g.admin_audit = {"action": _ACTIONS.get((endpoint, request.method))}
        if request.method == "OPTIONS":
            return None  # a CORS preflight carries no credentials; flask-cors answers it
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, token_digest):
            return error(401, "A valid admin bearer token is required.",
                         {"WWW-Authenticate": 'Bearer realm="llmproxy admin"'})
        return None

    @bp.after_request
    def audit(resp: Response) -> Response:
        fields = dict(g.get("admin_audit") or {})
        status = resp.status_code
        settings = get_state(current_app).settings
        audit_log.info("admin call", extra={"fields": {
            "request_id": g.get("request_id"),
            "method": request.method,
            "path": _loggable_path(fields.get("key_id")),
            "action": fields.get("action"),
            "key_id": fields.get("key_id"),
            "changed": fields.get("changed"),
            "status": status,
            "outcome": "ok" if status < 400 else _OUTCOMES.get(status, "error"),
            "client_ip": identity.client_ip(request.remote_addr,
                                            request.headers.get("X-Forwarded-For"),
                                            settings.server.trusted_proxies),
        }})
        return resp

    @bp.errorhandler(KeyValidationError)
    def invalid(exc: KeyValidationError) -> Response:
        return error(400, str(exc))

    @bp.errorhandler(UnknownKeyError)
    def unknown(exc: UnknownKeyError) -> Response:
        return error(404, "No key with this id.")

    @bp.errorhandler(KeyStoreError)
    def database(exc: KeyStoreError) -> Response:
        audit_log.error("key database error: %s", exc)
        return error(503, "The key database is unavailable; try again.",
                     {"Retry-After": "1"})

    @bp.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        return error(status, {413: f"Body larger than {MAX_BODY_BYTES} bytes."}
                     .get(status, exc.description or exc.name))

    @bp.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        audit_log.error("admin call failed", exc_info=exc)
        return error(500, "Internal error.")

    @bp.route("/keys", methods=_METHODS)
    def keys() -> Response:
        if request.method == "POST":
            fields = validate_fields(_body(), providers=known)
            g.admin_audit["changed"] = sorted(fields)
            key, secret = store.create(**fields)
            g.admin_audit["key_id"] = key.id
            return _json({"id": key.id, "key": secret, **key.public()}, 201,
                         {"Location": f"{request.script_root}/admin/keys/{key.id}"})
        if request.method == "GET":
            include_revoked = request.args.get("include_revoked", "true").lower() \
                not in ("false", "0", "no")
            listed = store.list(include_revoked=include_revoked)
            return _json({"keys": [k.public() for k in listed]})
        return _method_not_allowed("GET", "POST")

    @bp.route("/keys/<key_id>", methods=_METHODS)
    def key(key_id: str) -> Response:
        if not is_key_id(key_id):  # not even logged: it could be anything, a secret too
            return error(404, "No key with this id.")
        g.admin_audit["key_id"] = key_id
        if request.method == "GET":
            found = _key_or_404(store, key_id)
            return found if isinstance(found, Response) else _json(found.public())
        if request.method == "PATCH":
            fields = validate_fields(_body(), partial=True, providers=known)
            g.admin_audit["changed"] = sorted(fields)
            return _json(store.update(key_id, **fields).public())
        if request.method == "DELETE":
            return _json(store.revoke(key_id).public())
        return _method_not_allowed("GET", "PATCH", "DELETE")

    @bp.route("/", defaults={"rest": ""}, methods=_METHODS)
    @bp.route("/<path:rest>", methods=_METHODS)
    def unknown_route(rest: str) -> Response:
        return error(404, "Unknown admin route.")

    return bp
