"""Small pure helpers of the guard: address checks, caches, preflights, bug reports."""

from __future__ import annotations

import logging
import re
import traceback
from functools import lru_cache

from .decisions import Headers
from .denials import Denial, deny
from .errors import ConfigurationError
from .iprules import IPAddress, IPAllowList
from .limiting import Admission, LimitKind
from .ratelimit_headers import limit_headers
from .request import RequestInfo
from .telemetry import Telemetry, default_telemetry

__all__ = [
    "allowed",
    "in_process",
    "internal_error",
    "ip_text",
    "is_preflight",
    "queues_releases",
    "refusal",
    "safe_request_id",
    "telemetry_for",
    "threaded",
]

_logger = logging.getLogger("keyguard")


def is_preflight(request: RequestInfo) -> bool:
    """A CORS preflight: ``OPTIONS`` with ``Access-Control-Request-Method``."""
    return request.method == "OPTIONS" and any(
        name == b"access-control-request-method" for name, _ in request.headers
    )


def internal_error(exc: Exception) -> Denial:
    """The 500 for an unexpected exception; logs its type and place, never its text."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    _logger.error("keyguard failed to decide on a request: %s at %s", type(exc).__name__, where)
    return deny("internal_error")


def allowed(cidrs: tuple[str, ...], ip: IPAddress | None) -> bool:
    """Whether a key's allow-list admits ``ip``; a damaged stored list admits nobody."""
    allow_list = _allow_list(cidrs)
    return allow_list is not None and allow_list.allows(ip)


@lru_cache(maxsize=4096)
def _allow_list(cidrs: tuple[str, ...]) -> IPAllowList | None:
    try:
        return IPAllowList.from_cidrs(cidrs)
    except ConfigurationError:
        return None


@lru_cache(maxsize=4096)
def ip_text(ip: IPAddress) -> str:
    return str(ip)


def telemetry_for(option: Telemetry | bool | None) -> Telemetry | None:
    if option is True:
        return default_telemetry()
    if option is None or option is False:
        return None
    if not isinstance(option, Telemetry):
        raise ConfigurationError("telemetry must be a Telemetry, True, False or None")
    return option


def in_process(store: object) -> bool:
    """Whether a store declares ``in_process = True``: its methods never block."""
    return getattr(store, "in_process", False) is True


def queues_releases(store: object) -> bool:
    """Whether a rate store declares ``queues_releases = True``: its ``arelease`` only
    queues the release and never suspends, so a caller needs no task or shield to
    keep a cancellation from cutting it short."""
    return getattr(store, "queues_releases", False) is True


def threaded(store: object) -> bool:
    """Whether a store declares ``threaded = True``: its async face is no more than
    its sync methods run in a worker thread (``asyncio.to_thread``), so a caller may
    as well run several of its calls in one such thread itself."""
    return getattr(store, "threaded", False) is True


_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


def safe_request_id(value: bytes) -> str | None:
    """A client's request id fit for a log: 1-64 of ``A-Za-z0-9._:-``, else ``None``."""
    return value.decode("ascii") if _REQUEST_ID.fullmatch(value) else None


def refusal(admission: Admission, extra: Headers) -> Denial:
    """The denial for a limiter's refusal: which limit, its headers, when to retry."""
    by = admission.denied_by
    code = "rate_limit_exceeded"
    if by is not None and by.kind is LimitKind.QUOTA:
        code = "quota_exceeded"
    elif by is not None and by.kind is LimitKind.CONCURRENCY:
        code = "concurrency_limit_exceeded"
    detail = None if by is None else f"{by.name}: {by.limit}"
    if admission.retry_after is None and by is not None and by.kind is LimitKind.QUOTA:
        detail = f"{by.name}: cost exceeds capacity"
    headers = tuple(limit_headers(admission.states)) + extra
    return deny(code, detail=detail, retry_after=admission.retry_after, headers=headers)
