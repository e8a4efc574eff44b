"""Time as an injected dependency, so expiry and windows are tested without sleeping."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["Clock", "SystemClock", "from_timestamp", "utcnow"]


class Clock(Protocol):
    """Where keyguard reads the time: wall time for records, monotonic for windows."""

    def now(self) -> float:
        """Seconds since the epoch (UTC wall clock)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never steps backwards."""
        ...


class SystemClock:
    """The real clocks."""

    __slots__ = ()

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


def from_timestamp(ts: float) -> datetime:
    """An aware UTC datetime for a timestamp."""
    return datetime.fromtimestamp(ts, UTC)


def utcnow(clock: Clock) -> datetime:
    """The clock's wall time as an aware UTC datetime."""
    return from_timestamp(clock.now())
