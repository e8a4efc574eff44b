"""One test's world: a fake clock, in-memory stores, and guards built on them."""

from __future__ import annotations

from dataclasses import dataclass, field

from keyguard.backends.memory import MemoryKeyStore
from keyguard.backends.memory_limiter import MemoryRateStore
from keyguard.backends.memory_usage import MemoryUsageStore
from keyguard.guard import Guard
from keyguard.limiting import LimitKind, LimitState
from keyguard.manager import KeyManager
from keyguard.plans import Plan, resolve_policy
from keyguard.records import LimitOverrides
from keyguard.scopes import RouteMap, RouteRule
from keyguard.testing import FakeClock
from keyguard.usage.recorder import UsageRecorder

PLAN = Plan("test", rate="5/second", concurrency=2)  # waits under 10 s: no Retry-After jitter
PUBLIC = ("/health", "/openapi.json", "/docs")
RULES = (
    RouteRule("POST", "/v1/generate", "text:generate"),
    RouteRule("GET", "/v1/images", "image:create"),
)


@dataclass
class World:
    """One test's shared state: a clock, the stores, and what the handlers saw."""

    plan: Plan = PLAN
    auth_failures: int = 20
    clock: FakeClock = field(default_factory=FakeClock)
    keys: MemoryKeyStore = field(default_factory=MemoryKeyStore)
    calls: list[str] = field(default_factory=list)
    usage: UsageRecorder | None = None

    def __post_init__(self) -> None:
        self.limiter = MemoryRateStore(clock=self.clock)
        self.manager = KeyManager(self.keys, clock=self.clock)

    def record_usage(self) -> MemoryUsageStore:
        """Record usage from now on, in memory, timed by the world's clock."""
        store = MemoryUsageStore()
        self.usage = UsageRecorder(store, clock=self.clock)
        return store

    def guard(self, *, declared: bool) -> Guard:
        """A guard on the shared stores; ``declared`` leaves route scopes to the app."""
        return Guard(
            keys=self.keys,
            limiter=self.limiter,
            routes=RouteMap(() if declared else RULES, public=PUBLIC),
            plans={self.plan.name: self.plan},
            clock=self.clock,
            auth_failures=self.auth_failures,
            usage=self.usage,
        )

    def key(self, *scopes: str) -> tuple[str, str]:
        """A new key on the world's plan: ``(secret, key id)``."""
        issued = self.manager.create("test key", scopes=scopes, plan=self.plan.name)
        return issued.key.reveal(), issued.record.id

    def limits(self, key_id: str) -> tuple[LimitState, ...]:
        """The key's limit state, read without charging anything."""
        policy = resolve_policy(self.plan, LimitOverrides())
        return tuple(self.limiter.peek(key_id, policy))

    def in_flight(self, key_id: str) -> int:
        """Concurrency slots the key holds now."""
        slots = [s for s in self.limits(key_id) if s.kind is LimitKind.CONCURRENCY]
        return sum(s.limit - s.remaining for s in slots)

    def close(self) -> None:
        if self.usage is not None:
            self.usage.close()
        self.limiter.close()
        self.keys.close()
