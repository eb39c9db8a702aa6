"""``python -m llmproxy --version`` and ``python -m llmproxy build-info``."""

from __future__ import annotations

import argparse
import sys

from . import buildinfo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmproxy")
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
