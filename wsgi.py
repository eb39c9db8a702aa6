"""WSGI entry point in a checkout: ``gunicorn -c gunicorn.conf.py wsgi:app``.

The app is built by ``llmproxy.wsgi`` (the installed entry point). Patching first here too
keeps this file safe on its own whatever the package imports on the way (patching twice is
a no-op).
"""

from gevent import monkey

monkey.patch_all()

from llmproxy.wsgi import app  # noqa: E402, F401
