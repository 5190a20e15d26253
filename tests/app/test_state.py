"""The state backend: settings, and one Redis client per app that survives Redis going away."""

from __future__ import annotations

import pytest

from inference_server.settings import ConfigError
from inference_server.state import REDIS, REDIS_HEALTH
from tests.support.redis_server import RedisServer


def test_redis_backend_needs_a_redis_url(make_settings) -> None:
    with pytest.raises(ConfigError) as info:
        make_settings({"state": {"backend": "redis"}})
    assert "state.redis_url: required with state.backend: redis" in info.value.problems
    with pytest.raises(ConfigError) as info:
        make_settings({"state": {"backend": "redis", "redis_url": "http://x"}})
    assert any(p.startswith("state.redis_url: must start with") for p in info.value.problems)
    settings = make_settings(
        {"state": {"backend": "redis", "redis_url": "redis://:hunter2@127.0.0.1:1/0"}}
    )
    assert "hunter2" not in repr(settings.state)


async def test_memory_backend_has_no_client(make_settings, make_gateway) -> None:
    client = await make_gateway(make_settings({"inference": {"provider": "mock"}}))
    assert client.app[REDIS] is None


async def test_one_client_per_app_that_reconnects_after_redis_returns(
    make_settings, make_gateway, redis_server: RedisServer
) -> None:
    settings = make_settings(
        {
            "inference": {"provider": "mock"},
            "state": {"backend": "redis", "redis_url": redis_server.url, "timeout_secs": 0.5},
        }
    )
    client = await make_gateway(settings)
    redis = client.app[REDIS]
    assert redis is not None
    assert await redis.ping()
    redis_server.stop()
    with pytest.raises(Exception):  # noqa: B017, PT011 (whatever redis-py raises when down)
        await redis.ping()
    client.app[REDIS_HEALTH].failed("ping", RuntimeError("down"))
    assert client.app[REDIS_HEALTH].failures == 1
    redis_server.start()
    assert await redis.ping()
    # Chat does not depend on Redis until a feature uses it.
    resp = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    assert resp.status == 200
