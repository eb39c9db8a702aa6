"""gunicorn settings for llmproxy: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Plain assignments, overridable by environment variables. Nothing from the app is imported
here: gevent patches the standard library in each worker, after the fork, and modules the
master imported (ssl, requests) would escape the patch.
"""

import os

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
# On SIGTERM workers stop accepting and in-flight streams get this long to finish.
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "120"))
# Idle keep-alive connections are only closed after this many seconds, and a SIGTERM waits
# for them too: keep it short (raise it above your load balancer's idle timeout if needed).
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
