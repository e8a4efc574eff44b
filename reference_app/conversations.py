"""Conversations: messages kept per tenant, with the context trimmed to a budget.

A conversation belongs to the tenant that made it (the key's owner, or the key
itself when it has none); any other tenant gets 404, as if it did not exist. The
context sent to the model is the system prompt plus the newest messages that fit
the conversation's token budget, so a long conversation never outgrows the model.
The book lives in this process and is bounded: the oldest conversations go first.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from keyguard import Identity

from .providers import Message
from .tokens import count_tokens

__all__ = ["Conversation", "ConversationBook", "tenant_of", "trim_context"]


def tenant_of(identity: Identity) -> str:
    """Whose data a caller sees: its key's owner, or only its own key's."""
    return identity.owner if identity.owner is not None else "key:" + identity.key_id


@dataclass
class Conversation:
    id: str
    tenant: str
    created: int
    budget: int
    system: str | None = None
    messages: list[Message] = field(default_factory=list)


def trim_context(
    system: str | None, messages: list[Message], budget: int
) -> tuple[list[Message], int]:
    """The messages to send (system first, then the newest that fit) and how many
    older ones were left out. The newest message is always sent."""
    used = count_tokens(system) if system else 0
    kept: list[Message] = []
    for message in reversed(messages):
        cost = count_tokens(message.content)
        if kept and used + cost > budget:
            break
        kept.append(message)
        used += cost
    kept.reverse()
    head = [Message("system", system)] if system else []
    return head + kept, len(messages) - len(kept)


class ConversationBook:
    """Every conversation of this process, bounded in count and length."""

    def __init__(self, *, max_conversations: int = 10_000, max_messages: int = 200) -> None:
        self._items: OrderedDict[str, Conversation] = OrderedDict()
        self.max_conversations = max_conversations
        self.max_messages = max_messages

    def create(self, tenant: str, *, system: str | None, budget: int) -> Conversation:
        conversation = Conversation(
            "conv_" + secrets.token_hex(12), tenant, int(time.time()), budget, system
        )
        self._items[conversation.id] = conversation
        while len(self._items) > self.max_conversations:
            self._items.popitem(last=False)
        return conversation

    def get(self, tenant: str, conversation_id: str) -> Conversation | None:
        found = self._items.get(conversation_id)
        return found if found is not None and found.tenant == tenant else None

    def append(self, conversation: Conversation, *messages: Message) -> None:
        conversation.messages.extend(messages)
        del conversation.messages[: -self.max_messages]

    def delete(self, tenant: str, conversation_id: str) -> bool:
        if self.get(tenant, conversation_id) is None:
            return False
        del self._items[conversation_id]
        return True
