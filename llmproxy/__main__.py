"""``llmproxy`` (or ``python -m llmproxy``): --version, build-info, check-config, serve, keys,
budgets, spend."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from . import buildinfo


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:  # its own sub-commands and options: see llmproxy/keys/cli.py
        from .keys import cli

        return cli.main(argv[1:])
    if argv[:1] in (["budgets"], ["spend"]):  # see llmproxy/budgets/cli.py
        from .budgets import cli as budgets_cli

        return budgets_cli.main(argv)
    parser = argparse.ArgumentParser(
        prog="llmproxy", epilog="python -m llmproxy keys --help: manage proxy keys; "
                                "budgets --help: spend budgets; spend --help: the spend ledger")
    parser.add_argument("--version", action="store_true", help="print version and build info")
    parser.add_argument("command", nargs="?", choices=["build-info", "check-config", "serve"],
                        help="build-info: record git commit and build time; "
                             "check-config: validate the configuration and exit; "
                             "serve: run the proxy under gunicorn (further arguments go to "
                             "gunicorn)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.args)
    if args.args:
        parser.error(f"unrecognized arguments: {' '.join(args.args)}")
    if args.command == "build-info":
        buildinfo.write()
        print(buildinfo.describe())
        return 0
    if args.command == "check-config":
        from .config import ConfigError, load_settings

        try:
            load_settings()
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        print("config ok")
        return 0
    print(buildinfo.describe())
    return 0


def serve(gunicorn_args: list[str]) -> NoReturn:
    """Become gunicorn with the packaged settings, so that signals reach it directly."""
    command = [sys.executable, "-m", "gunicorn", "-c", "python:llmproxy.gunicorn_conf",
               *gunicorn_args, "llmproxy.wsgi:app"]
    os.execv(sys.executable, command)


if __name__ == "__main__":
    sys.exit(main())
