"""Helpers for testing apps that use keyguard: a fake clock, in-memory guards, keys.

.. code-block:: python

    from keyguard.testing import FakeClock, memory_guard

    clock = FakeClock()
    guard, manager = memory_guard(clock=clock)
    key = manager.create("test", scopes=["text:generate"]).key.reveal()
    app.add_middleware(KeyGuardMiddleware, guard=guard)
    ...
    clock.advance(60)   # the next minute window, without sleeping
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from .backends.memory import MemoryKeyStore
from .backends.memory_limiter import MemoryRateStore
from .clock import from_timestamp
from .guard import Guard
from .manager import AsyncKeyManager, KeyManager
from .plans import Plan
from .scopes import RouteMap

__all__ = ["FakeClock", "memory_guard", "memory_manager"]


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


def memory_guard(
    *,
    clock: FakeClock | None = None,
    routes: RouteMap | None = None,
    plans: Mapping[str, Plan] | None = None,
    public: Sequence[str] = (),
    **options: Any,
) -> tuple[Guard, KeyManager]:
    """A guard on in-memory stores and the manager that mints keys for it.

    Everything shares ``clock``, so a test moves through windows, expiry and grace
    periods with ``clock.advance`` instead of sleeping.
    """
    store = MemoryKeyStore()
    kwargs: dict[str, Any] = {} if clock is None else {"clock": clock}
    if routes is None and public:
        routes = RouteMap((), public=public)
    if plans is not None:
        options["plans"] = plans
    guard = Guard(keys=store, limiter=MemoryRateStore(**kwargs), routes=routes, **kwargs, **options)
    return guard, KeyManager(store, **kwargs)
