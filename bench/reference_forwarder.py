"""A bare Flask + gevent + requests forwarder, the reference the proxy is measured against:
no logging, no parsing, no limits — what one writes in twenty lines. llmproxy does far more
per request and must still beat it; the benchmark runs it beside llmproxy (scenarios A and B)
so that every run measures that on the machine at hand. Served by ``gunicorn -k gevent``,
one worker.

Its connection pool holds as many connections as scenario B opens, so that it is not slowed
by a pool smaller than its concurrency (requests' default is 10).
"""

from __future__ import annotations

import os

import requests
from flask import Flask, Response, request
from requests.adapters import HTTPAdapter

UPSTREAM = os.environ.get("REF_UPSTREAM", "http://127.0.0.1:8080")
SKIP = {"host", "content-length", "connection", "transfer-encoding", "content-encoding"}

app = Flask(__name__)
session = requests.Session()
session.mount("http://", HTTPAdapter(pool_maxsize=256))


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.route("/openai/<path:path>", methods=["GET", "POST"])
def forward(path: str) -> Response:
    headers = {k: v for k, v in request.headers if k.lower() not in SKIP}
    up = session.request(request.method, f"{UPSTREAM}/{path}", headers=headers,
                         data=request.get_data(), stream=True)
    return Response(up.iter_content(chunk_size=None), status=up.status_code,
                    headers=[(k, v) for k, v in up.raw.headers.items() if k.lower() not in SKIP])
