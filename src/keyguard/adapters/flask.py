"""Flask glue: an extension with ``init_app`` and a ``require`` decorator.

The check runs in ``before_request``, after Flask has routed the request, so the scope
a view declares with ``@kg.require(...)`` is known and refused (403) before any limit
is charged. The caller's :class:`~keyguard.guard.Identity` is ``g.keyguard`` (or
:func:`current_identity`); limit headers are added in ``after_request``; a concurrency
slot is released once, when the response is closed (after the last chunk of a
streamed body) or, when the request fails before a response exists, on teardown.

Options come from the constructor or from one ``app.config["KEYGUARD"]`` mapping
(keys ``guard`` and ``vary``). **Precedence: an argument given to the constructor
wins over the same key in the mapping**; nothing is read from the environment.

.. versionadded:: 0.1
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

from flask import Flask, Response, current_app, g, request
from flask.typing import ResponseReturnValue

from ..denials import Denial, deny, render
from ..errors import ConfigurationError
from ..guard import Allow, Guard, Identity
from ..request import RequestInfo
from ..scopes import RouteRule, scope_allows
from .wsgi import guarded_headers, request_from_environ

__all__ = ["KeyGuardFlask", "current_identity"]

View = TypeVar("View", bound=Callable[..., Any])
_OPTIONS = frozenset({"guard", "vary"})
_STATE = "_keyguard_state"


def current_identity() -> Identity | None:
    """The identity of the current request's caller; ``None`` on a public path."""
    caller = g.get("keyguard")
    return caller if isinstance(caller, Identity) else None


@dataclass(frozen=True, slots=True)
class _Settings:
    """One app's resolved options."""

    guard: Guard
    vary: tuple[tuple[str, str], ...]
    scopes: Mapping[Callable[..., Any], str]
    wanted: Mapping[str, bytes]  # the environ keys of the headers the guard reads

    def refusal(self, denial: Denial) -> Response:
        return _refusal(denial, self.guard.realm, self.vary)


def _refusal(
    denial: Denial, realm: str = "api", vary: tuple[tuple[str, str], ...] = ()
) -> Response:
    status, headers, body = render(denial, realm=realm)
    return current_app.response_class(body, status=status, headers=[*_text(headers), *vary])


def _text(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


class _Request:
    """What ``after_request`` and teardown need: the decision, and a once-only end
    that records usage and releases the lease."""

    __slots__ = ("allow", "guard", "info", "started", "status")

    def __init__(self, guard: Guard, allow: Allow, info: RequestInfo, started: float) -> None:
        self.guard: Guard | None = guard
        self.allow = allow
        self.info = info
        self.started = started
        self.status = 500  # what Flask answers when the view raised

    def release(self) -> None:
        guard, self.guard = self.guard, None
        if guard is None:
            return
        try:
            guard.finished(self.info, self.allow, self.status, self.started)
        finally:
            if self.allow.lease is not None:
                guard.release(self.allow.lease)


class KeyGuardFlask:
    """Guard every request of a Flask app.

    :param app: the app, or ``None`` to call :meth:`init_app` later (app factories).
    :param guard: the configured :class:`~keyguard.guard.Guard`.
    :param vary: add ``Vary: Authorization, X-API-Key`` to allowed responses.
    """

    def __init__(
        self, app: Flask | None = None, *, guard: Guard | None = None, vary: bool | None = None
    ) -> None:
        self._given: dict[str, object] = {
            k: v for k, v in {"guard": guard, "vary": vary}.items() if v is not None
        }
        self._scopes: dict[Callable[..., Any], str] = {}
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Install the hooks on ``app``; options as described in the module docs."""
        options = {**app.config.get("KEYGUARD", {}), **self._given}
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ConfigurationError(f"unknown KEYGUARD options: {sorted(unknown)}")
        guard = options.get("guard")
        if not isinstance(guard, Guard):
            raise ConfigurationError("KeyGuardFlask needs a guard (argument or KEYGUARD['guard'])")
        wants_vary = options.get("vary", True)
        if not isinstance(wants_vary, bool):
            raise ConfigurationError("KEYGUARD['vary'] must be True or False")
        header = guard.credentials.header_name
        vary = (("Vary", f"Authorization, {header}"),) if wants_vary else ()
        app.extensions["keyguard"] = settings = _Settings(
            guard, vary, self._scopes, guarded_headers(guard)
        )
        app.before_request(functools.partial(_before, settings))
        app.after_request(functools.partial(_after, settings))
        app.teardown_request(_teardown)

    def require(self, scope: str) -> Callable[[View], View]:
        """Mark a view as needing ``scope``; apply above or below ``@app.route``.

        The scope is checked in ``before_request``; the view checks again when it runs
        (so a view on an app without the extension refuses rather than serves).
        """
        RouteRule("*", "/", scope)  # refuses a wildcard or a malformed scope now

        def mark(view: View) -> View:
            @functools.wraps(view)
            def guarded(*args: Any, **kwargs: Any) -> ResponseReturnValue:
                refusal = _recheck(scope)
                if refusal is not None:
                    return refusal
                return cast(ResponseReturnValue, current_app.ensure_sync(view)(*args, **kwargs))

            self._scopes[view] = self._scopes[guarded] = scope
            return cast(View, guarded)

        return mark


def _before(settings: _Settings) -> Response | None:
    started = time.perf_counter()
    view = current_app.view_functions.get(request.endpoint or "")
    info = request_from_environ(request.environ, settings.wanted)
    if request.url_rule is not None:
        info = replace(info, route_id=request.url_rule.rule)
    decision = settings.guard.check(info, scope=settings.scopes.get(view) if view else None)
    if isinstance(decision, Denial):
        return settings.refusal(decision)
    g.keyguard = decision.identity
    setattr(g, _STATE, _Request(settings.guard, decision, info, started))
    return None


def _after(settings: _Settings, response: Response) -> Response:
    state: _Request | None = g.get(_STATE)
    caller = None if state is None else state.allow.identity
    if state is None or caller is None:
        return response
    response.headers.extend([*_text(state.allow.headers), *settings.vary])
    if caller.auth_method == "query":
        response.headers.setdefault("Cache-Control", "private")  # RFC 6750 §2.3
    if state.allow.lease is not None or settings.guard.usage is not None:
        state.status = response.status_code
        response.call_on_close(state.release)
    return response


def _teardown(exc: BaseException | None) -> None:
    state: _Request | None = g.get(_STATE)
    if exc is not None and state is not None:
        state.release()


def _recheck(scope: str) -> Response | None:
    caller = current_identity()
    if caller is not None and scope_allows(caller.scopes, scope):
        return None
    settings = current_app.extensions.get("keyguard")
    render_as = settings.refusal if isinstance(settings, _Settings) else _refusal
    if caller is None:  # a public path, or the extension is not on this app
        return render_as(deny("missing_api_key"))
    return render_as(deny("insufficient_permissions", scope=scope, detail=f"needs {scope}"))
