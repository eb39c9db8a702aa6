"""The app factory's own answers, in process: errors, request ids, health, preflights."""

from __future__ import annotations

import json

import pytest
from flask import Flask

from llmproxy import create_app


@pytest.fixture(scope="module")
def app() -> Flask:
    # Unroutable upstreams: nothing in this module may reach a provider.
    return create_app({"providers": {name: {"base_url": "http://127.0.0.1:9"}
                                     for name in ("openai", "anthropic", "gemini", "groq")}})


@pytest.mark.parametrize(
    ("path", "shape"),
    [("/nope", "openai"), ("/openai", "openai"), ("/anthropic", "anthropic"),
     ("/meta/u/anthropic", "anthropic"), ("/gemini/", "gemini"), ("/groq", "openai")],
)
def test_unknown_routes_get_the_provider_error_shape(app: Flask, path: str, shape: str) -> None:
    resp = app.test_client().get(path)
    assert resp.status_code == 404
    body = json.loads(resp.get_data())
    if shape == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    elif shape == "gemini":
        assert body["error"]["code"] == 404 and body["error"]["status"] == "NOT_FOUND"
    else:
        assert body["error"]["type"] == "not_found_error" and "param" in body["error"]
    assert resp.headers["X-Proxy-Request-ID"] in json.dumps(body)


def test_unsupported_method_is_a_json_405(app: Flask) -> None:
    resp = app.test_client().open("/openai/v1/models", method="TRACE")
    assert resp.status_code == 405
    assert json.loads(resp.get_data())["error"]["type"] == "invalid_request_error"
    assert "POST" in resp.headers["Allow"]


def test_request_id_is_kept_when_well_formed_and_replaced_otherwise(app: Flask) -> None:
    client = app.test_client()
    kept = client.get("/health", headers={"X-Request-ID": "client-req-12345"})
    assert kept.headers["X-Proxy-Request-ID"] == "client-req-12345"
    replaced = client.get("/health", headers={"X-Request-ID": "bad id\u00e9<script>"})
    assert replaced.headers["X-Proxy-Request-ID"] not in ("", "bad id\u00e9<script>")
    assert len(replaced.headers["X-Proxy-Request-ID"]) == 32


def test_health_reports_build_info_and_every_provider(app: Flask) -> None:
    resp = app.test_client().get("/health")
    body = json.loads(resp.get_data())
    assert resp.status_code == 200 and body["status"] == "healthy"
    for field in ("version", "git_commit", "build_time", "python_version", "uptime_seconds"):
        assert field in body
    assert set(body["providers"]) == {"openai", "anthropic", "gemini", "groq"}
    assert body["providers"]["gemini"]["status"] == "unknown"  # no traffic yet
    assert app.test_client().head("/health").status_code == 200


def test_unreachable_provider_degrades_health_after_the_threshold(app: Flask) -> None:
    client = app.test_client()
    for _ in range(3):
        resp = client.get("/groq/v1/models", headers={"Authorization": "Bearer k"})
        assert resp.status_code == 502
        assert "127.0.0.1" not in resp.get_data(as_text=True)
        resp.close()  # a WSGI server closes every response: that fires the terminal event
    body = json.loads(client.get("/health").get_data())
    assert body["providers"]["groq"]["status"] == "degraded"
    assert body["providers"]["groq"]["last_failure_kind"] == "connect"
    assert body["status"] == "degraded"


@pytest.mark.parametrize("headers", ["x-api-key, anthropic-version, "
                                     "anthropic-dangerous-direct-browser-access",
                                     "x-goog-api-key, content-type",
                                     "authorization, x-stainless-os, x-stainless-retry-count"])
def test_preflights_allow_what_browser_sdks_send(app: Flask, headers: str) -> None:
    resp = app.test_client().options("/anthropic/v1/messages", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": headers})
    assert resp.status_code == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    allowed = resp.headers["Access-Control-Allow-Headers"].lower()
    for name in headers.split(", "):
        assert name in allowed
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]


def test_error_responses_carry_cors_and_expose_the_request_id(app: Flask) -> None:
    resp = app.test_client().get("/nope", headers={"Origin": "https://app.example"})
    assert resp.status_code == 404
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    exposed = resp.headers["Access-Control-Expose-Headers"].lower()
    assert "x-proxy-request-id" in exposed and "retry-after" in exposed


def test_the_proxys_own_answers_do_not_count_as_provider_health() -> None:
    app = create_app({"providers": {"openai": {"base_url": "http://127.0.0.1:9"}}})
    client = app.test_client()
    for _ in range(3):
        client.get("/openai/v1/models").close()  # connection refused: 502
    client.get("/openai/v1/a/../b").close()  # refused by the proxy itself: 404
    body = json.loads(client.get("/health").get_data())
    assert body["providers"]["openai"]["status"] == "degraded"
    assert body["providers"]["openai"]["consecutive_failures"] == 3


def test_an_encoded_route_prefix_is_not_forwarded_from_the_wrong_place(app: Flask) -> None:
    resp = app.test_client().get("/openai%2Fv1/models")
    assert resp.status_code == 404


@pytest.mark.parametrize("name", ["x_meta", "meta", "health", "Bad", "metrics"])
def test_provider_names_that_would_clash_with_routes_are_refused(name: str) -> None:
    from llmproxy.config import ConfigError

    with pytest.raises(ConfigError):
        create_app({"providers": {name: {"base_url": "http://127.0.0.1:9"}}})
