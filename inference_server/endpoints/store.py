"""Stored responses of the Responses API: this process's memory, or Redis (``state.backend``).

A record is the ``response`` object plus the conversation it ended (input and output items), so
``previous_response_id`` continues it on any provider.  Memory is bounded (``responses.
max_stored`` per worker, oldest dropped) and expires after ``responses.retention_secs``; Redis
keys expire by themselves (``SET … EX``).  Redis down: a failed write follows ``state.on_error``
(allow: the answer is still sent, unstored; deny: 503); a failed read is a 503, since
continuing without the conversation would silently answer something else.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import orjson
from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from inference_server.errors import ServiceUnavailable
from inference_server.keys import SETTINGS
from inference_server.state import REDIS, REDIS_HEALTH, RedisHealth

#: Redis key prefix of stored responses.
PREFIX = "inference:response:"


class ResponseStore(Protocol):
    async def get(self, rid: str) -> dict[str, Any] | None: ...

    async def put(self, rid: str, record: dict[str, Any]) -> None: ...

    async def delete(self, rid: str) -> bool: ...


class MemoryStore:
    """Records as JSON bytes in insertion order: at most ``max_stored``, each for
    ``retention_secs`` (expired ones dropped when met and as new ones push the oldest out)."""

    def __init__(
        self, retention_secs: float, max_stored: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.retention = retention_secs
        self.max_stored = max_stored
        self.clock = clock
        self.items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, rid: str) -> dict[str, Any] | None:
        entry = self.items.get(rid)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            del self.items[rid]
            return None
        record: dict[str, Any] = orjson.loads(entry[1])
        return record

    async def put(self, rid: str, record: dict[str, Any]) -> None:
        if self.max_stored <= 0:
            return
        self.items[rid] = (self.clock() + self.retention, orjson.dumps(record))
        self.items.move_to_end(rid)
        while len(self.items) > self.max_stored:
            self.items.popitem(last=False)

    async def delete(self, rid: str) -> bool:
        return self.items.pop(rid, None) is not None


class RedisStore:
    """Records under ``inference:response:<id>`` with a TTL, shared by workers and replicas."""

    def __init__(self, redis: Redis, retention_secs: int, health: RedisHealth, deny: bool) -> None:
        self.redis = redis
        self.retention = retention_secs
        self.health = health
        self.deny = deny

    def _unavailable(self, what: str, exc: BaseException) -> ServiceUnavailable:
        self.health.failed(f"response store {what}", exc)
        return ServiceUnavailable("The response store (Redis) is unreachable; try again later")

    async def get(self, rid: str) -> dict[str, Any] | None:
        try:
            raw = await self.redis.get(PREFIX + rid)
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._unavailable("read", exc) from exc
        if raw is None:
            return None
        record: dict[str, Any] = orjson.loads(raw)
        return record

    async def put(self, rid: str, record: dict[str, Any]) -> None:
        try:
            await self.redis.set(PREFIX + rid, orjson.dumps(record), ex=self.retention)
        except (RedisError, OSError, TimeoutError) as exc:
            err = self._unavailable("write", exc)
            if self.deny:
                raise err from exc

    async def delete(self, rid: str) -> bool:
        try:
            return bool(await self.redis.delete(PREFIX + rid))
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._unavailable("delete", exc) from exc


RESPONSE_STORE: web.AppKey[ResponseStore] = web.AppKey("response_store")


async def response_store_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx (after ``state_ctx``): the store on the app's Redis client, or in memory."""
    settings = app[SETTINGS]
    redis = app[REDIS]
    retention = settings.responses.retention_secs
    store: ResponseStore
    if redis is not None:
        store = RedisStore(redis, retention, app[REDIS_HEALTH], settings.state.on_error == "deny")
    else:
        store = MemoryStore(retention, settings.responses.max_stored)
    app[RESPONSE_STORE] = store
    yield
