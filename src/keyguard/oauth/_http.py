"""Bounded HTTP calls for the JWKS fetch and token introspection, in both faces.

Every call has a total deadline and a response-size cap, follows no redirect and
reads no proxy or certificate setting from the environment (configuration is
explicit). Failures become :class:`FetchFailed` with a fixed reason word: the
response body, which a hostile or broken server controls, never reaches a message.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from ..errors import ConfigurationError, shown

__all__ = ["FetchFailed", "HttpSettings", "afetch_json", "check_url", "fetch_json"]

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


class FetchFailed(Exception):
    """An HTTP call that gave no usable JSON; ``reason`` is a fixed word."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """How one remote endpoint is called.

    :param timeout: seconds for the whole call (connect, send, every read).
    :param max_bytes: the largest response body read; a larger one is a failure.
    :param proxy: an explicit proxy URL; ``None`` connects directly.
    """

    timeout: float = 2.0
    max_bytes: int = 256 * 1024
    proxy: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.timeout <= 30:
            raise ConfigurationError("timeout must be more than 0 and at most 30 seconds")
        if not 1024 <= self.max_bytes <= 10 * 1024 * 1024:
            raise ConfigurationError("max_bytes must be between 1 KiB and 10 MiB")

    def client(self) -> httpx.Client:
        return httpx.Client(
            timeout=self.timeout, follow_redirects=False, trust_env=False, proxy=self.proxy
        )

    def async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=self.timeout, follow_redirects=False, trust_env=False, proxy=self.proxy
        )


def check_url(url: str, what: str) -> str:
    """``url`` if it is https, or http to a loopback host; no credentials in it.

    **Security note**: keys and introspection answers fetched over plain HTTP could be
    swapped by anyone on the path, so only loopback (tests, a sidecar) may use it.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        raise ConfigurationError(f"{what} {shown(url)} is not a URL") from None
    if parts.username or parts.password:
        raise ConfigurationError(f"{what} must not carry credentials")
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and _is_loopback(host):
        return url
    raise ConfigurationError(f"{what} {shown(url)} must be https (http only to loopback)")


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def fetch_json(
    settings: HttpSettings,
    method: str,
    url: str,
    *,
    data: Mapping[str, str] | None = None,
    auth: tuple[str, str] | None = None,
) -> object:
    """Call ``url`` with blocking I/O; the parsed JSON of a 200 response.

    The deadline is checked between chunks, so a server that trickles bytes is cut
    off after at most twice ``timeout`` (one read may start just before it).
    """
    deadline = time.monotonic() + settings.timeout
    body = bytearray()
    try:
        with (
            settings.client() as client,
            client.stream(method, url, data=data, auth=auth, headers=_HEADERS) as response,
        ):
            _check_head(response, settings)
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > settings.max_bytes:
                    raise FetchFailed("too_large")
                if time.monotonic() > deadline:
                    raise FetchFailed("timeout")
    except httpx.TimeoutException:
        raise FetchFailed("timeout") from None
    except httpx.HTTPError:
        raise FetchFailed("unreachable") from None
    return _parse(bytes(body))


async def afetch_json(
    settings: HttpSettings,
    method: str,
    url: str,
    *,
    data: Mapping[str, str] | None = None,
    auth: tuple[str, str] | None = None,
) -> object:
    """The async :func:`fetch_json`, with an exact total deadline."""
    try:
        body = await asyncio.wait_for(_aread(settings, method, url, data, auth), settings.timeout)
    except TimeoutError:
        raise FetchFailed("timeout") from None
    return _parse(body)


async def _aread(
    settings: HttpSettings,
    method: str,
    url: str,
    data: Mapping[str, str] | None,
    auth: tuple[str, str] | None,
) -> bytes:
    body = bytearray()
    try:
        async with (
            settings.async_client() as client,
            client.stream(method, url, data=data, auth=auth, headers=_HEADERS) as response,
        ):
            _check_head(response, settings)
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > settings.max_bytes:
                    raise FetchFailed("too_large")
    except httpx.TimeoutException:
        raise FetchFailed("timeout") from None
    except httpx.HTTPError:
        raise FetchFailed("unreachable") from None
    return bytes(body)


_HEADERS = {"accept": "application/json"}


def _check_head(response: httpx.Response, settings: HttpSettings) -> None:
    if response.status_code != 200:
        raise FetchFailed("status")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_bytes:
        raise FetchFailed("too_large")


def _parse(body: bytes) -> object:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise FetchFailed("junk") from None
