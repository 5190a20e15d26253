"""The response cache on Redis: shared by two gateways, compressed when large, and Redis going
away (served from the upstream, counted) and coming back (used again, no restart)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from inference_server.cache import CACHE, RedisStore
from tests.support.fake_upstream import Action, FakeUpstream
from tests.support.redis_server import RedisServer

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def redis_config(url: str, **cache: Any) -> dict[str, Any]:
    return {
        "state": {"backend": "redis", "redis_url": url, "timeout_secs": 0.5},
        "cache": {"enabled": True, "backend": "redis", **cache},
    }


async def test_two_gateways_share_entries_and_replay_streams(
    gateway_for, fake_upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    one = await gateway_for(**redis_config(redis_server.url, compress_min_bytes=0))
    two = await gateway_for(**redis_config(redis_server.url, compress_min_bytes=0))
    assert isinstance(one.app[CACHE].store, RedisStore)
    first = await one.post(CHAT, json={"messages": HI})
    assert first.headers["x-inference-cache"] == "miss"
    await asyncio.wait_for(asyncio.gather(*one.app[CACHE].store.tasks), 5)
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_server.url)
    keys = await redis.keys("inference:cache:v1:*")
    assert len(keys) == 1  # the entry; the lock went with the write
    assert 299_000 < await redis.pttl(keys[0]) <= 300_000  # cache.ttl_secs, kept by Redis
    raw = await redis.get(keys[0])
    assert isinstance(raw, bytes)
    assert raw[:1] == b"z"  # compress_min_bytes: 0
    await redis.aclose()
    hit = await two.post(CHAT, json={"messages": HI})
    assert hit.headers["x-inference-cache"] == "hit"
    assert await hit.json() == await first.json()
    streamed = await two.post(CHAT, json={"messages": HI, "stream": True})
    assert streamed.headers["x-inference-cache"] == "hit"
    assert (await streamed.read()).endswith(b"data: [DONE]\n\n")
    assert len(fake_upstream.requests) == 1


async def test_replicas_coalesce_through_a_redis_lock(
    gateway_for, fake_upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    one = await gateway_for(**redis_config(redis_server.url))
    two = await gateway_for(**redis_config(redis_server.url))
    fake_upstream.always = Action(delay=0.3)
    responses = await asyncio.gather(
        *(gw.post(CHAT, json={"messages": HI}) for gw in (one, two, one, two))
    )
    assert [r.status for r in responses] == [200] * 4
    assert sorted(r.headers["x-inference-cache"] for r in responses) == ["hit"] * 3 + ["miss"]
    assert len(fake_upstream.requests) == 1


async def test_redis_killed_serves_uncached_and_recovers(
    gateway_for, fake_upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    client = await gateway_for(**redis_config(redis_server.url))
    cache = client.app[CACHE]
    assert cache is not None
    await client.post(CHAT, json={"messages": HI})
    await asyncio.wait_for(asyncio.gather(*cache.store.tasks), 5)
    assert (await client.post(CHAT, json={"messages": HI})).headers["x-inference-cache"] == "hit"
    redis_server.stop()
    for stream in (False, True, False):
        resp = await client.post(CHAT, json={"messages": HI, "stream": stream})
        assert resp.status == 200
        assert resp.headers["x-inference-cache"] == "miss"
        await resp.read()
    assert len(fake_upstream.requests) == 4
    metrics = (await (await client.get("/metrics")).read()).decode()
    assert 'inference_cache_errors_total{operation="get"}' in metrics
    redis_server.start()
    deadline = time.monotonic() + 10
    seen: list[str] = []
    while "hit" not in seen:  # Redis is asked again a second after the last failure
        assert time.monotonic() < deadline, seen
        resp = await client.post(CHAT, json={"messages": HI})
        assert resp.status == 200
        seen.append(resp.headers["x-inference-cache"])
        await asyncio.sleep(0.1)
    assert (await client.get("/health")).status == 200


def test_large_values_are_compressed_and_read_back() -> None:
    from inference_server.cache import Entry

    entry = Entry(b'{"x": "' + b"a" * 5000 + b'"}', 123.5, 0.0)
    raw = RedisStore.encode(entry, 1024)
    assert len(raw) < 200
    back = RedisStore.decode(raw)
    assert back is not None
    assert (back.payload, back.stored_at) == (entry.payload, 123.5)
    small = RedisStore.encode(Entry(b"{}", 1.0, 0.0), 1024)
    assert RedisStore.decode(small) is not None
    assert RedisStore.decode(b"z" + b"\x00" * 8 + b"not zlib") is None


async def test_a_leader_that_leaves_while_waiting_leaves_no_flight_behind(
    gateway_for, fake_upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    import aiohttp
    from redis.asyncio import Redis

    client = await gateway_for(**redis_config(redis_server.url))
    cache = client.app[CACHE]
    assert cache is not None
    redis = Redis.from_url(redis_server.url)
    # Another replica is asking the upstream for this request right now (its lock).
    await redis.set(f"inference:cache:v1:lock:{_key()}", "elsewhere", px=30_000)
    with contextlib.suppress(TimeoutError):
        await client.post(
            CHAT, json={"messages": HI}, timeout=aiohttp.ClientTimeout(total=0.3)
        )  # the client gives up while the gateway waits for the other replica
    deadline = time.monotonic() + 5
    while cache.flights:  # the handler is cancelled once the server sees the disconnect
        assert time.monotonic() < deadline, cache.flights
        await asyncio.sleep(0.02)
    await redis.delete(f"inference:cache:v1:lock:{_key()}")
    await redis.aclose()
    resp = await client.post(CHAT, json={"messages": HI}, timeout=aiohttp.ClientTimeout(total=5))
    assert resp.status == 200
    assert resp.headers["x-inference-cache"] == "miss"
    assert len(fake_upstream.requests) == 1


def _key() -> str:
    from inference_server.cache import cache_key

    return cache_key("", "gpt-oss-20b", {"model": "gpt-oss-20b", "messages": HI})
