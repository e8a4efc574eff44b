"""Starlette glue: the caller as ``request.user`` and ``request.auth``.

:class:`StarletteKeyGuardMiddleware` is :class:`~keyguard.adapters.asgi.KeyGuardMiddleware`
plus what Starlette's own ``AuthenticationMiddleware`` would publish, so code written
against ``request.user`` and ``@requires(...)`` keeps working. Nothing else changes:
the guard still decides before the app runs, and ``scope["keyguard"]`` still holds the
:class:`~keyguard.guard.Identity`.

Starlette's ``requires`` matches scopes exactly, so a key granted ``image:*`` does not
pass ``@requires("image:create")``; declare route scopes in the guard's
:class:`~keyguard.scopes.RouteMap`, which knows the wildcards and refuses before any
limit is charged.

.. versionadded:: 0.1
"""

from __future__ import annotations

from starlette.authentication import AuthCredentials, BaseUser, UnauthenticatedUser
from starlette.requests import HTTPConnection

from ..guard import Guard, Identity
from .asgi import ASGIApp, KeyGuardMiddleware, Receive, Scope, Send, current_identity

__all__ = ["KeyUser", "StarletteKeyGuardMiddleware", "identity"]


class KeyUser(BaseUser):
    """The API key behind a request, as a Starlette user.

    ``identity`` is the key id and ``display_name`` the key's name; ``caller`` is the
    full :class:`~keyguard.guard.Identity` (never the secret).
    """

    __slots__ = ("caller",)

    def __init__(self, caller: Identity) -> None:
        self.caller = caller

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.caller.name

    @property
    def identity(self) -> str:
        return self.caller.key_id


class _PublishUser:
    """Sets ``user`` and ``auth`` on the (already copied) scope the guard passes on."""

    __slots__ = ("app",)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            caller = current_identity(scope)
            if caller is None:  # a public path: what AuthenticationMiddleware would set
                scope["user"], scope["auth"] = UnauthenticatedUser(), AuthCredentials()
            else:
                scope["user"], scope["auth"] = KeyUser(caller), AuthCredentials(caller.scopes)
        await self.app(scope, receive, send)


class StarletteKeyGuardMiddleware(KeyGuardMiddleware):
    """:class:`~keyguard.adapters.asgi.KeyGuardMiddleware` that also sets
    ``request.user`` (a :class:`KeyUser`, or ``UnauthenticatedUser`` on public paths)
    and ``request.auth`` (the key's scopes).

    Use it instead of Starlette's ``AuthenticationMiddleware``, not with it: that
    middleware would overwrite both values.
    """

    def __init__(
        self, app: ASGIApp, *, guard: Guard, hide_credentials: bool = False, vary: bool = True
    ) -> None:
        super().__init__(
            _PublishUser(app), guard=guard, hide_credentials=hide_credentials, vary=vary
        )


def identity(request: HTTPConnection) -> Identity | None:
    """The caller's identity for ``request``; ``None`` on a public path."""
    return current_identity(request.scope)
