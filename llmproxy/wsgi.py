"""Installed WSGI entry point: ``gunicorn -c python:llmproxy.gunicorn_conf llmproxy.wsgi:app``.

gevent must patch the standard library before anything imports ssl, socket or requests.
gunicorn's gevent worker already patches in each worker before loading this module; the
explicit call makes the module safe under other servers too (patching twice is a no-op).
"""

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import sys  # noqa: E402

from llmproxy import create_app  # noqa: E402
from llmproxy.config import ConfigError, config_dir  # noqa: E402

try:
    app = create_app()
except ConfigError as exc:  # one clear line instead of a traceback
    print(f"llmproxy: {exc}", file=sys.stderr)
    sys.exit(4)  # gunicorn's APP_LOAD_ERROR: the master stops instead of respawning forever

_found = config_dir()
logging.getLogger(__name__).info("config directory", extra={"fields": {
    "config_dir": str(_found.path), "config_source": _found.source}})
