"""Usage monitoring: what each key did, per service and minute, and its error log.

Record with a :class:`UsageRecorder` passed to the guard (``Guard(usage=...)``, or
``KEYGUARD_USAGE_ENABLED`` through :func:`~keyguard.configure.build_guard`); read
with a :class:`UsageReader`. See ``docs/usage.md``.
"""

from .recorder import Retention, UsageRecorder
from .records import ErrorEntry, Granularity, UsageCounts, UsageEvent, UsageRow
from .store import AsyncUsageStore, UsageBackend, UsageStore
from .summary import UsageQuery, UsageReader, UsageSummary

__all__ = [
    "AsyncUsageStore",
    "ErrorEntry",
    "Granularity",
    "Retention",
    "UsageBackend",
    "UsageCounts",
    "UsageEvent",
    "UsageQuery",
    "UsageReader",
    "UsageRecorder",
    "UsageRow",
    "UsageStore",
    "UsageSummary",
]
