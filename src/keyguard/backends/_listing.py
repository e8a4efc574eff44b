"""Listing rules shared by backends that filter in Python."""

from __future__ import annotations

from collections.abc import Iterable

from ..records import KeyPage, KeyQuery, KeyRecord

__all__ = ["matches", "page_of"]


def matches(record: KeyRecord, query: KeyQuery) -> bool:
    """Whether ``record`` passes the query's filters (not its cursor)."""
    if query.owner is not None and record.owner != query.owner:
        return False
    if query.plan is not None and record.plan != query.plan:
        return False
    if query.status is not None and query.now is not None:
        return record.status(query.now) is query.status
    return True


def page_of(sorted_records: Iterable[KeyRecord], query: KeyQuery) -> KeyPage:
    """The page ``query`` asks for, from records sorted by id."""
    items: list[KeyRecord] = []
    for record in sorted_records:
        if query.after is not None and record.id <= query.after:
            continue
        if not matches(record, query):
            continue
        if len(items) == query.limit:
            return KeyPage(tuple(items), items[-1].id)
        items.append(record)
    return KeyPage(tuple(items), None)
