"""``python -m llmproxy keys create|list|show|update|revoke|migrate``: the key database, directly.

Talks to the database named by the settings (``auth.database_url``, env
``LLMPROXY_DATABASE_URL``), not to a running proxy. Output is a table, or JSON with ``--json``.
Exit status: 0 done, 1 no such key or the database failed, 2 invalid arguments or settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

from ..budgets.model import WINDOW_PHRASES, WINDOWS
from ..config import LIMIT_KEYS, ConfigError, load_settings
from .model import KeyValidationError, ProxyKey, is_key_id, utcnow, validate_fields
from .store import KeyStore, KeyStoreError, UnknownKeyError

_NEVER = ("", "never", "none")


class _Usage(Exception):
    """A command-line mistake: exit status 2."""


def _limit(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or name not in LIMIT_KEYS or not value.isdigit():
        raise argparse.ArgumentTypeError(
            f"expected NAME=N with NAME one of {', '.join(LIMIT_KEYS)}")
    return name, int(value)


def _field_options(parser: argparse.ArgumentParser, *, update: bool) -> None:
    clear = " (an empty value clears it)" if update else ""
    parser.add_argument("--name", required=not update, help="what the key is for")
    parser.add_argument("--user", help="the user calls are attributed to" + clear)
    parser.add_argument("--team", help="the team calls are attributed to" + clear)
    parser.add_argument("--provider", action="append", dest="providers", metavar="NAME",
                        help="allowed provider (repeat; default: every provider)")
    parser.add_argument("--model", action="append", dest="models", metavar="GLOB",
                        help="allowed model, glob pattern (repeat; default: every model)")
    parser.add_argument("--limit", action="append", dest="limits", type=_limit,
                        metavar="NAME=N", help=f"rate limit of this key (repeat): "
                                               f"{', '.join(LIMIT_KEYS)}")
    parser.add_argument("--expires", metavar="TIME",
                        help="ISO 8601 expiry, e.g. 2030-01-31T00:00:00Z"
                             + (" ('never' clears it)" if update else ""))
    parser.add_argument("--metadata", metavar="JSON", help="free-form JSON object")
    for window in WINDOWS:
        parser.add_argument(f"--budget-{window}", metavar="USD",
                            help=f"the key's spend budget {WINDOW_PHRASES[window]}"
                                 + (" (other windows are kept; an empty value removes this "
                                    "one)" if update else ""))
    if update:
        parser.add_argument("--all-providers", action="store_true",
                            help="allow every provider again")
        parser.add_argument("--all-models", action="store_true", help="allow every model again")
        parser.add_argument("--no-limits", action="store_true",
                            help="drop the key's own limits (the configured ones apply)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llmproxy keys",
        description="Manage proxy keys in the key database (auth.database_url, "
                    "env LLMPROXY_DATABASE_URL).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return p

    _field_options(command("create", "create a key and print its secret, once"), update=False)
    listing = command("list", "list keys (never their secrets)")
    listing.add_argument("--active", action="store_true", help="leave out revoked keys")
    command("show", "show one key").add_argument("id")
    update = command("update", "change fields of a key")
    update.add_argument("id")
    _field_options(update, update=True)
    command("revoke", "revoke a key for good").add_argument("id")
    command("migrate", "create or upgrade the database schema")
    return parser


def _fields(args: argparse.Namespace, *, update: bool) -> dict[str, Any]:
    """The options given, as validate_fields takes them (from JSON-like values)."""
    out: dict[str, Any] = {}
    if args.name is not None:
        out["name"] = args.name
    for name in ("user", "team"):
        value = getattr(args, name)
        if value is not None:
            out[name] = None if update and value == "" else value
    if args.providers is not None or (update and args.all_providers):
        out["providers"] = [] if update and args.all_providers else args.providers
    if args.models is not None or (update and args.all_models):
        out["models"] = [] if update and args.all_models else args.models
    if args.limits is not None or (update and args.no_limits):
        out["limits"] = {} if update and args.no_limits else dict(args.limits)
    if args.expires is not None:
        out["expires_at"] = None if update and args.expires.lower() in _NEVER else args.expires
    if args.metadata is not None:
        try:
            out["metadata"] = json.loads(args.metadata)
        except ValueError:
            raise _Usage("--metadata: not valid JSON") from None
    limits: dict[str, float | None] = {}
    for window in WINDOWS:
        text = getattr(args, f"budget_{window}")
        if text is not None:
            limits[window] = _usd(text, f"--budget-{window}", update=update)
    if limits:
        # an update changes the windows given and keeps the others (merged in run())
        out["budgets"] = limits
    if update and not out:
        raise _Usage("nothing to change: give at least one option")
    return out


def _usd(text: str, option: str, *, update: bool) -> float | None:
    if update and text.strip() == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise _Usage(f"{option}: expected a number of USD") from None


# ---------------------------------------------------------------------------------- output


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%SZ")


def _status(key: ProxyKey, now: datetime) -> str:
    if key.revoked:
        return "revoked"
    return "active" if key.usable(now) else "expired"


_COLUMNS = ("ID", "PREFIX", "NAME", "USER", "TEAM", "PROVIDERS", "MODELS", "LIMITS", "EXPIRES",
            "STATUS", "LAST USED")


def _row(key: ProxyKey, now: datetime) -> tuple[str, ...]:
    limits = ",".join(f"{k}={v}" for k, v in key.limits.items())
    return (key.id, key.prefix + "…", key.name, key.user or "-", key.team or "-",
            ",".join(key.providers) or "*", ",".join(key.models) or "*", limits or "-",
            _when(key.expires_at), _status(key, now), _when(key.last_used_at))


def print_table(keys: Sequence[ProxyKey], out: TextIO) -> None:
    now = utcnow()
    rows = [_COLUMNS, *(_row(k, now) for k in keys)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def _show(key: ProxyKey, as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(json.dumps(key.public(), indent=2) + "\n")
        return
    public = key.public()
    public["status"] = _status(key, utcnow())
    width = max(len(k) for k in public)
    for name, value in public.items():
        shown = json.dumps(value) if isinstance(value, (dict, list)) else \
            "-" if value is None else str(value)
        out.write(f"{name.ljust(width)}  {shown}\n")


# ----------------------------------------------------------------------------------- main


def run(args: argparse.Namespace, store: KeyStore, providers: Sequence[str],
        out: TextIO) -> int:
    if args.command == "migrate":
        version = store.migrate()
        if args.json:
            out.write(json.dumps({"schema_version": version}) + "\n")
        else:
            out.write(f"key database at schema version {version}\n")
        return 0
    if args.command == "create":
        fields = validate_fields(_fields(args, update=False), providers=providers)
        key, secret = store.create(**fields)
        if args.json:
            out.write(json.dumps({"id": key.id, "key": secret, **key.public()}, indent=2) + "\n")
        else:
            out.write(f"key: {secret}\n(shown only now: store it; the proxy keeps only a hash)"
                      "\n\n")
            _show(key, False, out)
        return 0
    if args.command == "list":
        keys = store.list(include_revoked=not args.active)
        if args.json:
            out.write(json.dumps([k.public() for k in keys], indent=2) + "\n")
        else:
            print_table(keys, out)
        return 0
    if args.command == "show":
        found = store.get(args.id)
        if found is None:
            raise UnknownKeyError(args.id)
        _show(found, args.json, out)
        return 0
    if args.command == "update":
        given = _fields(args, update=True)
        if "budgets" in given:
            current = store.get(args.id)
            if current is None:
                raise UnknownKeyError(args.id)
            kept = current.budgets.public() if current.budgets is not None else {}
            given["budgets"] = {**kept, **given["budgets"]}
        fields = validate_fields(given, partial=True, providers=providers)
        _show(store.update(args.id, **fields), args.json, out)
        return 0
    if args.command == "revoke":
        _show(store.revoke(args.id), args.json, out)
        return 0
    raise _Usage(f"unknown command {args.command!r}")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(provider_keys=False)  # it never calls a provider
        store = KeyStore.from_url(settings.auth.database_url)
    except (ConfigError, KeyStoreError) as exc:
        err.write(f"llmproxy keys: {exc}\n")
        return 2
    try:
        return run(args, store, tuple(settings.providers), out)
    except (_Usage, KeyValidationError) as exc:
        err.write(f"llmproxy keys: {exc}\n")
        return 2
    except UnknownKeyError:
        shown = repr(args.id) if is_key_id(args.id) else "(not a key id)"  # a pasted secret?
        err.write(f"llmproxy keys: no key with id {shown}\n")
        return 1
    except KeyStoreError as exc:
        err.write(f"llmproxy keys: {exc} (database {store.url})\n")
        return 1
    finally:
        store.close()
