"""Scopes, and the scope each route needs.

A scope is a string such as ``image:create``. A key's granted scopes satisfy a needed
scope by exact, case-sensitive match, or by one of two wildcard forms:

- ``*`` grants everything;
- ``prefix:*`` grants every scope that starts with ``prefix:`` and has something
  after it: ``image:*`` grants ``image:create`` and ``image:edit:hd``, but neither
  ``imagex:create`` nor ``image`` itself (grant ``image`` explicitly if a route
  needs it; a wildcard never reaches up a level).

No other form is a wildcard: ``a:*:b`` in a key's scopes is only ever equal to
itself, and a needed scope containing ``*`` is never satisfied (routes must name a
concrete scope, which :class:`RouteRule` enforces).

.. versionadded:: 0.1
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import ConfigurationError, InvalidInput, shown
from .validation import validate_scopes

__all__ = [
    "RouteMap",
    "RouteMatch",
    "RouteRule",
    "normalise_path",
    "scope_allows",
]

_METHOD = re.compile(r"[A-Z][A-Z\-]{0,19}")
_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]{0,63}\}")
_MAX_PATTERN = 1000
# Specificity ranks, compared left to right along the pattern: a literal segment beats
# a parameter, which beats the end of a pattern, which beats a trailing wildcard.
_LITERAL, _PARAMETER, _END, _WILDCARD = 3, 2, 1, 0


def scope_allows(granted: Iterable[str], needed: str) -> bool:
    """Whether the ``granted`` scopes satisfy ``needed`` (see the module docs)."""
    if not needed or "*" in needed:
        return False
    for scope in granted:
        if scope in (needed, "*"):
            return True
        if scope.endswith(":*") and len(needed) >= len(scope) and needed.startswith(scope[:-1]):
            return True
    return False


def normalise_path(path: str) -> str | None:
    """The form of ``path`` that route rules are matched against; ``None`` to refuse.

    Only a trailing slash is removed (``/admin/`` is matched as ``/admin``, since
    routers redirect one to the other or, like Flask with ``strict_slashes=False``,
    serve both). Everything else is left exactly as the router will see it:

    - case is kept (``/ADMIN`` is another route in Starlette and Flask);
    - ``;`` is part of its segment (Starlette does not route ``/admin;x`` to ``/admin``);
    - nothing is percent-decoded: the ASGI ``path`` is already decoded once.

    Paths the check and the router could read differently are refused rather than
    rewritten: empty segments (``//admin``) and dot segments (``/./admin``,
    ``/a/../admin``). Collapsing or resolving them would check one path while
    Starlette routes another (``/a//b`` reaches a ``/a/{rest:path}`` route, and
    ``/admin/..`` reaches a ``/admin`` mount); real clients never send them, and
    proxies that normalise paths have done so already. Anything not starting with
    ``/`` is refused too.
    """
    if not path.startswith("/") or "//" in path:
        return None
    if "/./" in path or "/../" in path or path.endswith(("/.", "/..")):
        return None
    if len(path) > 1 and path.endswith("/"):
        return path[:-1]
    return path


@dataclass(frozen=True, slots=True)
class RouteRule:
    """The scope a method and path pattern need.

    :param method: an upper-case method, or ``*`` for any. ``GET`` also covers
        ``HEAD``, as Starlette and Flask serve ``HEAD`` with the ``GET`` handler.
    :param pattern: ``/v1/images/{id}`` (a parameter matches one non-empty segment)
        or ``/v1/chat/*`` (matches ``/v1/chat`` and everything below it).
    :param scope: a concrete scope, such as ``image:create``.
    """

    method: str
    pattern: str
    scope: str

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not (
            self.method == "*" or _METHOD.fullmatch(self.method)
        ):
            raise ConfigurationError(
                f"route method {shown(self.method)} must be an upper-case method or '*'"
            )
        _check_scope(self.scope, "route scope")
        _compile(self.pattern)


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """What a request needs.

    :param public: no credential is needed.
    :param scope: the scope the key must grant; ``None`` means any valid key will do.
    :param pattern: the pattern that matched, or ``None`` when the default applied
        (useful as a route id for usage and limits).
    """

    public: bool
    scope: str | None
    pattern: str | None


@dataclass(frozen=True, slots=True)
class _Entry:
    """One rule or public path, compiled."""

    key: tuple[int, ...]
    shape: str
    regex: str
    method: str
    wildcard: bool
    result: RouteMatch


@dataclass(frozen=True, slots=True)
class _Table:
    """The rules that can apply to one request method, most specific first."""

    regex: re.Pattern[str] | None
    entries: tuple[_Entry, ...]
    wildcards: re.Pattern[str] | None
    wildcard_entries: tuple[_Entry, ...]

    def best(self, path: str, *, wildcards_only: bool = False) -> _Entry | None:
        regex = self.wildcards if wildcards_only else self.regex
        entries = self.wildcard_entries if wildcards_only else self.entries
        if regex is None:
            return None
        found = regex.fullmatch(path)
        if found is None or found.lastindex is None:
            return None
        # Alternatives are ordered most specific first and the engine returns the
        # first alternative that matches, so this is the most specific rule.
        return entries[found.lastindex - 1]


class RouteMap:
    """Route rules compiled once: ``match(method, path)`` gives the scope needed.

    The most specific rule wins: patterns are compared segment by segment from the
    left, a literal segment beating a parameter beating a wildcard, and an exact
    method beating ``GET`` (for ``HEAD``) beating ``*``. Two rules of the same shape
    and method are a configuration error, as is any invalid pattern, method or scope.

    :param rules: the scoped routes.
    :param public: patterns that need no credential, for any method (health, docs).
    :param default_scope: what an unmatched path needs: ``None`` means any valid key.
        Unmatched includes other spellings (``/ADMIN``), which a case-sensitive router
        does not send to the protected handler either.

    Matching is linear in the path length whatever the input (possessive quantifiers,
    no nested repetition; SECURITY.md T90).
    """

    __slots__ = ("_default", "_fallback", "_seen", "_tables", "default_scope", "public", "rules")

    def __init__(
        self,
        rules: Iterable[RouteRule] = (),
        *,
        public: Sequence[str] = (),
        default_scope: str | None = None,
    ) -> None:
        if isinstance(public, str):
            raise ConfigurationError("public must be a list of path patterns, not one string")
        if default_scope is not None:
            _check_scope(default_scope, "default_scope")
        self.rules = tuple(rules)
        self.public = tuple(public)
        self.default_scope = default_scope
        entries = [
            _entry(r.method, r.pattern, RouteMatch(False, r.scope, r.pattern)) for r in self.rules
        ]
        entries += [_entry("*", p, RouteMatch(True, None, p)) for p in self.public]
        _refuse_duplicates(entries)
        methods = {e.method for e in entries} - {"*"}
        if "GET" in methods:
            methods.add("HEAD")
        self._tables = {m: _table(entries, m) for m in methods}
        self._fallback = _table(entries, None)
        self._default = RouteMatch(False, default_scope, None)
        # What (method, path) pairs matched, for the few an API serves most: the match
        # is a pure function of the pair. Bounded by clearing, and short paths only, so
        # that requests with ever new paths cost memory no more than time.
        self._seen: dict[tuple[str, str], RouteMatch | None] = {}

    def __repr__(self) -> str:
        return (
            f"RouteMap({len(self.rules)} rules, public={list(self.public)}, "
            f"default_scope={self.default_scope!r})"
        )

    def match(self, method: str, path: str) -> RouteMatch | None:
        """What a request needs; ``None`` means refuse it (answer 400 or 404).

        ``None`` comes from a path :func:`normalise_path` refuses, or from a path with
        a trailing slash that two routers would send to rules needing different
        things (``/x/`` when ``/x`` and ``/x/*`` disagree: Starlette sends ``/x/``
        into a ``/x`` mount, Flask may serve it with the ``/x`` view).
        """
        key = (method, path)
        found = self._seen.get(key, _UNSEEN)
        if found is not _UNSEEN:
            return found
        found = self._match(method, path)
        if len(path) <= _SEEN_PATH_MAX:
            if len(self._seen) >= _SEEN_MAX:
                self._seen.clear()
            self._seen[key] = found
        return found

    def _match(self, method: str, path: str) -> RouteMatch | None:
        norm = normalise_path(path)
        if norm is None:
            return None
        # Methods are case-sensitive on the wire, but servers such as werkzeug's pass
        # "get" through and frameworks upper-case it to route: check as they route.
        table = self._tables.get(method if method.isupper() else method.upper(), self._fallback)
        entry = table.best(norm)
        if entry is None:
            return self._default
        if norm != path and not entry.wildcard:
            other = table.best(norm, wildcards_only=True)
            if other is not None and _needs(other) != _needs(entry):
                return None
        return entry.result


_UNSEEN = RouteMatch(False, None, "(not matched yet)")  # a marker, never an answer
_SEEN_MAX = 4096  # (method, path) pairs remembered
_SEEN_PATH_MAX = 256  # characters of a path worth remembering


def _needs(entry: _Entry) -> tuple[bool, str | None]:
    return entry.result.public, entry.result.scope


def _check_scope(scope: object, what: str) -> None:
    try:
        validate_scopes([scope])
    except InvalidInput:
        raise ConfigurationError(
            f"{what} {shown(scope)} is not a scope (like 'image:create')"
        ) from None
    if isinstance(scope, str) and "*" in scope:
        raise ConfigurationError(
            f"{what} {shown(scope)} must be a concrete scope; wildcards are for keys"
        )


def _compile(pattern: object) -> tuple[tuple[int, ...], str, str, bool]:
    """``(specificity, shape, regex, wildcard)`` of a pattern, or ConfigurationError."""
    if (
        not isinstance(pattern, str)
        or not pattern.startswith("/")
        or len(pattern) > _MAX_PATTERN
        or "//" in pattern
        or not pattern.isprintable()
        or any(ch.isspace() for ch in pattern)
    ):
        raise ConfigurationError(
            f"route pattern {shown(pattern)} must start with '/' and have no spaces or '//'"
        )
    text = pattern[:-1] if len(pattern) > 1 and pattern.endswith("/") else pattern
    segments = text[1:].split("/") if text != "/" else []
    wildcard = bool(segments) and segments[-1] == "*"
    if wildcard:
        segments.pop()
    key: list[int] = []
    regex: list[str] = []
    shape: list[str] = []
    for segment in segments:
        if _PARAM.fullmatch(segment):
            key.append(_PARAMETER)
            regex.append("/[^/]++")
            shape.append("{}")
        elif segment in (".", "..") or any(ch in "{}*" for ch in segment):
            raise ConfigurationError(
                f"route pattern {shown(pattern)}: segment {shown(segment)} is not a name, "
                "a '{param}' or a final '*'"
            )
        else:
            key.append(_LITERAL)
            regex.append("/" + re.escape(segment))
            shape.append(segment)
    key.append(_WILDCARD if wildcard else _END)
    body = "".join(regex)
    if wildcard:
        body += "(?:/.*+)?"
    return tuple(key), "/" + "/".join(shape) + ("/*" if wildcard else ""), body or "/", wildcard


def _entry(method: str, pattern: str, result: RouteMatch) -> _Entry:
    key, shape, regex, wildcard = _compile(pattern)
    return _Entry(key, shape, regex, method, wildcard, result)


def _refuse_duplicates(entries: list[_Entry]) -> None:
    seen: dict[tuple[str, str], _Entry] = {}
    for entry in entries:
        previous = seen.setdefault((entry.shape, entry.method), entry)
        if previous is not entry:
            raise ConfigurationError(
                f"route patterns {shown(previous.result.pattern)} and "
                f"{shown(entry.result.pattern)} overlap for method {shown(entry.method)}"
            )


def _method_rank(rule_method: str, method: str | None) -> int:
    if rule_method == method:
        return 2
    return 1 if rule_method == "GET" and method == "HEAD" else 0


def _table(entries: list[_Entry], method: str | None) -> _Table:
    usable = [
        e for e in entries if e.method in ("*", method) or (e.method == "GET" and method == "HEAD")
    ]
    usable.sort(key=lambda e: (e.key, _method_rank(e.method, method)), reverse=True)
    wild = [e for e in usable if e.wildcard]
    return _Table(_alternation(usable), tuple(usable), _alternation(wild), tuple(wild))


def _alternation(entries: list[_Entry]) -> re.Pattern[str] | None:
    if not entries:
        return None
    return re.compile("|".join(f"({e.regex})" for e in entries), re.DOTALL)
