"""Stored responses: memory (bounded, expiring) and Redis (shared between gateways, expiring,
Redis down handled per state.on_error)."""

from __future__ import annotations

from typing import Any

import pytest

from inference_server.endpoints.store import PREFIX, MemoryStore
from inference_server.state import REDIS
from tests.support.redis_server import RedisServer


async def test_memory_store_is_bounded_and_expires() -> None:
    now = [0.0]
    store = MemoryStore(retention_secs=10, max_stored=2, clock=lambda: now[0])
    for rid in ("a", "b", "c"):
        await store.put(rid, {"response": {"id": rid}})
    assert await store.get("a") is None  # the oldest went when the third came
    assert await store.get("b") == {"response": {"id": "b"}}
    now[0] = 10.0
    assert await store.get("c") is None  # retention over
    assert "c" not in store.items
    assert not await store.delete("c")
    off = MemoryStore(retention_secs=10, max_stored=0)
    await off.put("x", {})
    assert await off.get("x") is None


def _redis_settings(redis_server: RedisServer, on_error: str = "allow") -> dict[str, Any]:
    return {
        "inference": {"provider": "mock"},
        "state": {
            "backend": "redis",
            "redis_url": redis_server.url,
            "timeout_secs": 0.5,
            "on_error": on_error,
        },
        "responses": {"retention_secs": 60},
    }


async def test_redis_store_is_shared_between_gateways_and_expires(
    make_settings, make_gateway, redis_server: RedisServer
) -> None:
    settings = make_settings(_redis_settings(redis_server))
    one, two = await make_gateway(settings), await make_gateway(settings)
    first = await (await one.post("/v1/responses", json={"input": "My name is Ann"})).json()
    # Another gateway (worker or replica) continues the conversation and can fetch it.
    resp = await two.post(
        "/v1/responses", json={"input": "name?", "previous_response_id": first["id"]}
    )
    assert resp.status == 200, await resp.text()
    got = await two.get(f"/v1/responses/{first['id']}")
    assert (await got.json())["output"] == first["output"]
    client = one.app[REDIS]
    assert client is not None
    ttl = await client.ttl(PREFIX + first["id"])
    assert 0 < ttl <= 60
    assert (await two.delete(f"/v1/responses/{first['id']}")).status == 200
    assert (await one.get(f"/v1/responses/{first['id']}")).status == 404


@pytest.mark.parametrize("on_error", ["allow", "deny"])
async def test_redis_down(
    make_settings, make_gateway, redis_server: RedisServer, on_error: str
) -> None:
    client = await make_gateway(make_settings(_redis_settings(redis_server, on_error)))
    redis_server.stop()
    resp = await client.post("/v1/responses", json={"input": "hi"})
    # allow: the answer still comes (unstored); deny: 503 rather than an unstored answer.
    assert resp.status == (200 if on_error == "allow" else 503)
    # Continuing needs the stored conversation: never answered without it.
    resp = await client.post(
        "/v1/responses", json={"input": "hi", "previous_response_id": "resp_abc"}
    )
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert (await client.post("/v1/responses", json={"input": "x", "store": False})).status == 200


async def test_a_continued_conversation_is_bounded_like_a_request(
    make_settings, make_gateway
) -> None:
    client = await make_gateway(
        make_settings({"inference": {"provider": "mock"}, "server": {"max_body_bytes": 2000}})
    )
    previous = None
    for turn in range(10):
        body: dict[str, Any] = {"input": f"turn {turn} " + "x" * 300}
        if previous:
            body["previous_response_id"] = previous
        resp = await client.post("/v1/responses", json=body)
        if resp.status != 200:
            break
        previous = (await resp.json())["id"]
    assert resp.status == 413
    error = (await resp.json())["error"]
    assert (error["code"], error["param"]) == ("REQUEST_TOO_LARGE", "previous_response_id")
    assert 2 <= turn < 10
