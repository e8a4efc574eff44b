"""The server's own settings, beside keyguard's: upstream, body limit, timeouts.

Read from the same ``KEYGUARD_`` environment variables (``KEYGUARD_UPSTREAM_URL``,
``KEYGUARD_UPSTREAM_KEY``, ``KEYGUARD_MAX_BODY_BYTES``, ``KEYGUARD_PROVIDER_TIMEOUT``)
but kept out of :class:`keyguard.KeyGuardSettings`, which is the library's.

**Security note**: the upstream key is a :class:`~pydantic.SecretStr`, so neither
``repr`` nor an error message shows it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ServerSettings"]


class ServerSettings(BaseSettings):
    """What the reference server adds to keyguard's settings.

    :param upstream_url: an OpenAI-compatible base URL (``https://host/v1``); when
        set, chat, text, embeddings and image generation are forwarded there.
    :param upstream_key: the server's key for the upstream; never the caller's.
    :param max_body_bytes: larger request bodies get 413.
    :param provider_timeout: seconds a provider call may take before 504.
    :param alert_scan_interval: seconds between scans of the keys for expiring and
        expired ones (the alerts that no request triggers).
    """

    model_config = SettingsConfigDict(
        env_prefix="KEYGUARD_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    upstream_url: Annotated[str, Field(pattern=r"^https?://\S+$")] | None = None
    upstream_key: SecretStr | None = None
    max_body_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 2 * 1024 * 1024
    provider_timeout: Annotated[float, Field(gt=0, le=600)] = 60.0
    alert_scan_interval: Annotated[float, Field(ge=1, le=86_400)] = 3600.0
