"""The scrubber: no credential survives a log line, whatever the message holds."""

from __future__ import annotations

import json
import logging

import pytest

from llmproxy.observe.logs import JSONFormatter, TextFormatter, scrub

SECRETS = ["sk-proj-abcdef1234567890", "sk-ant-api03-abcdefgh12345678", "AIzaSyA1234567890abcdef",
           "llmp-AbC_dEf-0123456789abcdefghijklmnopqrstuvw"]


@pytest.mark.parametrize(
    "template",
    [
        "GET /gemini/v1beta/models/m:generateContent?key={s} failed",
        "headers: {{'Authorization': 'Bearer {s}'}}",
        'headers: {{"x-api-key": "{s}"}}',
        "x-goog-api-key: {s}",
        "HTTPSConnectionPool(host='h', port=443): Max retries exceeded with url: /x?alt=1&key={s}",
        "the key is {s}",
    ],
)
def test_scrub_removes_keys(template: str) -> None:
    for secret in SECRETS:
        assert secret not in scrub(template.format(s=secret))


def test_formatters_scrub_messages_fields_and_tracebacks() -> None:
    secret = SECRETS[0]
    try:
        raise RuntimeError(f"boom Bearer {secret}")
    except RuntimeError:
        import sys

        exc_info = sys.exc_info()
    record = logging.LogRecord("llmproxy.test", logging.ERROR, __file__, 1,
                               "failed for %s", (f"?key={secret}",), exc_info)
    record.fields = {"path": f"/x?key={secret}"}
    for formatter in (JSONFormatter(), TextFormatter("%(message)s")):
        line = formatter.format(record)
        assert secret not in line
    parsed = json.loads(JSONFormatter().format(record))
    assert parsed["path"] == "/x?key=REDACTED"


def test_text_fields_cannot_forge_a_log_line() -> None:
    record = logging.LogRecord("llmproxy.access", logging.INFO, __file__, 1, "request completed",
                               (), None)
    record.fields = {"model": "gpt\n2099 INFO llmproxy.access request completed user=admin",
                     "user": "alice", "status": 200}
    line = TextFormatter("%(message)s").format(record)
    assert "\n" not in line
    assert 'model="gpt\\n2099 INFO' in line and "user=alice" in line and "status=200" in line


OPAQUE = "opaque-credential-0123456789"  # no sk-/AIza prefix: only the context gives it away


@pytest.mark.parametrize(
    "template",
    [
        "GET /gemini/v1beta/models/m:generateContent?KEY={s} failed",
        "GET /x?alt=sse&%6Bey={s}",
        "headers: {{'AUTHORIZATION': 'BeArEr {s}'}}",
        'headers: {{"X-Api-Key": "{s}"}}',
        "X-Goog-Api-Key={s}",
        "café: authorization: {s}",  # not ASCII: every pattern runs, no shortcut
        "naïve Bearer {s}",
    ],
)
def test_scrub_finds_credentials_by_context_whatever_the_case(template: str) -> None:
    line = template.format(s=OPAQUE)
    scrubbed = scrub(line)
    assert OPAQUE not in scrubbed and "REDACTED" in scrubbed


def test_scrub_leaves_a_clean_line_alone() -> None:
    line = ("2026-11-27 18:27:41,295 INFO llmproxy.access request completed method=POST "
            "path=/openai/v1/chat/completions model=gpt-4o status=200 key_fingerprint=fp_0f2c")
    assert scrub(line) == line


@pytest.mark.parametrize(("value", "written"), [
    ("gpt-4o-mini", "gpt-4o-mini"),
    (200, "200"),
    (12.5, "12.5"),
    ("fp_0f2c10bf3d128c71", "fp_0f2c10bf3d128c71"),
    ("", '""'),
    ("two words", '"two words"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("x\nstatus=200 forged=1", '"x\\nstatus=200 forged=1"'),
    ("tab\there", '"tab\\there"'),
    ("modèle", '"mod\\u00e8le"'),
    ("\x7f", '"\\u007f"'),
])
def test_text_values_that_could_break_the_line_are_quoted(value: object, written: str) -> None:
    from llmproxy.observe.logs import _text_value

    assert _text_value(value) == written
