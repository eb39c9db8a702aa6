"""The admin HTTP API under ``/admin``: proxy keys (create, list, show, update, revoke), the
spend budgets of users and teams, and the spend ledger.

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
from datetime import date, datetime, timezone
from typing import Any

from flask import Blueprint, Response, current_app, g, json, request
from werkzeug.exceptions import HTTPException

from .. import identity
from ..budgets.model import BudgetValidationError, parse_budget, parse_day, to_usd
from ..state import get_state
from .model import KeyValidationError, ProxyKey, is_key_id, parse_scope, validate_fields
from .store import SPEND_GROUPS, KeyStore, KeyStoreError, UnknownKeyError

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
            ("key", "DELETE"): "revoke", ("budgets", "GET"): "list_budgets",
            ("budgets", "HEAD"): "list_budgets", ("budget", "GET"): "show_budget",
            ("budget", "HEAD"): "show_budget", ("budget", "PUT"): "set_budget",
            ("budget", "DELETE"): "clear_budget", ("spend", "GET"): "spend",
            ("spend", "HEAD"): "spend"}
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
    if endpoint in ("budgets", "spend"):
        return f"/admin/{endpoint}"
    if endpoint == "budget":  # a scope is shown once parse_scope accepted it
        scope = (g.get("admin_audit") or {}).get("scope")
        return f"/admin/budgets/{scope}" if scope else "/admin/budgets/<invalid scope>"
    return "/admin/<unknown>"


def _key_or_404(store: KeyStore, key_id: str) -> ProxyKey | Response:
    key = store.get(key_id)
    return error(404, "No key with this id.") if key is None else key


def _day(name: str) -> date | None:
    text = request.args.get(name)
    if text is None or text == "":
        return None
    try:
        return parse_day(text)
    except ValueError:
        raise KeyValidationError(name, "must be a UTC day, YYYY-MM-DD") from None


def _budget_body() -> Any:
    """The PUT body as a Budget (None: every window null); errors name the window."""
    try:
        return parse_budget(_body(), "budgets")
    except BudgetValidationError as exc:
        raise KeyValidationError(exc.field.removeprefix("budgets."), exc.problem) from None


def spend_in_usd(store: KeyStore, key_id: str) -> dict[str, float]:
    """A key's spend today, this month and ever (UTC), in USD."""
    today = datetime.now(timezone.utc).date()
    return {window: to_usd(nanos)
            for window, nanos in store.spend_summary("key", key_id, today).items()}


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
            "scope": fields.get("scope"),
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
            if isinstance(found, Response):
                return found
            return _json({**found.public(), "spend": spend_in_usd(store, key_id)})
        if request.method == "PATCH":
            fields = validate_fields(_body(), partial=True, providers=known)
            g.admin_audit["changed"] = sorted(fields)
            return _json(store.update(key_id, **fields).public())
        if request.method == "DELETE":
            return _json(store.revoke(key_id).public())
        return _method_not_allowed("GET", "PATCH", "DELETE")

    @bp.route("/budgets", methods=_METHODS)
    def budgets() -> Response:
        if request.method != "GET":
            return _method_not_allowed("GET")
        listed = [{"scope": f"{kind}:{name}", "budgets": budget.public()}
                  for (kind, name), budget in store.budgets().items()]
        return _json({"budgets": listed})

    @bp.route("/budgets/<path:scope>", methods=_METHODS)
    def budget(scope: str) -> Response:
        if request.method not in ("GET", "PUT", "DELETE"):
            return _method_not_allowed("GET", "PUT", "DELETE")
        kind, name = parse_scope(scope)  # before anything is logged: it could be anything
        shown = f"{kind}:{name}"
        g.admin_audit["scope"] = shown
        if request.method == "GET":
            found = store.get_budget(kind, name)
            if found is None:
                return error(404, "No budget for this scope.")
            return _json({"scope": shown, "budgets": found.public()})
        if request.method == "PUT":
            new = _budget_body()
            g.admin_audit["changed"] = ["budgets"]
            store.set_budget(kind, name, new)
            return _json({"scope": shown, "budgets": None if new is None else new.public()})
        store.set_budget(kind, name, None)
        return _json({"scope": shown, "budgets": None})

    @bp.route("/spend", methods=_METHODS)
    def spend() -> Response:
        if request.method != "GET":
            return _method_not_allowed("GET")
        group_by = request.args.get("group_by", "key")
        if group_by not in SPEND_GROUPS:
            raise KeyValidationError("group_by", f"must be one of {', '.join(SPEND_GROUPS)}")
        start, end = _day("from"), _day("to")
        if start is not None and end is not None and start > end:
            raise KeyValidationError("from", "must not be after to")
        rows = store.spend_rows(group_by, start, end)
        return _json({"group_by": group_by, "from": start and start.isoformat(),
                      "to": end and end.isoformat(), "rows": rows})

    @bp.route("/", defaults={"rest": ""}, methods=_METHODS)
    @bp.route("/<path:rest>", methods=_METHODS)
    def unknown_route(rest: str) -> Response:
        return error(404, "Unknown admin route.")

    return bp
