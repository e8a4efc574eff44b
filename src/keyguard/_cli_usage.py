"""``keyguard usage`` and ``keyguard errors``: what a key did, read from the usage store.

Kept apart from :mod:`keyguard.cli` (which owns parsing, settings and exit codes) so
the shapes printed here live in one place. Nothing here can print a secret: usage
rows and error entries hold key ids, route templates and fixed messages only.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from . import _cli_output as out
from .backends.registry import open_rate_store
from .clock import from_timestamp
from .configure import limiter_url_for, quota_url_for
from .limiting import LimitPolicy, LimitState
from .records import KeyRecord
from .settings import KeyGuardSettings
from .usage.histogram import percentile
from .usage.live import limit_dict, policies_for
from .usage.records import ErrorEntry, UsageCounts
from .usage.summary import UsageQuery, UsageReader, UsageSummary

__all__ = ["errors_text", "show_errors", "show_usage", "sparkline", "usage_text"]

_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[int]) -> str:
    """A one-line chart: a block per value, scaled to the largest; a space for zero."""
    top = max(values, default=0)
    if top <= 0:
        return " " * len(values)
    return "".join(" " if v <= 0 else _BARS[min(7, (v * 8 - 1) // top)] for v in values)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _when(epoch: float) -> str:
    return from_timestamp(epoch).strftime("%Y-%m-%d %H:%M")


def _counts_lines(counts: UsageCounts) -> list[str]:
    share = f" ({counts.errors / counts.requests:.1%})" if counts.requests else ""
    lines = [
        f"  requests {counts.requests:,}   errors {counts.errors:,}{share}   "
        f"denied {counts.denied:,}   units {counts.units:,}",
        "  latency  p50 {}   p95 {}   p99 {}".format(
            *(_ms(percentile(counts.latency, p)) for p in (0.5, 0.95, 0.99))
        ),
    ]
    if counts.statuses:
        lines.append(
            "  statuses " + "  ".join(f"{k} {v:,}" for k, v in sorted(counts.statuses.items()))
        )
    if counts.reasons:
        lines.append(
            "  refused  " + "  ".join(f"{k} {v:,}" for k, v in sorted(counts.reasons.items()))
        )
    return lines


def usage_text(
    record: KeyRecord, summary: UsageSummary, limits: Sequence[LimitState], now: float
) -> str:
    """The summary for people: totals, a chart per service, and the limits now."""
    points = summary.series["*"]
    lines = [
        f"Usage of {record.id} ({record.name}), {_when(summary.since)} to "
        f"{_when(summary.until)} UTC, per {summary.granularity}",
        *_counts_lines(summary.total),
        f"  trend    {sparkline([p.counts.requests for p in points])}"
        f"  (max {max((p.counts.requests for p in points), default=0):,} a {summary.granularity})",
    ]
    services = {k: v for k, v in summary.series.items() if k != "*"}
    if services:
        width = max(len(name or "(none)") for name in services)
        lines.append("  by service:")
        for name, series in sorted(services.items()):
            total = sum(p.counts.requests for p in series)
            chart = sparkline([p.counts.requests for p in series])
            lines.append(f"    {(name or '(none)'):<{width}}  {total:>8,}  {chart}")
    if limits:
        lines.append("Limits now:")
        for state in limits:
            shown = limit_dict(state, now)
            lines.append(
                f"  {state.name:<12} {shown['used']:,}/{state.limit:,} used, "
                f"resets in {max(0.0, state.reset_after):.0f} s"
            )
    return "\n".join(lines)


def errors_text(entries: Sequence[ErrorEntry]) -> str:
    if not entries:
        return "No errors recorded."
    rows = [("TIME (UTC)", "STATUS", "CODE", "METHOD", "ROUTE", "REQUEST ID", "MESSAGE")]
    rows += [
        (
            from_timestamp(e.at).strftime("%Y-%m-%d %H:%M:%S"),
            str(e.status),
            e.code,
            e.method,
            e.route[:40],
            e.request_id,
            e.message,
        )
        for e in entries
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in rows
    )


IN_SERVER = "windows and the concurrency cap are counted in the server process's memory"


def _limits(settings: KeyGuardSettings, record: KeyRecord) -> tuple[tuple[LimitState, ...], bool]:
    """The key's limits this process can read, and whether others live in a server's
    memory (then only the quotas are read, from the file that keeps them)."""
    url, quota_url = limiter_url_for(settings), quota_url_for(settings)
    elsewhere = url.startswith("memory:")
    if quota_url.startswith("memory:"):
        return (), elsewhere  # another process's memory: nothing to read from here
    limiter = open_rate_store(quota_url, **settings.backend_options(quota_url))
    try:
        found: dict[str, LimitState] = {}
        for full in policies_for(record, settings.plan_table(), None, settings.default_plan):
            policy = LimitPolicy(quotas=full.quotas) if elsewhere else full
            if not policy.is_empty():
                for state in limiter.peek(record.id, policy):
                    found.setdefault(state.name, state)
        return tuple(found.values()), elsewhere
    finally:
        limiter.close()


def show_usage(
    args: argparse.Namespace,
    settings: KeyGuardSettings,
    record: KeyRecord,
    now: datetime,
    *,
    as_json: bool,
) -> None:
    store = settings.open_usage_store()
    try:
        reader = UsageReader(store)
        summary = reader.summary(
            UsageQuery(
                key_id=record.id,
                since=args.since,
                until=args.until,
                granularity=args.granularity,
                by_service=args.by == "service",
            )
        )
    finally:
        store.close()
    limits, elsewhere = _limits(settings, record)
    stamp = now.timestamp()
    if as_json:
        document: dict[str, Any] = {"key_id": record.id, **summary.to_dict()}
        document["limits"] = [limit_dict(s, stamp) for s in limits]
        if elsewhere:
            document["limits_note"] = IN_SERVER
        out.emit_json(document)
    else:
        text = usage_text(record, summary, limits, stamp)
        out.emit(f"{text}\n  ({IN_SERVER}; not shown)" if elsewhere else text)


def show_errors(
    args: argparse.Namespace, settings: KeyGuardSettings, record: KeyRecord, *, as_json: bool
) -> None:
    store = settings.open_usage_store()
    try:
        entries = UsageReader(store).errors(record.id, limit=args.limit)
    finally:
        store.close()
    if as_json:
        out.emit_json([e.to_dict() for e in entries])
    else:
        out.emit(errors_text(entries))
