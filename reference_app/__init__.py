"""The bundled reference server: keyguard in front of AI service routes."""

from .app import create_app

__all__ = ["create_app"]
