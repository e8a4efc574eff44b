"""Fixtures for the usage tests: the throwaway Redis deployments."""

from __future__ import annotations

from tests.redis_support import redis_cluster, redis_server

__all__ = ["redis_cluster", "redis_server"]
