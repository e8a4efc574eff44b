"""What every router needs, built once per app: providers, the meter, the key
manager, and the credential settings that shape the OpenAPI security schemes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from fastapi import Depends

from keyguard import AsyncKeyManager, Guard, Identity, KeyGuardSettings
from keyguard.adapters.fastapi import require
from keyguard.credentials import CredentialConfig

from .admin.quota_book import QuotaBook
from .conversations import ConversationBook
from .errors import ApiError
from .metering import Meter
from .providers import ChatCall, Completion, ProviderFailed, Providers, UnknownModel
from .tokens import count_tokens


def most_tokens(call: ChatCall) -> int:
    """The most a chat call may cost in units: its prompt and its answer's cap."""
    return sum(count_tokens(m.content) for m in call.messages) + call.max_tokens


__all__ = ["Context", "most_tokens"]


@dataclass
class Context:
    """The shared state of one server."""

    settings: KeyGuardSettings
    providers: Providers
    manager: AsyncKeyManager
    credentials: CredentialConfig
    meter: Meter = field(default_factory=Meter)
    conversations: ConversationBook = field(default_factory=ConversationBook)
    quota_requests: QuotaBook = field(default_factory=QuotaBook)
    guard: Guard | None = None  # set once the guard is built from the declared routes

    def caller(self, scope: str) -> Identity:
        """``Depends`` on the caller's identity, declaring and re-checking ``scope``.

        Typed as the :class:`Identity` FastAPI injects, so it reads as a default:
        ``caller: Identity = needs``.

        The guard already refused a key without ``scope`` (before charging limits);
        the dependency documents the scope and key schemes in OpenAPI.
        """
        return cast(Identity, Depends(require(scope, credentials=self.credentials)))

    async def complete(self, identity: Identity, call: ChatCall) -> Completion:
        """Run a chat call: reserve its most, settle to the tokens used; refund on
        failure."""
        await self.meter.reserve(identity, most_tokens(call))
        try:
            done = await self.providers.text.chat(call)
        except (ProviderFailed, UnknownModel, ApiError):
            await self.meter.refund(identity)
            raise
        await self.meter.settle(identity, done.total_tokens)
        return done
