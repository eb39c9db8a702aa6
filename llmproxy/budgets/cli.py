"""``python -m llmproxy budgets set|show|list|clear`` and ``python -m llmproxy spend``.

Like ``python -m llmproxy keys``: the database named by the settings (``auth.database_url``,
env ``LLMPROXY_DATABASE_URL``), no running proxy needed; a table, or JSON with ``--json``.
Exit status: 0 done, 1 no such budget or key, or the database failed, 2 invalid arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import date
from typing import TextIO

from ..config import ConfigError, load_settings
from ..keys.model import KeyValidationError, is_key_id, parse_scope
from ..keys.store import SPEND_GROUPS, KeyStore, KeyStoreError, UnknownKeyError
from .model import (
    WINDOW_PHRASES,
    WINDOWS,
    Budget,
    BudgetValidationError,
    parse_budget,
    parse_day,
)

_PROG = "python -m llmproxy"


class _Usage(Exception):
    """A command-line mistake: exit status 2."""


class _NotFound(Exception):
    """No budget for this scope: exit status 1."""


def _day(text: str) -> date:
    try:
        return parse_day(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a UTC day, YYYY-MM-DD") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG, description="Spend budgets and the spend ledger in the key database "
                                "(auth.database_url, env LLMPROXY_DATABASE_URL).")
    top = parser.add_subparsers(dest="area", required=True, metavar="budgets|spend")
    budgets = top.add_parser("budgets", help="budgets of users, teams and keys",
                             description="USD budgets per UTC day, month and in total.")
    sub = budgets.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--json", action="store_true", help="print JSON")
        return p

    scope = "user:NAME, team:NAME or key:KEY_ID"
    setting = command("set", f"set the budget of {scope} (replaces it: a window not given has "
                             "no limit)")
    setting.add_argument("scope", help=scope)
    for window in WINDOWS:
        setting.add_argument(f"--{window}", type=float, metavar="USD",
                             help=f"limit {WINDOW_PHRASES[window]}")
    command("show", f"show the budget of {scope}").add_argument("scope", help=scope)
    command("list", "list the budgets of users and teams")
    command("clear", f"remove the budget of {scope}").add_argument("scope", help=scope)

    spend = top.add_parser("spend", help="spend from the ledger",
                           description="Spend from the ledger, most expensive first.")
    spend.add_argument("--group-by", choices=SPEND_GROUPS, default="key")
    spend.add_argument("--from", dest="start", type=_day, metavar="YYYY-MM-DD",
                       help="first UTC day (default: the first recorded)")
    spend.add_argument("--to", dest="end", type=_day, metavar="YYYY-MM-DD",
                       help="last UTC day, included (default: the last recorded)")
    spend.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _scope(text: str) -> tuple[str, str]:
    if text.startswith("key:"):
        key_id = text[4:]
        if not is_key_id(key_id):
            raise UnknownKeyError(key_id)
        return "key", key_id
    return parse_scope(text)


def _budget(args: argparse.Namespace) -> Budget | None:
    limits = {w: getattr(args, w) for w in WINDOWS if getattr(args, w) is not None}
    if not limits:
        raise _Usage("give --day, --month and/or --total (budgets clear removes a budget)")
    try:
        return parse_budget(limits, "budgets")
    except BudgetValidationError as exc:
        raise _Usage(f"--{exc.field.removeprefix('budgets.')}: {exc.problem}") from None


def _print(scope: str, budget: Budget | None, as_json: bool, out: TextIO) -> None:
    public = None if budget is None else budget.public()
    if as_json:
        out.write(json.dumps({"scope": scope, "budgets": public}, indent=2) + "\n")
        return
    limits = "no budget" if public is None else "  ".join(
        f"{w}={'-' if v is None else f'{v:g} USD'}" for w, v in public.items())
    out.write(f"{scope}  {limits}\n")


def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def _budgets(args: argparse.Namespace, store: KeyStore, out: TextIO) -> int:
    if args.command == "list":
        listed = store.budgets()
        if args.json:
            out.write(json.dumps([{"scope": f"{k}:{n}", "budgets": b.public()}
                                  for (k, n), b in listed.items()], indent=2) + "\n")
        else:
            for (kind, name), each in listed.items():
                _print(f"{kind}:{name}", each, False, out)
        return 0
    kind, name = _scope(args.scope)
    shown = f"{kind}:{name}"
    if args.command == "set":
        budget: Budget | None = _budget(args)
        if kind == "key":
            budget = store.update(name, budgets=budget).budgets
        else:
            store.set_budget(kind, name, budget)
        _print(shown, budget, args.json, out)
        return 0
    if args.command == "clear":
        if kind == "key":
            store.update(name, budgets=None)
        else:
            store.set_budget(kind, name, None)
        _print(shown, None, args.json, out)
        return 0
    if kind == "key":  # show
        key = store.get(name)
        if key is None:
            raise UnknownKeyError(name)
        found = key.budgets
    else:
        found = store.get_budget(kind, name)
    if found is None:
        raise _NotFound(shown)
    _print(shown, found, args.json, out)
    return 0


def _spend(args: argparse.Namespace, store: KeyStore, out: TextIO) -> int:
    if args.start is not None and args.end is not None and args.start > args.end:
        raise _Usage("--from must not be after --to")
    rows = store.spend_rows(args.group_by, args.start, args.end)
    if args.json:
        out.write(json.dumps({"group_by": args.group_by,
                              "from": args.start and args.start.isoformat(),
                              "to": args.end and args.end.isoformat(), "rows": rows},
                             indent=2) + "\n")
        return 0
    table = [(args.group_by.upper(), "COST USD", "REQUESTS", "INPUT TOKENS", "OUTPUT TOKENS")]
    table += [(str(r[args.group_by] or "-"), f"{r['cost_usd']:.6f}", str(r["requests"]),
               str(r["input_tokens"]), str(r["output_tokens"])) for r in rows]
    _table(table, out)
    return 0


def run(args: argparse.Namespace, store: KeyStore, out: TextIO) -> int:
    return _budgets(args, store, out) if args.area == "budgets" else _spend(args, store, out)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """``argv`` starts with ``budgets`` or ``spend``."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = _parser().parse_args(argv)
    name = f"llmproxy {args.area}"
    try:
        settings = load_settings(provider_keys=False)  # it never calls a provider
        store = KeyStore.from_url(settings.auth.database_url)
    except (ConfigError, KeyStoreError) as exc:
        err.write(f"{name}: {exc}\n")
        return 2
    try:
        return run(args, store, out)
    except (_Usage, KeyValidationError) as exc:
        err.write(f"{name}: {exc}\n")
        return 2
    except _NotFound as exc:
        err.write(f"{name}: no budget for {exc}\n")
        return 1
    except UnknownKeyError as exc:
        shown = repr(exc.key_id) if is_key_id(exc.key_id) else "(not a key id)"
        err.write(f"{name}: no key with id {shown}\n")
        return 1
    except KeyStoreError as exc:
        err.write(f"{name}: {exc} (database {store.url})\n")
        return 1
    finally:
        store.close()
