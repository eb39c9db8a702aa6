"""``python -m llmproxy --version``, ``build-info``, ``check-config`` and ``keys ...``."""

from __future__ import annotations

import argparse
import sys

from . import buildinfo


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:  # its own sub-commands and options: see llmproxy/keys/cli.py
        from .keys import cli

        return cli.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="llmproxy", epilog="python -m llmproxy keys --help: manage proxy keys")
    parser.add_argument("--version", action="store_true", help="print version and build info")
    parser.add_argument("command", nargs="?", choices=["build-info", "check-config"],
                        help="build-info: record git commit and build time; "
                             "check-config: validate the configuration and exit")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
