"""`waddle-ai migrate` and `waddle-ai config get|set|list|delete|rotate-key`.

Provider API keys never travel on the command line (it ends up in shell
history and `ps`): `config set --api-key` reads the key from standard input,
or asks for it without echo on a terminal. Output shows keys masked only.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

import orjson

from config.database import create_pool, redact_dsn
from config.migrate import MigrationError, migrate
from config.repository import (
    SETTABLE_FIELDS,
    CommunityConfigRecord,
    ConfigRepository,
    ConfigValidationError,
    parse_assignments,
)
from config.secrets import KeyBox, KeyBoxError
from config.settings import Settings


def add_parsers(commands: Any) -> None:
    commands.add_parser("migrate", help="create or upgrade the database schema")

    config = commands.add_parser("config", help="per-community settings (PostgreSQL)")
    actions = config.add_subparsers(dest="config_action", required=True, metavar="ACTION")

    get = actions.add_parser("get", help="one community's settings (API key masked)")
    get.add_argument("community")
    get.add_argument("--json", action="store_true", help="print JSON")

    listing = actions.add_parser("list", help="every configured community")
    listing.add_argument("--json", action="store_true", help="print JSON")

    put = actions.add_parser(
        "set", help="change settings: NAME=VALUE ... (validated; unnamed ones are kept)",
        description="Settable: " + ", ".join(sorted(set(SETTABLE_FIELDS) - {"api_key"})),
    )
    put.add_argument("community")
    put.add_argument("assignments", nargs="*", metavar="NAME=VALUE")
    put.add_argument("--unset", action="append", default=[], metavar="NAME",
                     help="clear a setting (back to the environment default)")
    put.add_argument("--api-key", action="store_true",
                     help="read the provider API key from stdin (or a prompt); never echoed")
    put.add_argument("--json", action="store_true", help="print JSON")

    delete = actions.add_parser("delete", help="remove a community's settings")
    delete.add_argument("community")

    actions.add_parser(
        "rotate-key",
        help="re-encrypt every stored API key with the first CONFIG_ENCRYPTION_KEY key",
    )


async def run_migrate(settings: Settings, _: argparse.Namespace) -> int:
    if not settings.database_url:
        return _fail("DATABASE_URL is not set: there is no database to migrate", code=2)
    try:
        applied = await migrate(settings.database_url)
    except MigrationError as exc:
        return _fail(f"migration failed on {redact_dsn(settings.database_url)}: {exc}")
    print("applied: " + ", ".join(applied) if applied else "the schema is up to date")
    return 0


async def run_config(settings: Settings, args: argparse.Namespace) -> int:
    if not settings.database_url:
        return _fail("DATABASE_URL is not set: communities use the environment defaults",
                     code=2)
    try:
        keybox = KeyBox.from_setting(settings.config_encryption_key)
    except KeyBoxError as exc:
        return _fail(f"CONFIG_ENCRYPTION_KEY: {exc}", code=2)
    pool = await create_pool(settings.database_url, max_size=2)
    try:
        await migrate(pool)
        repository = ConfigRepository(pool, keybox)
        action = args.config_action
        if action == "get":
            return await _get(repository, keybox, args)
        if action == "list":
            return await _list(repository, keybox, args)
        if action == "set":
            return await _set(repository, keybox, args)
        if action == "delete":
            deleted = await repository.delete(args.community)
            print(f"deleted {args.community}" if deleted else f"{args.community}: not configured")
            return 0 if deleted else 1
        rotated = await repository.rotate_keys(keybox)
        print(f"re-encrypted {rotated} API key(s) with the newest key")
        return 0
    except KeyBoxError as exc:
        return _fail(str(exc), code=2)
    finally:
        await pool.close()


async def _get(repository: ConfigRepository, keybox: KeyBox, args: argparse.Namespace) -> int:
    record = await repository.get(args.community)
    if record is None:
        return _fail(f"{args.community}: not configured (the environment defaults apply)")
    _show(record, keybox, as_json=args.json)
    return 0


async def _list(repository: ConfigRepository, keybox: KeyBox, args: argparse.Namespace) -> int:
    records = await repository.list()
    if args.json:
        print(orjson.dumps([r.to_display(keybox) for r in records],
                           option=orjson.OPT_INDENT_2).decode())
        return 0
    if not records:
        print("no community has its own settings (the environment defaults apply)")
        return 0
    print(f"{'COMMUNITY':<32} {'ENABLED':<8} {'PROVIDER':<10} {'MODEL':<24} UPDATED")
    for r in records:
        shown = r.to_display(keybox)
        print(f"{r.community_id[:32]:<32} {str(r.enabled).lower():<8} "
              f"{shown.get('provider', '-'):<10} {str(shown.get('model', '-'))[:24]:<24} "
              f"{shown.get('updated_at', '-')}")
    return 0


async def _set(repository: ConfigRepository, keybox: KeyBox, args: argparse.Namespace) -> int:
    try:
        changes = parse_assignments(args.assignments, args.unset)
    except ValueError as exc:
        return _fail(str(exc), code=2)
    if "api_key" in changes and changes["api_key"] is not None:
        return _fail("an API key is never given on the command line (shell history, ps): "
                     "use --api-key, which reads it from stdin or a prompt", code=2)
    if args.api_key:
        key = _read_secret("provider API key: ")
        if not key:
            return _fail("no API key given on stdin", code=2)
        changes["api_key"] = key
    if not changes:
        return _fail("nothing to set: give NAME=VALUE, --unset NAME or --api-key", code=2)
    try:
        record = await repository.upsert(args.community, changes)
    except ConfigValidationError as exc:
        return _fail(str(exc), code=2)
    _show(record, keybox, as_json=args.json)
    return 0


def _read_secret(prompt: str) -> str:
    if sys.stdin.isatty():
        return getpass.getpass(prompt).strip()
    return sys.stdin.readline().strip()


def _show(record: CommunityConfigRecord, keybox: KeyBox, *, as_json: bool) -> None:
    shown = record.to_display(keybox)
    if as_json:
        print(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())
        return
    width = max(len(name) for name in shown)
    for name, value in shown.items():
        text = ", ".join(map(str, value)) if isinstance(value, list) else value
        print(f"{name:<{width}}  {text}")


def _fail(message: str, *, code: int = 1) -> int:
    print(f"waddle-ai: {message}", file=sys.stderr)
    return code
