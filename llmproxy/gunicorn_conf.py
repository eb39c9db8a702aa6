"""gunicorn settings: ``gunicorn -c python:llmproxy.gunicorn_conf llmproxy.wsgi:app``.

``llmproxy serve`` runs exactly that; a checkout's ``gunicorn.conf.py`` re-exports this module.
Plain assignments, overridable by environment variables. Nothing from the app is imported
here (importing the ``llmproxy`` package itself is cheap): gevent patches the standard library
in each worker, after the fork, and modules the master imported (ssl, requests) would escape
the patch.
"""

import glob
import json
import os
import shutil
import socket
import tempfile
from typing import Any

# --- Server socket -------------------------------------------------------------------------
bind = os.environ.get("BIND", f"0.0.0.0:{os.environ.get('PORT', '9002')}")
backlog = int(os.environ.get("GUNICORN_BACKLOG", "2048"))

# --- Workers -------------------------------------------------------------------------------
# gevent: one worker serves thousands of concurrent streams; add workers for CPU (about one
# per core). Each worker has its own connection pool and, with the memory rate-limit
# backend, its own counters (use Redis to share limits across workers).
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "4096"))
preload_app = False  # patching must happen in the worker before the app imports ssl

# --- Timeouts ------------------------------------------------------------------------------
# With gevent workers `timeout` is only the heartbeat of a stuck worker, not a request limit.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
# On SIGTERM workers stop accepting and in-flight streams get this long to finish; a call
# still running 2 s before the end is cut by the worker and recorded (see post_worker_init).
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "120"))
# Idle keep-alive connections are only closed after this many seconds, and a SIGTERM waits
# for them too: keep it short (raise it above your load balancer's idle timeout if needed).
# It is also all the time a client gets to send a request's headers (0 would mean forever).
keepalive = int(os.environ.get("KEEPALIVE", "5"))

# --- Limits --------------------------------------------------------------------------------
limit_request_line = 8190
limit_request_fields = 200
limit_request_field_size = 16380

# --- Logging -------------------------------------------------------------------------------
# The proxy writes one record per request itself (with secrets redacted); gunicorn's access
# log would print raw URLs, including Gemini's ?key=, so it stays off.
accesslog = None
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")
proc_name = "llmproxy"
# gunicorn's runtime control socket is not used; several instances on one host would share
# its default path.
control_socket_disable = True

# --- Metrics (prometheus-client multiprocess mode) -----------------------------------------
# Every worker writes its metrics to files in PROMETHEUS_MULTIPROC_DIR and a scrape of any
# worker reads them all. The master sets it before forking and empties it: counts from a
# previous run must not come back. prometheus_client is not imported here (it imports ssl).
# This lives in on_starting, not at module level: a reload on HUP re-reads this file while
# workers still use the directory.
_metrics_dir_created = False


def on_starting(server: Any) -> None:
    global _metrics_dir_created
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for name in glob.glob(os.path.join(path, "*.db")):
            os.remove(name)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="llmproxy-metrics-")
        _metrics_dir_created = True


def child_exit(server: Any, worker: Any) -> None:
    # What prometheus_client.multiprocess.mark_process_dead does: drop a dead worker's
    # live gauges (in-flight requests, open streams) so they stop counting.
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        for name in glob.glob(os.path.join(path, f"gauge_live*_{worker.pid}.db")):
            os.remove(name)


def on_exit(server: Any) -> None:
    if _metrics_dir_created:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


# --- Errors gunicorn answers itself --------------------------------------------------------
# For a request it cannot parse, gunicorn sends an HTML page that quotes the offending
# request line back — a Gemini ``?key=`` included. Send a short JSON error in the OpenAI
# shape (the provider is not known yet) that names only the status.
def _write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    from gunicorn import util

    body = json.dumps({"error": {"message": reason, "type": "invalid_request_error",
                                 "param": None, "code": None}}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


def post_fork(server: Any, worker: Any) -> None:
    from gunicorn import util

    util.write_error = _write_json_error


# --- Shutdown ------------------------------------------------------------------------------
# The master SIGKILLs a worker still busy graceful_timeout after its SIGTERM, and a call cut
# that way leaves no usage record, access record or limiter correction. The app cuts such
# calls itself shortly before and records them (outcome "shutdown"); on SIGINT/SIGQUIT at
# once. Imported in the worker, after gevent patched it.
def post_worker_init(worker: Any) -> None:
    from llmproxy.shutdown import install

    install(worker)


def worker_int(worker: Any) -> None:
    from llmproxy.shutdown import quick

    quick(worker)
