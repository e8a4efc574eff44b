"""The admin API's routers, in one list: adding a resource (usage, error logs) is
one more module and one more entry here."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter

from ..context import Context
from . import alerts, keys, plans, quota_requests, usage, whoami

__all__ = ["ROUTERS"]

ROUTERS: tuple[Callable[[Context], APIRouter], ...] = (
    keys.router,
    plans.router,
    quota_requests.router,
    usage.router,
    whoami.router,
    alerts.router,
)
