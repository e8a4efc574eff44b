"""The decision core: from a request to Allow or a Denial, with no framework in sight.

:class:`Guard` holds the configuration (validated once, here) and runs the checks in
order — public path, client address, brute-force limiter, credential, key lookup,
expiry and revocation, IP allow-list, scope, limits — as one flow written once and
driven by a sync or an async driver (:mod:`keyguard.flows`). Only two operations
touch storage: the key lookup and the single atomic limiter call.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any, Literal, TypeAlias

from ._guard_ops import Backends, FindKey, GetKey, Hit
from ._guard_settle import RETRY_WHEN_DOWN, Settlements
from ._guard_support import (
    allowed,
    in_process,
    internal_error,
    ip_text,
    is_preflight,
    queues_releases,
    refusal,
    telemetry_for,
    threaded,
)
from ._guard_usage import UsageReports
from .backends.memory_limiter import MemoryRateStore
from .backends.protocols import KeyBackend
from .clock import Clock, SystemClock, utcnow
from .codec import isoformat
from .credentials import Credential, CredentialConfig, MalformedCredential, extract_credential
from .decisions import Allow, Charge, Decision, Headers, Identity, Lease, allow_of, identity_of
from .denials import Denial, deny
from .errors import ConfigurationError, InvalidCredential, StorageError
from .flows import Op, run_async, run_hybrid, run_sync
from .iprules import IPAddress, IPDenyList
from .keys import KeyFormat, KeyHasher
from .lifecycle import check_secret
from .limiting import (
    HitRequest,
    LimitPolicy,
    LimitState,
    RateBackend,
    Window,
    hit_request,
)
from .oauth.claims import InvalidToken, TokenClaims, TokenUnavailable, TokenValidator, scope_covers
from .plans import DEFAULT_PLANS, Plan, ServiceLimits, resolve_policy
from .proxies import TrustedProxies
from .ratelimit_headers import limit_headers
from .records import KeyRecord, KeyStatus
from .request import RequestInfo
from .scopes import RouteMap, scope_allows
from .telemetry import CheckObservation, Telemetry
from .usage.recorder import UsageRecorder

__all__ = ["Allow", "Decision", "Guard", "Identity", "Lease"]


_PUBLIC = Allow(None)
_WELL_FORMED_MAX = 65_536  # remembered digests of well-formed keys, then start again


GuardFlow: TypeAlias = Generator[Op[Backends, Backends, Any], Any, Decision]
_logger = logging.getLogger("keyguard")


class Guard(UsageReports, Settlements):
    """Everything keyguard decides about a request, configured once.

    :param keys: the key store (both faces), e.g. ``open_key_store("sqlite:///k.db")``.
    :param limiter: the rate store (both faces); ``None`` disables limits.
    :param credentials: where credentials may come from (header and bearer by default).
    :param proxies: whose ``X-Forwarded-For`` to believe; by default nobody's.
    :param routes: the route → scope map and the public paths.
    :param plans: plan name → default limits.
    :param services: service (scope) → cost in units and per-service windows.
    :param on_limiter_error: ``"deny"`` answers 503 when the limit store fails,
        ``"allow"`` lets the request through without limit headers.
    :param reveal_key_status: say "expired" or "revoked" instead of the uniform
        "invalid" (only ever after the caller proved the full secret).
    :param expiry_warning: add ``X-API-Key-Expires`` when a key expires this soon.
    :param auth_failures: failed authentications allowed per client IP per minute
        before further attempts get 429 without touching storage (``0`` disables).
    :param deny_ips: networks refused for every key.
    :param realm: the ``realm`` of the ``WWW-Authenticate`` challenges: 1-64 ASCII
        letters, digits, spaces or ``-_.:``.
    :param allow_preflight: let CORS preflights through without a key: an ``OPTIONS``
        request carrying ``Access-Control-Request-Method`` reaches the app with no
        identity (Kong's ``run_on_preflight = false``). Off by default, so a preflight
        needs a key like any other request; browsers never send one, so turn this on
        when the app (or its CORS middleware) answers preflights itself. The
        deployment-wide deny list still applies.
    :param tokens: a validator of OAuth access tokens (see :mod:`keyguard.oauth`):
        a bearer value that does not parse as a keyguard key goes to it instead of
        the key store. A token for an outside client becomes the principal
        ``oauth:<client_id>`` on ``token_plan``, with the token's scopes; a token
        keyguard issued for a key (``bind_keys``) becomes that key, with its record's
        plan, limits, IP allow-list and status, and the token's scopes within the
        key's. Credentials up to the validator's ``max_token_bytes`` are then read
        (keys are still refused above 255 characters by the key parser).
    :param token_plan: the plan of outside OAuth clients (default ``"free"``).
    :param default_plan: the plan whose limits apply to a key whose own plan is not
        configured; when it is not configured either, such a key is refused (403
        ``plan_not_available``): a typo in a plan name never means "no limits".
    :param telemetry: OpenTelemetry for each check (a ``keyguard.check`` span under
        the server's span, and metrics; see :mod:`keyguard.telemetry`). ``True``
        uses the global providers, which cost next to nothing until an SDK is
        configured; pass a :class:`~keyguard.telemetry.Telemetry` for other
        providers, ``None`` or ``False`` for none.
    :param usage: where finished requests of known keys are recorded (see
        :mod:`keyguard.usage`): the adapters report each allowed request when its
        response ends, the guard each refusal of a key whose secret was proved.
        Recording is a queue append; a background thread aggregates and writes.

    An unexpected exception while deciding (a bug, a misbehaving custom store or
    hasher) becomes a generic ``500 internal_error``; the log records the exception's
    type and where it was raised, never its message, which may hold request data.

    **Security note**: the client address comes from the socket unless ``proxies``
    says otherwise; configure it to match your deployment or IP rules mean nothing.
    """

    def __init__(
        self,
        *,
        keys: KeyBackend,
        limiter: RateBackend | None = None,
        credentials: CredentialConfig | None = None,
        proxies: TrustedProxies | None = None,
        routes: RouteMap | None = None,
        plans: Mapping[str, Plan] = DEFAULT_PLANS,
        services: Mapping[str, ServiceLimits] | None = None,
        key_format: KeyFormat | None = None,
        hasher: KeyHasher | None = None,
        clock: Clock | None = None,
        on_limiter_error: Literal["deny", "allow"] = "deny",
        reveal_key_status: bool = False,
        expiry_warning: timedelta = timedelta(days=7),
        auth_failures: int = 20,
        deny_ips: Sequence[str] = (),
        realm: str = "api",
        allow_preflight: bool = False,
        tokens: TokenValidator | None = None,
        token_plan: str = "free",  # noqa: S107 - a plan name, not a password
        telemetry: Telemetry | bool | None = True,
        default_plan: str = "free",
        usage: UsageRecorder | None = None,
    ) -> None:
        if on_limiter_error not in {"deny", "allow"}:
            raise ConfigurationError("on_limiter_error must be 'deny' or 'allow'")
        # isascii: str.isalnum() accepts "é" or "٣", which cannot go into a header and
        # would turn every 401 into a UnicodeEncodeError (T10, T99).
        if (
            not realm
            or not realm.isascii()
            or not all(c.isalnum() or c in " -_.:" for c in realm)
            or len(realm) > 64
        ):
            raise ConfigurationError("realm must be 1-64 ASCII letters, digits, spaces or -_.:")
        if isinstance(auth_failures, bool) or auth_failures < 0:
            raise ConfigurationError("auth_failures must be 0 or more")
        self.backends = Backends(keys, limiter)
        self.credentials = credentials or CredentialConfig()
        self.tokens = tokens
        self.token_plan = token_plan
        if tokens is not None:
            self.credentials = self._token_ready(tokens, token_plan, plans)
        self.proxies = proxies or TrustedProxies()
        self.routes = routes
        self.plans = dict(plans)
        # A key whose plan is not configured (a typo, a plan since removed) gets the
        # default plan's limits, or is refused when there is none: never no limits at
        # all, which would fail open.
        self._fallback_plan = self.plans.get(default_plan)
        self.services = dict(services or {})
        self.key_format = key_format or KeyFormat()
        self._key_prefix = self.key_format.prefix + "_"
        self.hasher = hasher or KeyHasher()
        self.clock = clock or SystemClock()
        self.on_limiter_error = on_limiter_error
        self.reveal_key_status = reveal_key_status
        self.expiry_warning = expiry_warning
        self.realm = realm
        self.allow_preflight = bool(allow_preflight)
        self.telemetry = telemetry_for(telemetry)
        if usage is not None and not isinstance(usage, UsageRecorder):
            raise ConfigurationError("usage must be a UsageRecorder (keyguard.usage)")
        self.usage = usage
        self._request_ids = itertools.count()
        # Stores that live in this process never wait on I/O: the async face can call
        # their sync methods directly, with no coroutine, task or shield per request.
        self.inline = (
            in_process(keys)
            and (limiter is None or in_process(limiter))
            and (tokens is None or tokens.in_process)
        )
        # Stores whose async face only runs their sync methods in a worker thread
        # (SQLite): the async check runs on the loop while the stores answer from
        # memory (a cached key, limits without quotas), then makes one thread hop for
        # the rest of the decision, not one per storage call (flows.run_hybrid).
        self.threaded = (
            not self.inline
            and all(in_process(s) or threaded(s) for s in (keys, limiter) if s is not None)
            and (tokens is None or tokens.in_process)
        )
        # A release that never suspends: the ASGI adapter awaits it with no task+shield.
        self.quick_release = self.inline or limiter is None or queues_releases(limiter)
        self._lease_prefix = secrets.token_hex(6)
        self._lease_ids = itertools.count()
        self._deny = IPDenyList.from_cidrs(tuple(deny_ips)) if deny_ips else None
        self._failures = (
            MemoryRateStore(clock=self.clock, max_entries=100_000) if auth_failures else None
        )
        self._failure_policy = LimitPolicy(windows=(Window("auth-failures", auth_failures, 60),))
        self._well_formed: set[str] = set()  # digests of keys that passed KeyFormat.parse

    # drivers

    def check(
        self, request: RequestInfo, *, scope: str | None = None, cost: int | None = None
    ) -> Decision:
        """Decide on ``request`` with blocking I/O (WSGI, scripts)."""
        started = time.perf_counter()
        seen = None if self.telemetry is None else self.telemetry.begin()
        decision: Decision | None = None
        try:
            decision = run_sync(self._flow(request, scope, cost, seen), self.backends)
        except Exception as exc:  # the one boundary for keyguard's own bugs (a.10, T63)
            decision = internal_error(exc)
        finally:
            if seen is not None:
                seen.finish(decision)
        if type(decision) is Denial and decision.key_id is not None:
            self._refused(request, decision, started)
        return decision

    async def acheck(
        self, request: RequestInfo, *, scope: str | None = None, cost: int | None = None
    ) -> Decision:
        """Decide on ``request`` without blocking the event loop (ASGI)."""
        if self.inline:
            return self.check(request, scope=scope, cost=cost)
        started = time.perf_counter()
        seen = None if self.telemetry is None else self.telemetry.begin()
        decision: Decision | None = None
        try:
            flow = self._flow(request, scope, cost, seen)
            if self.threaded:
                decision = await run_hybrid(flow, self.backends, abandoned=self._abandoned)
            else:
                decision = await run_async(flow, self.backends)
        except Exception as exc:  # the one boundary for keyguard's own bugs (a.10, T63)
            decision = internal_error(exc)
        finally:
            if seen is not None:  # a cancelled check ends its span with no decision
                seen.finish(decision)
        if type(decision) is Denial and decision.key_id is not None:
            self._refused(request, decision, started)
        return decision

    async def _abandoned(self, decision: Decision) -> None:
        """A decision whose check was cancelled while it ran on in a worker thread
        gives back the slot it took, or nobody would until its lease expires (T82)."""
        if isinstance(decision, Allow) and decision.lease is not None:
            await self.arelease(decision.lease)

    def release(self, lease: Lease) -> None:
        """Give a concurrency slot back; harmless to call twice.

        A limit store that fails here is logged, not raised: the response has been
        served, and the slot comes back when its lease expires.
        """
        if self.backends.limiter is not None:
            try:
                self.backends.limiter.release(lease.bucket, lease.lease_id)
            except StorageError:
                self._release_failed(lease)

    async def arelease(self, lease: Lease) -> None:
        """The async :meth:`release`."""
        if self.inline:
            self.release(lease)
        elif self.backends.limiter is not None:
            try:
                await self.backends.limiter.arelease(lease.bucket, lease.lease_id)
            except StorageError:
                self._release_failed(lease)

    def _release_failed(self, lease: Lease) -> None:
        _logger.warning("keyguard could not release a concurrency slot of %s", lease.bucket)
        if self.telemetry is not None:
            self.telemetry.storage_error("limits")

    # the flow, written once

    def _flow(
        self,
        request: RequestInfo,
        scope: str | None,
        cost: int | None,
        seen: CheckObservation | None,
    ) -> GuardFlow:
        needed = scope
        if needed is None and self.routes is not None:
            match = self.routes.match(request.method, request.path)
            if match is None:  # a path form the router and the check could read apart
                return deny("invalid_request", detail="unsupported path")
            if match.public:
                return _PUBLIC
            needed = match.scope
        client = self.proxies.client_ip(request)
        ip = None if client is None else client.ip
        if seen is not None:  # what a denial alone would not tell the telemetry
            seen.client, seen.service = ip, needed
        if self._deny is not None and self._deny.blocks(ip):
            return deny("ip_not_allowed")
        if self.allow_preflight and is_preflight(request):
            return _PUBLIC
        blocked_for = self._blocked_for(ip)
        if blocked_for is not None:
            return deny("too_many_failed_attempts", retry_after=blocked_for)
        try:
            credential = extract_credential(request, self.credentials)
        except MalformedCredential:
            self._failed(ip)
            return deny("invalid_request")
        except InvalidCredential:
            self._failed(ip)
            return deny("invalid_api_key")
        if credential is None:
            return deny("missing_api_key")
        # A bearer value that is not a keyguard key is an access token when tokens are on.
        token = self.tokens is not None and self._token_shaped(credential)
        authenticate = self._authenticate_token if token else self._authenticate
        record_or_denial = yield from authenticate(credential, ip)
        if isinstance(record_or_denial, Denial):
            return record_or_denial
        record = record_or_denial
        method = "oauth" if token else credential.method
        if seen is not None:
            seen.key_id, seen.method = record.id, method
        decision = yield from self._admit(record, method, needed, cost, ip, seen=seen)
        return self._named(decision, record, needed)

    def _named(self, decision: Decision, record: KeyRecord, needed: str | None) -> Decision:
        """A refusal of a proved key names it, when usage is recorded (see ``Denial``)."""
        if self.usage is not None and type(decision) is Denial:
            return replace(decision, key_id=record.id, owner=record.owner, service=needed)
        return decision

    def _authenticate(
        self, credential: Credential, ip: IPAddress | None
    ) -> Generator[Op[Backends, Backends, Any], Any, KeyRecord | Denial]:
        # The digest first: a key whose digest passed the offline checks before is not
        # parsed again (the checks are a pure function of the key, and the digest names
        # it). Digests, not keys, are remembered: storage holds them anyway. Text that
        # is not ASCII is never a key (and may not encode): the parser refuses it.
        value = credential.value
        digest = self.hasher.digest(value) if value.reveal().isascii() else ""
        if digest not in self._well_formed:
            try:
                self.key_format.parse(value)
            except InvalidCredential:
                self._failed(ip)
                return deny("invalid_api_key")
            if len(self._well_formed) >= _WELL_FORMED_MAX:
                self._well_formed.clear()
            self._well_formed.add(digest)
        try:
            record = yield FindKey(digest)
        except StorageError:
            return deny("key_store_unavailable", retry_after=RETRY_WHEN_DOWN)
        try:
            return check_secret(record, digest, utcnow(self.clock))
        except InvalidCredential as exc:
            if record is None or exc.reason in {"unknown", "rotated"}:
                self._failed(ip)
            code = "invalid_api_key"
            if self.reveal_key_status and exc.reason in {"expired", "revoked"}:
                code = f"api_key_{exc.reason}"
            if self.usage is not None and record is not None and exc.reason != "unknown":
                # The caller proved this key's secret: its owner sees the refusal.
                return deny(code, key_id=record.id, owner=record.owner)
            return deny(code)

    # the token path

    def _token_ready(
        self, tokens: TokenValidator, plan: str, plans: Mapping[str, Plan]
    ) -> CredentialConfig:
        """Check the token options; the credential settings that let tokens through."""
        if not isinstance(tokens, TokenValidator):
            raise ConfigurationError("tokens must be a token validator (keyguard.oauth)")
        if "bearer" not in self.credentials.methods:
            raise ConfigurationError("tokens arrive as bearer credentials: enable 'bearer'")
        if plan not in plans:
            raise ConfigurationError(f"token_plan {plan!r} is not one of the plans")
        length = max(self.credentials.max_length, tokens.max_token_bytes)
        return replace(self.credentials, max_length=length)

    def _token_shaped(self, credential: Credential) -> bool:
        """A bearer value that does not look like a keyguard key (its prefix) is a token.

        Only the prefix is looked at: the key path parses the value fully, once.
        """
        return credential.method == "bearer" and not credential.value.reveal().startswith(
            self._key_prefix
        )

    def _authenticate_token(
        self, credential: Credential, ip: IPAddress | None
    ) -> Generator[Op[Backends, Backends, Any], Any, KeyRecord | Denial]:
        """A validated token as the record the rest of the flow applies (see ``tokens``)."""
        if self.tokens is None:  # pragma: no cover - the flow calls this only with tokens
            return deny("invalid_token")
        try:
            claims = yield from self.tokens.flow(credential.value.reveal(), self.clock.now())
        except TokenUnavailable as exc:
            return deny("token_validation_unavailable", retry_after=exc.retry_after)
        except InvalidToken as exc:
            if exc.forged:
                self._failed(ip)
            return deny("invalid_token")
        if claims.key_id is None:
            return self._client_record(claims)
        try:
            record = yield GetKey(claims.key_id)
        except StorageError:
            return deny("key_store_unavailable", retry_after=RETRY_WHEN_DOWN)
        if record is None or record.status(utcnow(self.clock)) is not KeyStatus.ACTIVE:
            return deny("invalid_token")  # a revoked, expired or deleted key stops its tokens
        scopes = tuple(s for s in claims.scopes if scope_covers(record.scopes, s))
        bound: KeyRecord = replace(record, scopes=scopes)
        return bound

    def _client_record(self, claims: TokenClaims) -> KeyRecord:
        """An outside OAuth client, as a record: its own bucket, the token plan."""
        now = utcnow(self.clock)
        return KeyRecord(
            id="oauth:" + claims.client_id,
            name=claims.client_id,
            hint="",
            digests=(),
            created_at=now,
            updated_at=now,
            scopes=claims.scopes,
            plan=self.token_plan,
        )

    def _admit(
        self,
        record: KeyRecord,
        method: str,
        needed: str | None,
        cost: int | None,
        ip: IPAddress | None,
        *,
        seen: CheckObservation | None,
    ) -> Generator[Op[Backends, Backends, Any], Any, Decision]:
        """The key's address and scope, then its limits."""
        if record.ip_allow and not allowed(record.ip_allow, ip):
            return deny("ip_not_allowed")
        if needed is not None and not scope_allows(record.scopes, needed):
            return deny("insufficient_permissions", scope=needed, detail=f"needs {needed}")
        service = self.services.get(needed) if needed is not None else None
        units = cost if cost is not None else (service.cost if service is not None else 1)
        extra = self._expiry_header(record)
        limiter = self.backends.limiter
        plan = self.plans.get(record.plan, self._fallback_plan)
        if plan is None and self.plans:
            return deny("plan_not_available")
        policy = resolve_policy(plan, record.limits, needed, service)
        states: tuple[LimitState, ...] = ()
        lease = charge = None
        if limiter is not None and not policy.is_empty():
            lease_id = (
                f"{self._lease_prefix}{next(self._lease_ids):x}"
                if policy.concurrency is not None
                else None
            )
            try:
                admission = yield Hit(hit_request(record.id, policy, units, lease_id))
            except StorageError:
                if self.on_limiter_error == "deny":
                    return deny("limiter_unavailable", retry_after=RETRY_WHEN_DOWN)
                if seen is not None:
                    seen.fault = "limits"
                unlimited = self._identity(record, method, (), needed, ip, units=units)
                return allow_of(unlimited, extra, None, units)
            if not admission.allowed:
                if seen is not None:
                    seen.limits = admission.states
                return refusal(admission, extra)
            states = admission.states
            lease = None if lease_id is None else Lease(record.id, lease_id)
            if policy.quotas:  # the handle settle() uses, with the periods just charged
                charge = Charge(record.id, policy, states, units, self.clock.now())
        headers = tuple(limit_headers(states)) + extra
        identity = self._identity(record, method, states, needed, ip, units=units, charge=charge)
        return allow_of(identity, headers, lease, units)

    # small pure helpers

    def _identity(
        self,
        record: KeyRecord,
        method: str,
        states: tuple[LimitState, ...],
        service: str | None,
        ip: IPAddress | None,
        *,
        units: int = 0,
        charge: Charge | None = None,
    ) -> Identity:
        return identity_of(
            key_id=record.id,
            name=record.name,
            owner=record.owner,
            scopes=record.scopes,
            plan=record.plan,
            limits=states,
            client_ip=None if ip is None else ip_text(ip),
            auth_method=method,
            service=service,
            units=units,
            charge=charge,
        )

    def _expiry_header(self, record: KeyRecord) -> Headers:
        if record.expires_at is None:
            return ()
        now = utcnow(self.clock)
        if (
            record.status(now) is KeyStatus.ACTIVE
            and record.expires_at - now <= self.expiry_warning
        ):
            return ((b"x-api-key-expires", (isoformat(record.expires_at) or "").encode()),)
        return ()

    def _blocked_for(self, ip: IPAddress | None) -> float | None:
        """Seconds until ``ip`` may try again, or ``None`` when it is not blocked.

        The wait is read from the failure window (until its oldest failures leave),
        not a flat 60 s: failures counted in a one-second slot leave up to a second
        later than 60 s after they happened, and Retry-After must not be early (T72).
        """
        if not self._failures or ip is None:  # none configured, or no address ever failed
            return None
        bucket = "ip:" + ip_text(ip)
        if bucket not in self._failures:  # the common case: this address never failed
            return None
        states = self._failures.peek(bucket, self._failure_policy)
        waits = [s.reset_after for s in states if s.remaining <= 0]
        return max(waits) if waits else None

    def _failed(self, ip: IPAddress | None) -> None:
        if self._failures is not None and ip is not None:
            self._failures.hit(HitRequest("ip:" + ip_text(ip), self._failure_policy))
