"""The ``keyguard`` command: manage API keys from a shell or a script.

::

    keyguard keys create --name ci --scopes text:generate --json
    keyguard keys list --status active
    keyguard keys rotate key_... --grace 1h --json
    keyguard usage key_... --since 24h --by service
    keyguard errors key_... --limit 20

Settings come from :func:`keyguard.settings.load_settings` (TOML file, ``.env``,
``KEYGUARD_*`` variables); ``--storage-url`` and ``--config`` override them.
``--json`` (before or after the subcommand) prints one JSON document for scripts.

Exit codes, which scripts may rely on:

=====  ==========================================================
0      success
1      the key id was not found
2      usage error or invalid input (argparse's own errors too)
3      storage or configuration error
130    interrupted (Ctrl-C)
=====  ==========================================================

Errors are one line on stderr (``keyguard: error: ...``), never a traceback and never
a secret: a raw key is printed only by ``create`` and ``rotate``, once, on stdout.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from argparse import SUPPRESS
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, TypeAlias

from pydantic import ValidationError

from . import __version__, _cli_usage
from . import _cli_output as out
from .clock import utcnow
from .errors import (
    ConfigurationError,
    InvalidInput,
    KeyGuardError,
    KeyNotFound,
    StorageError,
    shown,
)
from .lifecycle import UNSET, KeyChanges
from .manager import KeyManager
from .records import JSON, KeyRecord, LimitOverrides
from .settings import KeyGuardSettings, describe_settings_error, load_settings
from .validation import parse_duration, validate_plan

__all__ = ["EXIT_INTERRUPTED", "EXIT_NOT_FOUND", "EXIT_OK", "EXIT_STORAGE", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_STORAGE = 3
EXIT_INTERRUPTED = 130

# Most specific first: KeyNotFound and InvalidInput are also LookupError/ValueError.
_EXIT_CODES: tuple[tuple[type[Exception], int], ...] = (
    (KeyNotFound, EXIT_NOT_FOUND),
    (InvalidInput, EXIT_USAGE),
    (ConfigurationError, EXIT_STORAGE),
    (StorageError, EXIT_STORAGE),
    (ValidationError, EXIT_STORAGE),
    (KeyGuardError, EXIT_STORAGE),
)

_EPILOG = """\
exit codes:
  0  success
  1  key not found
  2  usage error or invalid input
  3  storage or configuration error

settings: KEYGUARD_* environment variables, .env, and the TOML file named by
--config or KEYGUARD_CONFIG_FILE (see keyguard.settings)."""


@dataclass(frozen=True, slots=True)
class Session:
    """What a command handler works with: the manager and how to print."""

    manager: KeyManager
    settings: KeyGuardSettings
    as_json: bool

    def now(self) -> datetime:
        return utcnow(self.manager.flows.clock)


Handler = Callable[[argparse.Namespace, Session], int]
_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


# --- option values -------------------------------------------------------------------


def _scopes(text: str) -> tuple[str, ...]:
    """``a,b``: scopes are validated by the manager, this only splits."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _metadata(text: str) -> dict[str, JSON]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            "metadata", f"is not valid JSON ({exc.msg} at position {exc.pos})"
        ) from None
    except RecursionError:
        raise InvalidInput("metadata", "is nested too deeply") from None
    if not isinstance(value, dict):
        raise InvalidInput("metadata", "must be a JSON object")
    return value


def _count(field: str, text: str) -> int | None:
    """An update's count option: a number, or ``none`` to fall back to the plan's."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidInput(field, f"{shown(text)} is not a whole number or 'none'") from None


def _plan(name: str, settings: KeyGuardSettings) -> str:
    plan = validate_plan(name)
    if plan not in settings.plans:
        known = ", ".join(sorted(settings.plans))
        raise InvalidInput("plan", f"{plan!r} is not a configured plan; known: {known}")
    return plan


def _grace(text: str | None) -> timedelta | None:
    return None if text is None else parse_duration("grace", text)


# --- handlers ------------------------------------------------------------------------


def _create(args: argparse.Namespace, session: Session) -> int:
    issued = session.manager.create(
        args.name,
        owner=args.owner,
        scopes=_scopes(args.scopes or ""),
        plan=_plan(args.plan or session.settings.default_plan, session.settings),
        limits=LimitOverrides(args.limits, args.quota_daily, args.quota_monthly, args.concurrency),
        ip_allow=tuple(args.ip or ()),
        expires=args.expires,
        metadata=None if args.metadata is None else _metadata(args.metadata),
        env=args.env,
    )
    out.show_issued(
        issued.record, issued.key, session.now(), as_json=session.as_json, action="Created"
    )
    return EXIT_OK


def _list(args: argparse.Namespace, session: Session) -> int:
    records: list[KeyRecord] = []
    cursor: str | None = args.after
    while True:
        page = session.manager.list(
            owner=args.owner, status=args.status, plan=args.plan, after=cursor, limit=args.limit
        )
        records.extend(page.items)
        cursor = page.next_cursor
        if cursor is None or not args.all:
            break
    out.show_records(records, session.now(), as_json=session.as_json)
    if cursor is not None:
        print(f"keyguard: more keys: use --after {cursor} or --all", file=sys.stderr)
    return EXIT_OK


def _show(args: argparse.Namespace, session: Session) -> int:
    out.show_record(session.manager.get(args.id), session.now(), as_json=session.as_json)
    return EXIT_OK


def _limit_changes(args: argparse.Namespace, session: Session) -> LimitOverrides | None:
    """The key's overrides with the given ones replaced, or ``None`` if none was given.

    ``--quota-daily 5`` alone must keep the key's other overrides, so this reads the key
    first; "none" as a value clears that one override.
    """
    given: dict[str, Any] = {}
    if args.limits is not None:
        given["rate"] = None if args.limits.strip().lower() == "none" else args.limits
    for name in ("quota_daily", "quota_monthly", "concurrency"):
        if (text := getattr(args, name)) is not None:
            given[name] = _count(name, text)
    if not given:
        return None
    return replace(session.manager.get(args.id).limits, **given)


def _update(args: argparse.Namespace, session: Session) -> int:
    limits = _limit_changes(args, session)
    changes = KeyChanges(
        name=UNSET if args.name is None else args.name,
        owner=None if args.no_owner else (UNSET if args.owner is None else args.owner),
        scopes=UNSET if args.scopes is None else _scopes(args.scopes),
        plan=UNSET if args.plan is None else _plan(args.plan, session.settings),
        limits=UNSET if limits is None else limits,
        ip_allow=() if args.clear_ip else (UNSET if args.ip is None else tuple(args.ip)),
        expires_at=None if args.no_expiry else UNSET,
        metadata=UNSET if args.metadata is None else _metadata(args.metadata),
    )
    record = session.manager.update(args.id, changes, expires=args.expires)
    out.show_record(record, session.now(), as_json=session.as_json, action="Updated")
    return EXIT_OK


def _revoke(args: argparse.Namespace, session: Session) -> int:
    record = session.manager.revoke(args.id, reason=args.reason)
    out.show_record(record, session.now(), as_json=session.as_json, action="Revoked")
    return EXIT_OK


def _rotate(args: argparse.Namespace, session: Session) -> int:
    grace = _grace(args.grace)
    issued = session.manager.rotate(args.id, grace=grace)
    grace = session.manager.flows.default_grace if grace is None else grace
    out.show_issued(
        issued.record,
        issued.key,
        session.now(),
        as_json=session.as_json,
        action="Rotated",
        grace=grace,
    )
    return EXIT_OK


def _delete(args: argparse.Namespace, session: Session) -> int:
    if not args.yes:
        raise InvalidInput("confirmation", "deleting a key is permanent; add --yes")
    session.manager.delete(args.id)
    out.show_deleted(args.id, as_json=session.as_json)
    return EXIT_OK


def _usage(args: argparse.Namespace, session: Session) -> int:
    record = session.manager.get(args.id)
    _cli_usage.show_usage(args, session.settings, record, session.now(), as_json=session.as_json)
    return EXIT_OK


def _errors(args: argparse.Namespace, session: Session) -> int:
    record = session.manager.get(args.id)
    _cli_usage.show_errors(args, session.settings, record, as_json=session.as_json)
    return EXIT_OK


# --- parser --------------------------------------------------------------------------


def _common_options() -> argparse.ArgumentParser:
    """Options accepted both before and after the subcommand.

    ``SUPPRESS`` defaults keep a subcommand's parser from overwriting a value the main
    parser already read (``keyguard --json keys list``).
    """
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("global options")
    group.add_argument("--json", action="store_true", default=SUPPRESS, help="print JSON")
    for flag, metavar, help_ in (
        ("--storage-url", "URL", "key store URL (default: KEYGUARD_STORAGE_URL or settings)"),
        ("--config", "FILE", "TOML settings file (default: KEYGUARD_CONFIG_FILE)"),
        ("--actor", "NAME", "who the audit trail names (default: cli:<user>)"),
    ):
        group.add_argument(flag, metavar=metavar, default=SUPPRESS, help=help_)
    return common


def _add_limit_options(parser: argparse.ArgumentParser, *, update: bool) -> None:
    """Per-key limit overrides; on update the value ``none`` clears one."""
    clear = "; 'none' returns to the plan's" if update else ""
    parser.add_argument(
        "--limits", metavar="RATE", help=f"windows such as '60/minute;1000/hour'{clear}"
    )
    for flag, help_ in (
        ("--quota-daily", "units per UTC day"),
        ("--quota-monthly", "units per UTC month"),
        ("--concurrency", "requests in flight at once"),
    ):
        parser.add_argument(flag, type=str if update else int, metavar="N", help=help_ + clear)


def _add_create(keys: _Commands, common: argparse.ArgumentParser) -> None:
    p = keys.add_parser("create", parents=[common], help="issue a new key (shown once)")
    p.add_argument("--name", required=True, help="what the key is for")
    p.add_argument("--owner", help="who the key belongs to")
    p.add_argument("--scopes", help="comma-separated scopes, e.g. text:generate,image:*")
    p.add_argument("--plan", help="plan name (default: the configured default plan)")
    _add_limit_options(p, update=False)
    p.add_argument("--ip", action="append", metavar="CIDR", help="allowed network (repeatable)")
    p.add_argument("--expires", metavar="WHEN", help="a duration (30d) or ISO-8601 time")
    p.add_argument("--env", help="key environment, e.g. live or test")
    p.add_argument("--metadata", metavar="JSON", help="a JSON object stored with the key")
    p.set_defaults(handler=_create)


def _add_list(keys: _Commands, common: argparse.ArgumentParser) -> None:
    p = keys.add_parser("list", parents=[common], help="list keys, oldest first")
    p.add_argument("--owner")
    p.add_argument("--status", choices=("active", "expired", "revoked"))
    p.add_argument("--plan")
    p.add_argument("--limit", type=int, default=100, metavar="N", help="page size (1-1000)")
    p.add_argument("--after", metavar="CURSOR", help="continue after this key id")
    p.add_argument("--all", action="store_true", help="follow cursors to the last page")
    p.set_defaults(handler=_list)


def _add_update(keys: _Commands, common: argparse.ArgumentParser) -> None:
    p = keys.add_parser("update", parents=[common], help="change a key; only given options")
    p.add_argument("id")
    p.add_argument("--name")
    owner = p.add_mutually_exclusive_group()
    owner.add_argument("--owner")
    owner.add_argument("--no-owner", action="store_true", help="clear the owner")
    p.add_argument("--scopes", help="replace the scopes (comma-separated; '' for none)")
    p.add_argument("--plan")
    _add_limit_options(p, update=True)
    ip = p.add_mutually_exclusive_group()
    ip.add_argument("--ip", action="append", metavar="CIDR", help="replace the allow-list")
    ip.add_argument("--clear-ip", action="store_true", help="allow any address")
    expiry = p.add_mutually_exclusive_group()
    expiry.add_argument("--expires", metavar="WHEN", help="a duration (30d) or ISO-8601 time")
    expiry.add_argument("--no-expiry", action="store_true", help="never expire")
    p.add_argument("--metadata", metavar="JSON", help="replace the metadata")
    p.set_defaults(handler=_update)


def _add_by_id(keys: _Commands, common: argparse.ArgumentParser) -> None:
    show = keys.add_parser("show", parents=[common], help="show one key")
    show.add_argument("id")
    show.set_defaults(handler=_show)
    revoke = keys.add_parser("revoke", parents=[common], help="revoke a key at once")
    revoke.add_argument("id")
    revoke.add_argument("--reason", default="", help="recorded with the revocation")
    revoke.set_defaults(handler=_revoke)
    rotate = keys.add_parser("rotate", parents=[common], help="issue a new secret (shown once)")
    rotate.add_argument("id")
    rotate.add_argument(
        "--grace", metavar="DURATION", help="how long the old secret keeps working, e.g. 1h or 0"
    )
    rotate.set_defaults(handler=_rotate)
    delete = keys.add_parser("delete", parents=[common], help="delete a key for good")
    delete.add_argument("id")
    delete.add_argument("--yes", action="store_true", help="confirm the deletion")
    delete.set_defaults(handler=_delete)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; exposed so docs and tests can render ``--help``."""
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="keyguard",
        description="Manage keyguard API keys.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"keyguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    keys_parser = commands.add_parser("keys", help="create, list, change and revoke keys")
    keys = keys_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for add in (_add_create, _add_list, _add_by_id, _add_update):
        add(keys, common)
    _add_usage(commands, common)
    return parser


def _add_usage(commands: _Commands, common: argparse.ArgumentParser) -> None:
    usage = commands.add_parser(
        "usage", parents=[common], help="a key's calls, errors, latency and limits"
    )
    usage.add_argument("id", metavar="KEY_ID")
    usage.add_argument("--since", default="24h", help="a duration before now (24h, 30d)")
    usage.add_argument("--until", help="a duration before now (default: now)")
    usage.add_argument("--granularity", choices=("minute", "hour", "day"))
    usage.add_argument("--by", choices=("service",), help="one series per service")
    usage.set_defaults(handler=_usage)
    errors = commands.add_parser("errors", parents=[common], help="a key's recent errors")
    errors.add_argument("id", metavar="KEY_ID")
    errors.add_argument("--limit", type=int, default=50, metavar="N", help="entries (1-1000)")
    errors.set_defaults(handler=_errors)


# --- running -------------------------------------------------------------------------


def _default_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError, ImportError):  # no user name (containers, odd platforms)
        return "cli"


def _settings(args: argparse.Namespace) -> KeyGuardSettings:
    overrides: dict[str, Any] = {}
    if hasattr(args, "storage_url"):
        overrides["storage_url"] = args.storage_url
    return load_settings(toml_file=getattr(args, "config", None), **overrides)


def _run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = settings.open_store()
    try:
        manager = settings.manager(store, actor=getattr(args, "actor", None) or _default_actor())
        session = Session(manager, settings, as_json=getattr(args, "json", False))
        handler: Handler = args.handler
        return handler(args, session)
    finally:
        store.close()


def _exit_code(exc: Exception) -> int:
    return next(code for kind, code in _EXIT_CODES if isinstance(exc, kind))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace | int:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors; keep main() returning
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``) and return its exit code."""
    args = _parse(argv)
    if isinstance(args, int):
        return args
    try:
        return _run(args)
    except (KeyGuardError, ValidationError) as exc:
        message = describe_settings_error(exc) if isinstance(exc, ValidationError) else str(exc)
        out.emit_error(message)
        return _exit_code(exc)
    except KeyboardInterrupt:
        out.emit_error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`keyguard keys list | head`): stop quietly, and point
        # stdout at devnull so the interpreter's final flush does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
