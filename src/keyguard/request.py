"""The framework-free view of a request that every check reads.

Adapters build a :class:`RequestInfo` from an ASGI scope or a WSGI environ; the core
never imports a web framework. Header names are lower-case bytes and repeated
headers stay repeated (joining or picking one is the caller's decision, made
explicitly: silent first- or last-wins is how header-smuggling bypasses start).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._slots import slot_setters

__all__ = ["RequestInfo", "request_info"]


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """One request, as keyguard sees it.

    :param method: upper-case HTTP method.
    :param path: the decoded path the app will route (no query string).
    :param headers: ``(name, value)`` pairs, names lower-case, values raw bytes.
    :param query_string: the raw query string, undecoded.
    :param peer: the socket peer's address, or ``None`` (Unix socket, or unknown).
    :param route_id: the framework's route template or endpoint name, when known.
    """

    method: str
    path: str
    headers: tuple[tuple[bytes, bytes], ...] = ()
    query_string: bytes = b""
    peer: str | None = None
    route_id: str | None = None

    def header_values(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (lower-case), in order."""
        return [value for key, value in self.headers if key == name]


_METHOD, _PATH, _HEADERS, _QUERY_STRING, _PEER, _ROUTE_ID = slot_setters(RequestInfo)


def request_info(
    *,
    method: str,
    path: str,
    headers: tuple[tuple[bytes, bytes], ...],
    query_string: bytes,
    peer: str | None,
    route_id: str | None,
) -> RequestInfo:
    """``RequestInfo(...)`` for the adapters, once per request (see :mod:`._slots`)."""
    request = object.__new__(RequestInfo)
    _METHOD(request, method)
    _PATH(request, path)
    _HEADERS(request, headers)
    _QUERY_STRING(request, query_string)
    _PEER(request, peer)
    _ROUTE_ID(request, route_id)
    return request
