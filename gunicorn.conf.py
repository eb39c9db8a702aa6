"""gunicorn settings for a checkout: ``gunicorn -c gunicorn.conf.py wsgi:app``.

The settings live in ``llmproxy/gunicorn_conf.py`` (the installed package runs them with
``llmproxy serve``). gunicorn reads every setting and hook by name from this module's
namespace, so names brought in by import count as if defined here.
"""

from llmproxy.gunicorn_conf import *  # noqa: F403
from llmproxy.gunicorn_conf import (  # noqa: F401
    child_exit,
    on_exit,
    on_starting,
    post_fork,
    post_worker_init,
    worker_int,
)
