"""The Redis key store's data layout, its Lua scripts, and how calls are encoded.

Every key of one store carries the hash tag ``{<prefix>}``, so on a Cluster the whole
store lives in one slot. That is what lets each write be one Lua script (record,
digest index, id index, audit trail and the invalidation message, all or nothing) and
each lookup one round trip. A key store is small (a record is about 1 KB; a million
keys fit one node) and is read through a local cache, so one slot costs little; the
alternative, a slot per key, would need a cross-slot index that no single script can
keep consistent. (Rate-limit counters are the opposite case and spread per key.)

Layout, with ``P = {prefix}``::

    P:key:<id>         hash   record = storage JSON, digests = JSON list of its digests
    P:digest:<digest>  string the id; previous digests expire with their grace period
    P:ids              zset   every id at score 0, ordered lexicographically (ids sort
                              by creation time), for cursor listing
    P:audit            list   audit events as JSON, newest first, capped (LPUSH+LTRIM)
    P:invalidate       pub/sub channel: JSON ``[origin, id, digest, ...]`` after each
                              write (origin: the writing store instance, which has
                              evicted its own cache already and skips the message)

The scripts reach ``P:key:<id>`` and ``P:digest:<d>`` keys they compute themselves:
they are in the store's slot by construction, which Redis allows.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, Generic, TypeAlias, TypeVar

from redis.commands.core import AsyncScript, Script

from ..clock import Clock
from ..codec import audit_to_dict, record_from_storage, storage_dict
from ..errors import StorageError
from ..records import AuditEvent, KeyPage, KeyQuery, KeyRecord
from ._listing import matches

__all__ = ["DIGEST_TAKEN", "Calls", "Scripts", "adrive", "drive", "page_flow", "stored"]

DIGEST_TAKEN = "KEYGUARD_DIGEST_TAKEN"
S = TypeVar("S", Script, AsyncScript)
T = TypeVar("T")
# What a script call sends: its keys, and its arguments.
Call: TypeAlias = tuple[Sequence[str], Sequence[str | int]]
# Listing reads this many ids per round trip (fewer when a page needs fewer).
_CHUNK = 256


# KEYS[1] the digest's index key; ARGV[1] the record key prefix.
# One round trip: the id and then the record, read atomically.
FIND = """
local id = redis.call('GET', KEYS[1])
if not id then return false end
return redis.call('HGET', ARGV[1] .. id, 'record')
"""

# KEYS: record, ids, audit, then one index key per digest of the record.
# ARGV: id, record JSON, digests JSON, audit JSON, audit cap, channel, digest key
#       prefix, origin, then per digest its TTL in ms (-1: none, 0: past its grace, not
#       indexed).
# Refuses (before writing anything) when a digest belongs to another key. Returns the
# invalidation message: the id, the digests the key had and the digests it has now.
SAVE = """
local id = ARGV[1]
local n = #KEYS - 3
for i = 1, n do
  if tonumber(ARGV[8 + i]) ~= 0 then
    local holder = redis.call('GET', KEYS[3 + i])
    if holder and holder ~= id then
      return redis.error_reply('KEYGUARD_DIGEST_TAKEN')
    end
  end
end
local changed = {ARGV[8], id}
local old = redis.call('HGET', KEYS[1], 'digests')
if old then
  for _, d in ipairs(cjson.decode(old)) do
    local key = ARGV[7] .. d
    if redis.call('GET', key) == id then redis.call('DEL', key) end
    changed[#changed + 1] = d
  end
end
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'digests', ARGV[3])
for i, d in ipairs(cjson.decode(ARGV[3])) do
  local ttl = tonumber(ARGV[8 + i])
  if ttl < 0 then
    redis.call('SET', KEYS[3 + i], id)
  elseif ttl > 0 then
    redis.call('SET', KEYS[3 + i], id, 'PX', ttl)
  end
  changed[#changed + 1] = d
end
redis.call('ZADD', KEYS[2], 0, id)
redis.call('LPUSH', KEYS[3], ARGV[4])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[5]) - 1)
local message = cjson.encode(changed)
redis.call('PUBLISH', ARGV[6], message)
return message
"""

# KEYS: record, ids, audit.
# ARGV: id, audit JSON, audit cap, channel, digest key prefix, origin.
# Returns nil (and writes nothing) for an unknown id, else the invalidation message.
DELETE = """
local id = ARGV[1]
local digests = redis.call('HGET', KEYS[1], 'digests')
if not digests then return false end
local changed = {ARGV[6], id}
for _, d in ipairs(cjson.decode(digests)) do
  local key = ARGV[5] .. d
  if redis.call('GET', key) == id then redis.call('DEL', key) end
  changed[#changed + 1] = d
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], id)
redis.call('LPUSH', KEYS[3], ARGV[2])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[3]) - 1)
local message = cjson.encode(changed)
redis.call('PUBLISH', ARGV[4], message)
return message
"""

# KEYS[1] ids. ARGV: lexicographic start ('-' or '(<id>'), count, record key prefix.
# Returns id, record JSON pairs (an empty string for a record that vanished).
PAGE = """
local ids = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], '+', 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', ARGV[3] .. id, 'record') or ''
end
return out
"""

# KEYS[1] audit. ARGV: the JSON prefix every event of the key starts with, how many.
# Scans the capped list server-side in one atomic call (bounded by the cap), comparing
# a prefix only: events are written with their key id first, so nothing is decoded.
AUDIT_FOR_KEY = """
local want = tonumber(ARGV[2])
local out = {}
local total = redis.call('LLEN', KEYS[1])
for start = 0, total - 1, 512 do
  for _, event in ipairs(redis.call('LRANGE', KEYS[1], start, start + 511)) do
    if string.sub(event, 1, #ARGV[1]) == ARGV[1] then
      out[#out + 1] = event
      if #out >= want then return out end
    end
  end
end
return out
"""


class Scripts(Generic[S]):
    """The scripts registered on one client (redis-py reloads them after NOSCRIPT)."""

    __slots__ = ("audit", "delete", "find", "page", "save")

    def __init__(self, register: Callable[[str], S]) -> None:
        self.find: S = register(FIND)
        self.save: S = register(SAVE)
        self.delete: S = register(DELETE)
        self.page: S = register(PAGE)
        self.audit: S = register(AUDIT_FOR_KEY)


class Calls:
    """The keys and arguments of each call, for one store; both faces send these.

    :param prefix: the store's namespace and hash tag (validated by the store).
    :param clock: turns the end of a grace period into a TTL.
    """

    __slots__ = ("audit", "audit_size", "channel", "clock", "digest", "ids", "origin", "record")

    def __init__(self, prefix: str, clock: Clock, audit_size: int) -> None:
        self.origin = secrets.token_hex(8)  # names this store instance in its messages
        base = "{" + prefix + "}"
        self.record = base + ":key:"
        self.digest = base + ":digest:"
        self.ids = base + ":ids"
        self.audit = base + ":audit"
        self.channel = base + ":invalidate"
        self.clock = clock
        self.audit_size = audit_size

    def find(self, digest: str) -> Call:
        return [self.digest + digest], [self.record]

    def save(self, record: KeyRecord, event: AuditEvent) -> Call:
        now = self.clock.now()
        ttls: list[int] = []
        for d in record.digests:
            if d.valid_until is None:
                ttls.append(-1)
            else:  # a previous secret past its grace (0) is not indexed at all
                ttls.append(max(0, math.ceil((d.valid_until.timestamp() - now) * 1000)))
        keys = [self.record + record.id, self.ids, self.audit]
        keys += [self.digest + d.digest for d in record.digests]
        data = json.dumps(storage_dict(record), separators=(",", ":"))
        digests = json.dumps([d.digest for d in record.digests])
        args: list[str | int] = [
            record.id,
            data,
            digests,
            self._event(event),
            self.audit_size,
            self.channel,
        ]
        return keys, [*args, self.digest, self.origin, *ttls]

    def delete(self, key_id: str, event: AuditEvent) -> Call:
        keys = [self.record + key_id, self.ids, self.audit]
        args: list[str | int] = [
            key_id,
            self._event(event),
            self.audit_size,
            self.channel,
            self.digest,
        ]
        return keys, [*args, self.origin]

    def page(self, start: str, count: int) -> Call:
        return [self.ids], [start, count, self.record]

    def audit_of(self, key_id: str, limit: int) -> Call:
        prefix = json.dumps({"key_id": key_id}, separators=(",", ":"))[:-1] + ","
        return [self.audit], [prefix, limit]

    @staticmethod
    def _event(event: AuditEvent) -> str:
        """The key id first, so that a key's events are told apart by a prefix alone."""
        data = audit_to_dict(event)
        return json.dumps({"key_id": data.pop("key_id"), **data}, separators=(",", ":"))


def stored(data: object, what: str) -> Any:  # noqa: ANN401 - whatever JSON the store holds
    """Stored JSON, decoded; anything unreadable means the stored value is damaged."""
    try:
        return json.loads(data) if isinstance(data, bytes | str) else None
    except (ValueError, RecursionError) as exc:
        raise StorageError(f"a stored {what} is damaged") from exc


def record_of(data: object) -> KeyRecord:
    value = stored(data, "key record")
    if not isinstance(value, dict):
        raise StorageError("a stored key record is damaged")
    return record_from_storage(value)


def page_flow(query: KeyQuery, scan_limit: int) -> Generator[tuple[str, int], list[Any], KeyPage]:
    """A listing, written once: yields ``(start, count)``, receives id/record pairs.

    Filters run here, on the records each round trip brings, and one page reads at
    most ``scan_limit`` records: with a selective filter over a large store a page can
    come back short (even empty) with the last id read as its cursor. A listing is
    complete only when the cursor is ``None``.
    """
    items: list[KeyRecord] = []
    cursor, scanned = query.after, 0
    while True:
        count = min(max(query.limit + 1 - len(items), _CHUNK), scan_limit - scanned)
        rows = yield ("-" if cursor is None else "(" + cursor, count)
        for i in range(0, len(rows) - 1, 2):
            scanned += 1
            raw_id = rows[i]
            cursor = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            if not rows[i + 1]:
                continue  # deleted between the two reads of a page
            record = record_of(rows[i + 1])
            if matches(record, query):
                if len(items) == query.limit:
                    return KeyPage(tuple(items), items[-1].id)
                items.append(record)
        if len(rows) < 2 * count:
            return KeyPage(tuple(items), None)
        if scanned >= scan_limit:
            return KeyPage(tuple(items), cursor)


def drive(flow: Generator[tuple[str, int], list[Any], T], fetch: Callable[[str, int], Any]) -> T:
    """Run ``flow`` with blocking fetches."""
    try:
        request = next(flow)
        while True:
            request = flow.send(list(fetch(*request)))
    except StopIteration as stop:
        result: T = stop.value
        return result


async def adrive(
    flow: Generator[tuple[str, int], list[Any], T], fetch: Callable[[str, int], Awaitable[Any]]
) -> T:
    """Run ``flow`` with awaited fetches."""
    try:
        request = next(flow)
        while True:
            request = flow.send(list(await fetch(*request)))
    except StopIteration as stop:
        result: T = stop.value
        return result
