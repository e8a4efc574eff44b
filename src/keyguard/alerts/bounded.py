"""A dict that forgets its least recently used entries: the memory bound of every
per-key alert state, so a flood of new keys or addresses cannot grow the process."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ["Bounded"]

K = TypeVar("K")
V = TypeVar("V")


class Bounded(Generic[K, V]):
    """At most ``cap`` entries; reading or writing one makes it the newest.

    Not thread-safe: its owners hold their own lock.
    """

    __slots__ = ("_data", "cap")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._data: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.cap:
            self._data.popitem(last=False)

    def pop(self, key: K) -> None:
        self._data.pop(key, None)

    def values(self) -> list[V]:
        return list(self._data.values())
