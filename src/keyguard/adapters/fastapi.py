"""FastAPI glue: declare a route's scope once, on the route, and have it enforced before
any limit is charged.

- ``Depends(require("chat:completions"))`` (or ``Security(...)``) gives the handler the
  caller's :class:`~keyguard.guard.Identity` and documents the key schemes and the scope
  in OpenAPI, so ``/docs`` shows the Authorize button.
- :class:`FastAPIKeyGuardMiddleware` compiles those declarations once into a
  :class:`~keyguard.scopes.RouteMap`, so a key without the scope gets its 403 before
  the limiter is touched (SECURITY.md T48).
- The dependency checks again (defence in depth) and raises :class:`KeyGuardDenied`,
  which :func:`install_exception_handler` renders byte for byte like the middleware
  (without it, FastAPI's handler still gives the right status and headers).

.. versionadded:: 0.1
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, APIKeyQuery, HTTPBearer
from starlette.convertors import Convertor, PathConvertor
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount

from ..credentials import CredentialConfig
from ..denials import TABLE, Denial, deny, render
from ..errors import ConfigurationError, shown
from ..guard import Guard, Identity
from ..scopes import RouteMap, RouteRule, scope_allows
from .asgi import ASGIApp, Receive, Scope, Send, current_identity, request_from_scope, send_denial
from .starlette import StarletteKeyGuardMiddleware

__all__ = [
    "FastAPIKeyGuardMiddleware",
    "KeyGuardDenied",
    "Require",
    "declared_rules",
    "install_exception_handler",
    "require",
]

_Scheme = APIKeyHeader | HTTPBearer | APIKeyQuery
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class KeyGuardDenied(HTTPException):
    """A refusal from :class:`Require`, carrying its :class:`~keyguard.denials.Denial`."""

    def __init__(self, denial: Denial, *, realm: str = "api") -> None:
        status, headers, _ = render(denial, realm=realm)
        own = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
        for name in ("content-type", "content-length"):  # the response sets its own
            own.pop(name, None)
        super().__init__(status, detail=TABLE[denial.code].message, headers=own)
        self.denial = denial


class Require:
    """A dependency that returns the caller's identity if the key grants ``scope``.

    Build it with :func:`require`. Its signature carries FastAPI security schemes for
    each accepted credential method, with ``scope`` as the requirement's scope.
    """

    __slots__ = ("__signature__", "scope")

    def __init__(self, scope: str | None, credentials: CredentialConfig) -> None:
        if scope is not None:
            RouteRule("*", "/", scope)  # refuses a wildcard or a malformed scope here
        self.scope = scope
        self.__signature__ = _signature(scope, credentials)

    async def __call__(self, request: Request, **_schemes: object) -> Identity:
        caller = current_identity(request.scope)
        if caller is None:  # a public path, or no keyguard middleware at all
            raise KeyGuardDenied(deny("missing_api_key"))
        needed = self.scope
        if needed is not None and not scope_allows(caller.scopes, needed):
            denial = deny("insufficient_permissions", scope=needed, detail=f"needs {needed}")
            raise KeyGuardDenied(denial)
        return caller

    def __repr__(self) -> str:
        return f"require({self.scope!r})"


def require(scope: str | None = None, *, credentials: CredentialConfig | None = None) -> Require:
    """``Depends(require("text:generate"))``: the caller's identity, if the key grants
    ``scope`` (any valid key when ``scope`` is ``None``).

    :param credentials: the guard's credential settings, so the OpenAPI schemes name
        the right header and show query auth only when it is enabled.
    """
    return Require(scope, credentials or CredentialConfig())


def _signature(scope: str | None, config: CredentialConfig) -> inspect.Signature:
    scopes = [] if scope is None else [scope]
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("request", keyword, annotation=Request)]
    params += [
        inspect.Parameter(name, keyword, default=Security(scheme, scopes=scopes), annotation=Any)
        for name, scheme in _schemes(config)
    ]
    return inspect.Signature(params, return_annotation=Identity)


@lru_cache(maxsize=16)
def _schemes(config: CredentialConfig) -> tuple[tuple[str, _Scheme], ...]:
    """One set of scheme objects per configuration, shared by every :class:`Require`,
    so a route with several requirements reads each credential once per request."""
    schemes: list[tuple[str, _Scheme]] = []
    if "header" in config.methods:
        header = APIKeyHeader(name=_title(config.header_name), auto_error=False)
        schemes.append(("api_key", header))
    if "bearer" in config.methods:
        schemes.append(("bearer", HTTPBearer(auto_error=False)))
    if "query" in config.methods:
        query = APIKeyQuery(name=config.query_param, auto_error=False)
        schemes.append(("api_key_query", query))
    return tuple(schemes)


def _title(header: str) -> str:
    return "-".join("API" if part == "api" else part.title() for part in header.split("-"))


def install_exception_handler(app: FastAPI, *, realm: str = "api") -> None:
    """Render :class:`KeyGuardDenied` through the denial table, exactly as the
    middleware renders its refusals. Pass the guard's ``realm``."""

    async def handler(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, KeyGuardDenied):  # pragma: no cover - registered for it only
            raise exc
        status, headers, body = render(exc.denial, realm=realm)
        response = Response(body, status_code=status)
        response.raw_headers = headers
        return response

    app.add_exception_handler(KeyGuardDenied, handler)


# -- reading the declarations from the routes ------------------------------------------


def declared_rules(routes: Iterable[BaseRoute], prefix: str = "") -> list[RouteRule]:
    """The :class:`~keyguard.scopes.RouteRule` of every route that declares a scope
    with :func:`require`, including routes of mounted FastAPI apps.

    When several routes have the same method and shape, the first one wins, as in
    Starlette's router. A route with several scoped requirements is entered under the
    first; the dependencies still check every one, after the limits.

    :raises ConfigurationError: a scoped route whose path puts a parameter inside a
        segment (``/items/{id}.json``), which a route rule cannot express.
    """
    rules: dict[tuple[str, str], RouteRule] = {}
    for route in routes:
        found: list[RouteRule] = []
        if isinstance(route, APIRoute) or _is_effective_route(route):
            found = _route_rules(route, prefix)
        elif isinstance(route, Mount):
            found = declared_rules(route.routes, prefix + route.path)
        else:
            # FastAPI 0.16x keeps include_router() routers as lazy wrappers whose
            # routes (prefix and router dependencies applied) appear only through
            # effective_candidates(); missing them would leave an included route
            # to "any key", charged before its dependency refuses (a security gap).
            candidates = getattr(route, "effective_candidates", None)
            if callable(candidates):
                found = declared_rules(candidates(), prefix)
        for rule in found:
            rules.setdefault((rule.method, rule.pattern), rule)
    return list(rules.values())


def _is_effective_route(route: object) -> bool:
    """A FastAPI 0.16x route of an included router: what an APIRoute would tell."""
    return all(hasattr(route, name) for name in ("dependant", "path_format", "methods"))


def _route_rules(route: Any, prefix: str) -> list[RouteRule]:  # noqa: ANN401 - two shapes
    scope = _declared_scope(route.dependant)
    if scope is None:
        return []
    pattern = _pattern(prefix + route.path_format, route.param_convertors)
    return [RouteRule(m, pattern, scope) for m in sorted(route.methods or {"*"})]


def _declared_scope(dependant: Dependant) -> str | None:
    for sub in dependant.dependencies:
        if isinstance(sub.call, Require) and sub.call.scope is not None:
            return sub.call.scope
        scope = _declared_scope(sub)
        if scope is not None:
            return scope
    return None


def _pattern(path: str, convertors: Mapping[str, Convertor[Any]]) -> str:
    """A route's path as a rule pattern: ``{name}`` segments become ``{p}``, so equal
    shapes compare equal, and a ``{name:path}`` segment ends it with ``*``."""
    segments: list[str] = []
    for segment in path.strip("/").split("/"):
        param = _PARAM.fullmatch(segment)
        if param is None and "{" in segment:
            raise ConfigurationError(
                f"route {shown(path)}: keyguard cannot map a parameter inside a segment; "
                "give the scope in the guard's RouteMap instead"
            )
        if param is not None and isinstance(convertors.get(param[1]), PathConvertor):
            segments.append("*")
            break
        segments.append(segment if param is None else "{p}")
    return "/" + "/".join(segments)


class FastAPIKeyGuardMiddleware(StarletteKeyGuardMiddleware):
    """:class:`~keyguard.adapters.starlette.StarletteKeyGuardMiddleware` that also
    enforces the scopes declared with :func:`require`, before limits are charged.

    ``app.add_middleware(FastAPIKeyGuardMiddleware, guard=guard)``. On a declared route
    the declared scope is what the key needs (it replaces the guard's route map there);
    every other path follows the guard's :class:`~keyguard.scopes.RouteMap`. Routes are
    read once, at startup or on the first request.
    """

    def __init__(
        self, app: ASGIApp, *, guard: Guard, hide_credentials: bool = False, vary: bool = True
    ) -> None:
        super().__init__(app, guard=guard, hide_credentials=hide_credentials, vary=vary)
        self._inner = app
        self._declared: RouteMap | None = None
        self._scanned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = self._declared if self._scanned else self._scan(scope)
        if scope["type"] != "http":
            await self.pass_through(scope, receive, send)
            return
        started = time.perf_counter()
        request = request_from_scope(scope)
        needed = None
        if declared is not None:
            match = declared.match(request.method, request.path)
            if match is None:  # a path form the router and the check could read apart
                denial = deny("invalid_request", detail="unsupported path")
                await send_denial(denial, send, realm=self.guard.realm, extra=self._vary)
                return
            needed = match.scope
        decision = await self.guard.acheck(request, scope=needed)
        if isinstance(decision, Denial):
            await send_denial(decision, send, realm=self.guard.realm, extra=self._vary)
            return
        await self._call_app(scope, receive, send, request, decision, started=started)

    def _scan(self, scope: Scope) -> RouteMap | None:
        target = scope.get("app", self._inner)
        rules = declared_rules(getattr(target, "routes", ()))
        self._declared = RouteMap(rules) if rules else None
        self._scanned = True
        return self._declared
