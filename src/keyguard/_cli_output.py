"""What the ``keyguard`` CLI prints: JSON for scripts, aligned text for people.

Kept apart from the argument handling so the shapes scripts rely on live in one place.
Nothing here ever receives a digest: records go through :func:`keyguard.codec.public_dict`
(or the fields it exposes), and a raw key only through :func:`issued_json` and
:func:`issued_text`, the two places that are meant to show it once.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from .codec import isoformat, public_dict
from .keys import Secret
from .records import JSON, KeyRecord, LimitOverrides

__all__ = [
    "emit",
    "emit_error",
    "emit_json",
    "issued_json",
    "issued_text",
    "record_text",
    "records_table",
    "show_deleted",
    "show_issued",
    "show_record",
    "show_records",
]

_TABLE_COLUMNS = ("ID", "NAME", "HINT", "STATUS", "SCOPES", "PLAN", "CREATED")
_NAME_WIDTH = 24
_SCOPES_WIDTH = 32


def emit(text: str) -> None:
    """Print to stdout, degrading characters the terminal's encoding cannot show.

    Hints contain ``…`` and names may be any printable text; a Latin-1 terminal must
    get an escape, not a ``UnicodeEncodeError`` traceback.
    """
    try:
        print(text)
    except UnicodeEncodeError:
        encoding = sys.stdout.encoding or "ascii"
        print(text.encode(encoding, "backslashreplace").decode(encoding))


def emit_error(message: str) -> None:
    """One line on stderr, prefixed like argparse's own errors."""
    line = " ".join(message.split())
    print(f"keyguard: error: {line}", file=sys.stderr)


def emit_json(value: JSON) -> None:
    """JSON on stdout; ASCII-only so any terminal or pipe can carry it."""
    print(json.dumps(value, indent=2))


def issued_json(
    record: KeyRecord, key: Secret, now: datetime, *, grace: timedelta | None = None
) -> dict[str, JSON]:
    """The record plus the new ``key`` (and, after a rotation, ``grace_until``)."""
    out = public_dict(record, now=now)
    out["key"] = key.reveal()
    if grace is not None:
        out["grace_until"] = isoformat(record.updated_at + grace) if grace else None
    return out


def issued_text(
    record: KeyRecord, key: Secret, now: datetime, *, action: str, grace: timedelta | None = None
) -> str:
    """A summary for people, with the key alone on the last line."""
    lines = [f"{action} key {record.id}", "", record_text(record, now)]
    if grace is not None:
        until = _moment(record.updated_at + grace) if grace else "now (no grace period)"
        lines.append(f"\nThe previous key stops working at {until}.")
    lines += ["", "API key (copy it now; it will not be shown again):", key.reveal()]
    return "\n".join(lines)


def _moment(moment: datetime | None, missing: str = "-") -> str:
    return missing if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _limits_text(limits: LimitOverrides) -> str:
    if limits.is_empty():
        return "plan defaults"
    parts = [
        f"{label} {value}"
        for label, value in (
            ("rate", limits.rate),
            ("daily quota", limits.quota_daily),
            ("monthly quota", limits.quota_monthly),
            ("concurrency", limits.concurrency),
        )
        if value is not None
    ]
    return "; ".join(parts) + " (others from the plan)"


def _revoked_text(record: KeyRecord) -> str:
    if record.revoked_at is None:
        return "-"
    reason = f" ({record.revoked_reason})" if record.revoked_reason else ""
    return _moment(record.revoked_at) + reason


def record_text(record: KeyRecord, now: datetime) -> str:
    """One field a line, labels aligned, for ``keys show`` and friends."""
    rows = [
        ("id", record.id),
        ("name", record.name),
        ("hint", record.hint),
        ("status", str(record.status(now))),
        ("owner", record.owner or "-"),
        ("scopes", ", ".join(record.scopes) or "-"),
        ("plan", record.plan),
        ("limits", _limits_text(record.limits)),
        ("ip allow", ", ".join(record.ip_allow) or "any address"),
        ("expires", _moment(record.expires_at, "never")),
        ("created", _moment(record.created_at)),
        ("updated", _moment(record.updated_at)),
        ("last used", _moment(record.last_used_at, "never")),
        ("revoked", _revoked_text(record)),
        ("metadata", json.dumps(dict(record.metadata), sort_keys=True)),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _table_row(record: KeyRecord, now: datetime) -> tuple[str, ...]:
    return (
        record.id,
        _clip(record.name, _NAME_WIDTH),
        record.hint,
        str(record.status(now)),
        _clip(",".join(record.scopes), _SCOPES_WIDTH) or "-",
        record.plan,
        record.created_at.strftime("%Y-%m-%d %H:%M"),
    )


def records_table(records: Iterable[KeyRecord], now: datetime) -> str:
    """Records as an aligned table with a header; ``No keys.`` when there are none."""
    rows: list[Sequence[str]] = [_table_row(r, now) for r in records]
    if not rows:
        return "No keys."
    rows.insert(0, _TABLE_COLUMNS)
    widths = [max(len(row[i]) for row in rows) for i in range(len(_TABLE_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def show_record(record: KeyRecord, now: datetime, *, as_json: bool, action: str = "") -> None:
    """A record as one JSON object, or as text under an optional ``Updated key ...`` line."""
    if as_json:
        emit_json(public_dict(record, now=now))
        return
    if action:
        emit(f"{action} key {record.id}\n")
    emit(record_text(record, now))


def show_records(records: Sequence[KeyRecord], now: datetime, *, as_json: bool) -> None:
    """A listing: a JSON array of records, or a table."""
    if as_json:
        emit_json([public_dict(r, now=now) for r in records])
    else:
        emit(records_table(records, now))


def show_issued(
    record: KeyRecord,
    key: Secret,
    now: datetime,
    *,
    as_json: bool,
    action: str,
    grace: timedelta | None = None,
) -> None:
    """A new or rotated key: the one time its secret is printed."""
    if as_json:
        emit_json(issued_json(record, key, now, grace=grace))
    else:
        emit(issued_text(record, key, now, action=action, grace=grace))


def show_deleted(key_id: str, *, as_json: bool) -> None:
    if as_json:
        emit_json({"id": key_id, "deleted": True})
    else:
        emit(f"Deleted key {key_id}")
