"""The usage rules: quota thresholds, error-rate spikes, new addresses, bursts.

Each watch reads :class:`~keyguard.usage.records.UsageEvent` values in the order the
recorder drains them, keeps a little state per key in a :class:`Bounded` map, and
returns the alerts to send. Time is the events' own ``at``, so rules replay exactly
under a fake clock. State lives in this process only (see ``docs/alerts.md``).
Callers serialise calls (one lock in :class:`~keyguard.alerts.Alerts`).
"""

from __future__ import annotations

import ipaddress
import math
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache

from ..clock import from_timestamp
from ..limiting import LimitKind
from ..records import JSON
from ..usage.records import UsageEvent
from .bounded import Bounded
from .config import BurstRule, ErrorRateRule, NewIPRule
from .model import Alert, AlertKind

__all__ = ["BurstWatch", "ErrorRateWatch", "NewIPWatch", "QuotaWatch", "iso"]

DAY = 86400
_QUOTA = LimitKind.QUOTA


def iso(ts: float) -> str:
    """A timestamp as ISO 8601 UTC with a ``Z``, as every alert shows times."""
    return from_timestamp(ts).isoformat().replace("+00:00", "Z")


def _alert(kind: AlertKind, event: UsageEvent, **details: JSON) -> Alert:
    return Alert(kind, event.key_id, event.owner, event.at, details)


class QuotaWatch:
    """Fires the highest threshold a quota's used share has reached, at most once per
    key, quota and period.

    A quota's period is identified by its end (``at + reset_after``, a UTC midnight):
    a new period starts afresh, and an event of an older period arriving late is
    ignored — so no order of events can fire a threshold twice in one period. When a
    jump crosses several thresholds at once, only the highest is sent.
    """

    def __init__(self, max_keys: int) -> None:
        self._fired: Bounded[str, dict[tuple[str, bool], tuple[int, float]]] = Bounded(max_keys)

    def observe(self, event: UsageEvent, thresholds: tuple[float, ...]) -> list[Alert]:
        alerts: list[Alert] = []
        for state in event.limits:
            if state.kind is not _QUOTA or state.limit <= 0:
                continue
            used = state.limit - state.remaining
            share = used / state.limit
            top = max((t for t in thresholds if share >= t), default=None)
            if top is None:
                continue
            monthly = (state.window_seconds or 0) > DAY
            end = round((event.at + state.reset_after) / DAY) * DAY
            fired = self._fired.get(event.key_id)
            if fired is None:
                fired = {}
                self._fired.put(event.key_id, fired)
            slot = (state.name, monthly)
            seen = fired.get(slot)
            if seen is not None and (end < seen[0] or (end == seen[0] and top <= seen[1])):
                continue
            fired[slot] = (end, top)
            alerts.append(
                _alert(
                    AlertKind.QUOTA,
                    event,
                    quota=state.name,
                    period="month" if monthly else "day",
                    threshold=top,
                    used=used,
                    limit=state.limit,
                    share=round(share, 4),
                    resets_at=iso(end),
                )
            )
        return alerts

    def forget(self, key_id: str) -> None:
        self._fired.pop(key_id)


@dataclass(slots=True)
class _Errors:
    step: float
    buckets: deque[list[int]] = field(default_factory=deque)  # [index, requests, errors]
    requests: int = 0
    errors: int = 0
    fired_at: float = -math.inf


_BUCKETS = 10


class ErrorRateWatch:
    """Fires when a key's share of failed requests over a sliding window (ten
    buckets) reaches the rule's share, with enough requests, once per cool-down."""

    def __init__(self, max_keys: int) -> None:
        self._keys: Bounded[str, _Errors] = Bounded(max_keys)

    def observe(self, event: UsageEvent, rule: ErrorRateRule) -> list[Alert]:
        step = rule.window / _BUCKETS
        state = self._keys.get(event.key_id)
        if state is None or state.step != step:
            state = _Errors(step)
            self._keys.put(event.key_id, state)
        index = int(event.at // step)
        failed = int(event.status >= 400 or event.reason is not None)
        buckets = state.buckets
        if buckets and buckets[-1][0] >= index:
            buckets[-1][1] += 1  # a late event counts in the newest bucket
            buckets[-1][2] += failed
        else:
            buckets.append([index, 1, failed])
        state.requests += 1
        state.errors += failed
        while buckets[0][0] <= buckets[-1][0] - _BUCKETS:
            _, requests, errors = buckets.popleft()
            state.requests -= requests
            state.errors -= errors
        share = state.errors / state.requests
        if (
            failed
            and state.requests >= rule.min_requests
            and share >= rule.share
            and event.at - state.fired_at >= rule.cooldown
        ):
            state.fired_at = event.at
            return [
                _alert(
                    AlertKind.ERROR_RATE,
                    event,
                    window_seconds=rule.window,
                    requests=state.requests,
                    errors=state.errors,
                    share=round(share, 4),
                    threshold=rule.share,
                )
            ]
        return []

    def forget(self, key_id: str) -> None:
        self._keys.pop(key_id)


@lru_cache(maxsize=4096)
def _compared(text: str, ipv6_prefix: int) -> str:
    """The form an address is compared in: IPv4 as written, IPv6 as its network.

    Remembered: parsing was most of what a usage event cost the alert rules, and a
    key's callers come from a few addresses (the cache is bounded all the same).
    """
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


@dataclass(slots=True)
class _Addresses:
    seen: Bounded[str, bool]
    muted_until: float = -math.inf


class NewIPWatch:
    """Fires when a key calls from an address not among the last ``ips_per_key`` it
    was seen using; IPv6 addresses are compared by their ``/ipv6_prefix`` network."""

    def __init__(self, max_keys: int, ips_per_key: int, ipv6_prefix: int) -> None:
        self._keys: Bounded[str, _Addresses] = Bounded(max_keys)
        self.ips_per_key = ips_per_key
        self.ipv6_prefix = ipv6_prefix

    def observe(self, event: UsageEvent, rule: NewIPRule) -> list[Alert]:
        if event.client_ip is None:
            return []
        address = _compared(event.client_ip, self.ipv6_prefix)
        state = self._keys.get(event.key_id)
        if state is None:
            state = _Addresses(Bounded(self.ips_per_key))
            state.seen.put(address, True)  # the first address: nothing to compare with
            self._keys.put(event.key_id, state)
            return []
        if state.seen.get(address) is not None or event.at < state.muted_until:
            return []
        known = len(state.seen)
        state.seen.put(address, True)
        state.muted_until = event.at + rule.cooldown
        return [_alert(AlertKind.NEW_IP, event, client_ip=event.client_ip, known_addresses=known)]

    def forget(self, key_id: str) -> None:
        self._keys.pop(key_id)


_STEP = 10.0
_PER_MINUTE = 6


@dataclass(slots=True)
class _Pace:
    first: float
    index: int
    counts: deque[int]
    average: float = 0.0  # requests per step, moving average of completed steps
    fired_at: float = -math.inf


class BurstWatch:
    """Fires when a key's requests in the last minute (six ten-second steps) exceed
    ``factor`` times its usual rate and the floor, once per cool-down.

    The usual rate is an exponential moving average over completed steps, idle steps
    counting as zero, with the rule's ``average`` as time constant.
    """

    def __init__(self, max_keys: int) -> None:
        self._keys: Bounded[str, _Pace] = Bounded(max_keys)

    def observe(self, event: UsageEvent, rule: BurstRule) -> list[Alert]:
        index = int(event.at // _STEP)
        state = self._keys.get(event.key_id)
        if state is None:
            state = _Pace(event.at, index, deque([0], maxlen=_PER_MINUTE))
            self._keys.put(event.key_id, state)
        if index > state.index:
            gap = index - state.index
            alpha = 1.0 - math.exp(-_STEP / rule.average)
            state.average += alpha * (state.counts[-1] - state.average)
            state.average *= (1.0 - alpha) ** (gap - 1)
            state.counts.extend([0] * min(gap, _PER_MINUTE))
            state.index = index
        state.counts[-1] += 1
        last_minute = sum(state.counts)
        usual = state.average * _PER_MINUTE
        if (
            event.at - state.first >= rule.warmup
            and last_minute >= rule.floor
            and last_minute > rule.factor * usual
            and event.at - state.fired_at >= rule.cooldown
        ):
            state.fired_at = event.at
            return [
                _alert(
                    AlertKind.BURST,
                    event,
                    requests_last_minute=last_minute,
                    usual_per_minute=round(usual, 2),
                    factor=rule.factor,
                )
            ]
        return []

    def forget(self, key_id: str) -> None:
        self._keys.pop(key_id)
