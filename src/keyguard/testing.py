"""Helpers for testing apps that use keyguard: a fake clock and ready-made managers."""

from __future__ import annotations

from datetime import datetime, timedelta

from .backends.memory import MemoryKeyStore
from .clock import from_timestamp
from .manager import AsyncKeyManager, KeyManager

__all__ = ["FakeClock", "memory_manager"]


class FakeClock:
    """A clock that moves only when told to; wall and monotonic time move together.

    :param start: the initial wall time, as a timestamp or an aware datetime.
    """

    def __init__(self, start: float | datetime = 1_800_000_000.0) -> None:
        self._now = start.timestamp() if isinstance(start, datetime) else float(start)
        self._mono = 1_000.0

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def datetime(self) -> datetime:
        return from_timestamp(self._now)

    def advance(self, by: float | timedelta) -> None:
        """Move both clocks forward."""
        seconds = by.total_seconds() if isinstance(by, timedelta) else float(by)
        if seconds < 0:
            raise ValueError("a FakeClock only moves forward; use set_wall() to step it")
        self._now += seconds
        self._mono += seconds

    def set_wall(self, timestamp: float) -> None:
        """Step the wall clock alone, as an NTP correction would."""
        self._now = timestamp


def memory_manager(clock: FakeClock | None = None) -> tuple[KeyManager, AsyncKeyManager]:
    """A sync and an async manager over one shared in-memory store."""
    store = MemoryKeyStore()
    kwargs = {} if clock is None else {"clock": clock}
    return KeyManager(store, **kwargs), AsyncKeyManager(store, **kwargs)
