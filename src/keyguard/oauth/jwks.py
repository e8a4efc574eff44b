"""Keys fetched from an authorization server's JWKS URL: cached, refreshed sparingly.

:class:`RemoteJWKS` keeps the last good key set and fetches a new one when

- nothing has loaded yet, or the set is older than ``max_age`` (a scheduled refresh,
  so a key removed from the JWKS stops verifying within ``max_age``), or
- a token names a ``kid`` the set does not hold (the issuer may have rotated),

but never more than once per ``cooldown`` (30 s, panva/jose's default), however many
requests ask: concurrent misses share one fetch (single-flight), and a thousand
tokens with random ``kid`` values cause at most one fetch (SECURITY.md T35). A fetch
that fails (down, slow, 5xx, junk, empty, oversized) never replaces the last good set
(T36; PyJWT's ``PyJWKClient`` wipes it, #1162); the set is served for up to
``max_stale`` after its last successful load. With nothing usable the guard answers
503 with ``Retry-After``, not 401.

The fetch is blocking on the WSGI face and a coroutine on the ASGI face (the event
loop is never blocked); both are bounded by ``timeout`` and ``max_bytes``.

.. versionadded:: 0.2
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

from ..clock import Clock, SystemClock
from ..errors import ConfigurationError
from ._http import FetchFailed, HttpSettings, afetch_json, check_url, fetch_json
from .keyset import KeySet

__all__ = ["RemoteJWKS"]

_logger = logging.getLogger("keyguard")


class RemoteJWKS:
    """A key source that fetches ``url`` (a JWK Set, RFC 7517 §5).

    :param url: the JWKS URL, https (http only to a loopback address).
    :param timeout: seconds a fetch may take in all.
    :param max_bytes: the largest JWKS document read (256 KiB).
    :param cooldown: the least time between two fetches (30 s).
    :param max_age: refresh a set this old on the next request (5 minutes).
    :param max_stale: stop using a set this long after its last successful load, when
        every refresh since has failed (24 hours); then 503 until a fetch succeeds.
    :param max_keys: keys kept from one document, which bounds the kid cache (50).
    :param proxy: an explicit proxy URL; the environment is never read.
    :param clock: the time source (its monotonic clock).

    **Security note**: only this configured URL is ever fetched; a token's ``jku``,
    ``x5u``, ``jwk`` or ``x5c`` header is never read (RFC 8725 §3.10).
    """

    in_process = False
    symmetric = False

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        max_bytes: int = 256 * 1024,
        cooldown: float = 30.0,
        max_age: float = 300.0,
        max_stale: float = 86_400.0,
        max_keys: int = 50,
        proxy: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.url = check_url(url, "JWKS URL")
        self._http = HttpSettings(timeout=timeout, max_bytes=max_bytes, proxy=proxy)
        if not 1 <= cooldown <= 3600:
            raise ConfigurationError("cooldown must be between 1 and 3600 seconds")
        if not cooldown <= max_age <= max_stale:
            raise ConfigurationError("need cooldown <= max_age <= max_stale")
        if not 1 <= max_keys <= 1000:
            raise ConfigurationError("max_keys must be between 1 and 1000")
        self.cooldown = float(cooldown)
        self.max_age = float(max_age)
        self.max_stale = float(max_stale)
        self.max_keys = max_keys
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._keys: KeySet | None = None
        self._loaded_at: float | None = None
        self._attempted_at: float | None = None
        self._sync_done = threading.Event()
        self._sync_done.set()
        self._task: asyncio.Task[None] | None = None
        self.fetches = 0  # attempts so far: a figure for metrics and tests

    def __repr__(self) -> str:
        return f"RemoteJWKS({self.url!r}, keys={0 if self._keys is None else len(self._keys)})"

    # what the validator asks, cheaply, on every token

    def keys(self) -> KeySet | None:
        """The last good set, unless it is older than ``max_stale`` or never loaded."""
        keys, loaded = self._keys, self._loaded_at
        if keys is None or loaded is None or self._now() - loaded >= self.max_stale:
            return None
        return keys

    def needs_refresh(self) -> bool:
        """Nothing loaded, or the set is older than ``max_age``, and the cooldown allows."""
        loaded = self._loaded_at
        return (loaded is None or self._now() - loaded >= self.max_age) and self.may_refresh()

    def may_refresh(self) -> bool:
        """Whether ``cooldown`` has passed since the last fetch was tried."""
        attempted = self._attempted_at
        return attempted is None or self._now() - attempted >= self.cooldown

    def retry_after(self) -> float:
        """Seconds until the next fetch may be tried: what a 503 advertises."""
        attempted = self._attempted_at
        if attempted is None:
            return 1.0
        return max(1.0, self.cooldown - (self._now() - attempted))

    # fetching: one per cooldown, coalesced

    def refresh(self) -> KeySet | None:
        """Fetch now if the cooldown allows (blocking), else wait for a fetch already
        under way in another thread; return the set then in use."""
        if self._claim():
            self._sync_done.clear()
            try:
                self._install_or_fail(lambda: fetch_json(self._http, "GET", self.url))
            finally:
                self._sync_done.set()
        else:
            self._sync_done.wait(2 * self._http.timeout)
        return self.keys()

    async def arefresh(self) -> KeySet | None:
        """The async :meth:`refresh`: concurrent callers on one loop share one fetch."""
        loop = asyncio.get_running_loop()
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            if not self._claim():
                return self.keys()
            task = self._task = loop.create_task(self._afetch())
        # Shielded: a caller that goes away must not cancel everybody's fetch.
        await asyncio.shield(task)
        return self.keys()

    def _claim(self) -> bool:
        with self._lock:
            if not self.may_refresh():
                return False
            self._attempted_at = self._now()
            self.fetches += 1
            return True

    async def _afetch(self) -> None:
        try:
            document = await afetch_json(self._http, "GET", self.url)
        except FetchFailed as exc:
            self._failed(exc.reason)
            return
        self._install(document)

    def _install_or_fail(self, fetch: Callable[[], object]) -> None:
        try:
            document = fetch()
        except FetchFailed as exc:
            self._failed(exc.reason)
            return
        self._install(document)

    def _install(self, document: object) -> None:
        keys = KeySet.from_jwks(document, max_keys=self.max_keys)
        if not len(keys):
            self._failed("no_usable_key")
            return
        with self._lock:
            self._keys = keys
            self._loaded_at = self._now()

    def _failed(self, reason: str) -> None:
        kept = "keeping the last good set" if self.keys() is not None else "no keys loaded"
        _logger.warning("keyguard could not fetch the JWKS %s (%s); %s", self.url, reason, kept)

    def _now(self) -> float:
        return self._clock.monotonic()
