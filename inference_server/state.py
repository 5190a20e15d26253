"""Shared state: the one Redis client of a process (``state.backend: redis``), or none.

Rate limits, usage ledgers, virtual keys and the response cache keep their state either in this
process (``memory``, the default) or in Redis, so every worker and replica shares it.  The app
owns one ``redis.asyncio.Redis`` (one connection pool) per process, like its one HTTP session;
features borrow it through :data:`REDIS` and never close it.

Redis being down is an expected condition, not a crash: the client is created without
connecting (the first command connects), every command is bounded by ``state.timeout_secs``,
and each feature applies ``state.on_error`` (``allow``: carry on without shared state, log once
per interval, count it; ``deny``: 503).  :class:`RedisHealth` rate-limits the log line and
remembers the last failure for /health.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from loguru import logger
from redis.asyncio import Redis

from inference_server.keys import SETTINGS
from inference_server.settings import StateSettings

#: The process's Redis client, or None with the memory backend.
REDIS: web.AppKey[Redis | None] = web.AppKey("redis")
#: One failure log line per this many seconds at most (each failure is still counted).
LOG_EVERY_SECS = 10.0


def make_redis(settings: StateSettings) -> Redis | None:
    """A client for ``settings.redis_url`` (no connection is made until the first command)."""
    if settings.backend != "redis" or not settings.redis_url:
        return None
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.timeout_secs,
        socket_connect_timeout=settings.timeout_secs,
        health_check_interval=30,
    )


@dataclass(slots=True)
class RedisHealth:
    """What the features saw of Redis: failures counted, logged at most once per interval."""

    failures: int = 0
    last_error: str | None = None
    last_failure_at: float = 0.0
    _logged_at: float = float("-inf")

    def failed(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = f"{what}: {type(exc).__name__}: {exc}"
        now = time.monotonic()
        self.last_failure_at = now
        if now - self._logged_at >= LOG_EVERY_SECS:
            self._logged_at = now
            logger.warning(
                "redis unreachable ({}); state.on_error applies ({} failures so far)",
                self.last_error,
                self.failures,
            )


REDIS_HEALTH = web.AppKey("redis_health", RedisHealth)


async def state_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the Redis client lives exactly as long as the app."""
    client = make_redis(app[SETTINGS].state)
    app[REDIS] = client
    app[REDIS_HEALTH] = RedisHealth()
    yield
    if client is not None:
        await client.aclose()
