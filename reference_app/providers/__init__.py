"""Model providers: the protocol every service calls, the offline stand-ins and the
upstream forwarder."""

from .base import (
    ChatCall,
    Completion,
    ImageEditor,
    ImageProvider,
    Message,
    ProviderFailed,
    Providers,
    ProviderTimedOut,
    SpeechProvider,
    StreamPiece,
    TextProvider,
    UnknownModel,
)

__all__ = [
    "ChatCall",
    "Completion",
    "ImageEditor",
    "ImageProvider",
    "Message",
    "ProviderFailed",
    "ProviderTimedOut",
    "Providers",
    "SpeechProvider",
    "StreamPiece",
    "TextProvider",
    "UnknownModel",
]
