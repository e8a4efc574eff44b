"""The framework-free view of a request that every check reads.

Adapters build a :class:`RequestInfo` from an ASGI scope or a WSGI environ; the core
never imports a web framework. Header names are lower-case bytes and repeated
headers stay repeated (joining or picking one is the caller's decision, made
explicitly: silent first- or last-wins is how header-smuggling bypasses start).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RequestInfo"]


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
