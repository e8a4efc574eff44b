"""The limits-library adapter: what its non-atomic design must still never do."""

from __future__ import annotations

from typing import Any

import pytest
from limits.errors import StorageError as LimitsStorageError

from keyguard.backends.limits_storage import LimitsRateStore
from keyguard.errors import StorageError
from keyguard.limiting import HitRequest, LimitPolicy, Window


def test_t85_storage_failure_after_taking_a_slot_gives_it_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A storage that fails while charging leaves no concurrency slot taken."""
    store = LimitsRateStore.from_url("memory://")
    policy = LimitPolicy(windows=(Window("minute", 100, 60),), concurrency=2)
    broken = store._limiter

    def fail(*args: Any, **kwargs: Any) -> bool:
        raise LimitsStorageError(RuntimeError("down"))

    monkeypatch.setattr(broken, "hit", fail)
    for lease in ("a", "b"):
        with pytest.raises(StorageError):
            store.hit(HitRequest("k", policy, lease=lease))
    monkeypatch.undo()
    assert store.hit(HitRequest("k", policy, lease="c")).allowed
    store.close()
