"""Requests for more quota: made by a key, decided by an admin.

Kept in this process (bounded, oldest decided requests dropped first): a request is
a conversation between a tenant and an admin, and the decision itself is stored
where it matters, in the key's limits.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Literal

from keyguard import LimitOverrides

__all__ = ["QuotaBook", "QuotaRequest"]

Status = Literal["pending", "approved", "declined"]


@dataclass(frozen=True, slots=True)
class QuotaRequest:
    id: str
    key_id: str
    tenant: str
    limits: LimitOverrides
    reason: str
    created_at: datetime
    status: Status = "pending"
    decided_at: datetime | None = None
    decided_by: str | None = None
    note: str | None = None


class QuotaBook:
    """Quota requests by id, newest last."""

    def __init__(self, *, max_requests: int = 10_000) -> None:
        self._items: OrderedDict[str, QuotaRequest] = OrderedDict()
        self.max_requests = max_requests

    def add(self, key_id: str, tenant: str, limits: LimitOverrides, reason: str) -> QuotaRequest:
        request = QuotaRequest(
            "qr_" + secrets.token_hex(10), key_id, tenant, limits, reason, datetime.now(UTC)
        )
        self._items[request.id] = request
        if len(self._items) > self.max_requests:
            decided = next((k for k, v in self._items.items() if v.status != "pending"), None)
            self._items.pop(decided if decided is not None else next(iter(self._items)))
        return request

    def get(self, request_id: str) -> QuotaRequest | None:
        return self._items.get(request_id)

    def list(self, tenant: str | None) -> list[QuotaRequest]:
        """Every request (``tenant=None``, for an admin) or one tenant's."""
        return [r for r in self._items.values() if tenant is None or r.tenant == tenant]

    def decide(
        self, request: QuotaRequest, status: Status, by: str, note: str | None
    ) -> QuotaRequest:
        decided = replace(
            request, status=status, decided_at=datetime.now(UTC), decided_by=by, note=note
        )
        self._items[request.id] = decided
        return decided
