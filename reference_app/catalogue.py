"""The services the server offers: the scope each needs and what it costs in units.

One table, read by the routers (each route declares its scope from here), by the
guard (per-service costs) and by first run (the demo key gets every service scope).
A unit is one token for text and chat, and a fixed price for media.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from keyguard import ServiceLimits

__all__ = ["ADMIN_SCOPE", "SELF_SCOPE", "SERVICES", "SERVICE_SCOPES", "Service"]

ADMIN_SCOPE = "admin"
"""Grants the key API across every owner, and any scope or limit."""
SELF_SCOPE = "keys:self"
"""Grants the key API within the caller's own owner, never beyond its own grants."""


class Service:
    """Scope names, so a typo is a NameError at import, not a 403 at run time."""

    TEXT_GENERATE = "text:generate"
    TEXT_CODE = "text:code"
    TEXT_TRANSLATE = "text:translate"
    TEXT_SUMMARIZE = "text:summarize"
    TEXT_EMBED = "text:embed"
    IMAGE_CREATE = "image:create"
    IMAGE_EDIT = "image:edit"
    IMAGE_STYLE = "image:style"
    IMAGE_ANALYZE = "image:analyze"
    AUDIO_SPEECH = "audio:speech"
    AUDIO_TRANSCRIBE = "audio:transcribe"
    AUDIO_CLONE = "audio:clone"
    AUDIO_PROCESS = "audio:process"
    CHAT_COMPLETIONS = "chat:completions"
    CHAT_BOT = "chat:bot"
    CHAT_CONVERSATIONS = "chat:conversations"


# Text and chat are admitted at one unit, reserve their prompt and max_tokens once the
# body is read, and settle to their real token count (see reference_app.metering);
# media have a flat price.
SERVICES: Mapping[str, ServiceLimits] = MappingProxyType(
    {
        Service.TEXT_GENERATE: ServiceLimits(cost=1),
        Service.TEXT_CODE: ServiceLimits(cost=1),
        Service.TEXT_TRANSLATE: ServiceLimits(cost=1),
        Service.TEXT_SUMMARIZE: ServiceLimits(cost=1),
        Service.TEXT_EMBED: ServiceLimits(cost=1),
        Service.IMAGE_CREATE: ServiceLimits(cost=50),
        Service.IMAGE_EDIT: ServiceLimits(cost=50),
        Service.IMAGE_STYLE: ServiceLimits(cost=50),
        Service.IMAGE_ANALYZE: ServiceLimits(cost=10),
        Service.AUDIO_SPEECH: ServiceLimits(cost=20),
        Service.AUDIO_TRANSCRIBE: ServiceLimits(cost=20),
        Service.AUDIO_CLONE: ServiceLimits(cost=100),
        Service.AUDIO_PROCESS: ServiceLimits(cost=10),
        Service.CHAT_COMPLETIONS: ServiceLimits(cost=1),
        Service.CHAT_BOT: ServiceLimits(cost=1),
        Service.CHAT_CONVERSATIONS: ServiceLimits(cost=1),
    }
)
SERVICE_SCOPES: tuple[str, ...] = tuple(SERVICES)
