"""Resilience as a client sees it: the seed's one-provider setup, the official openai SDK with its
default retries as the client, fake upstreams on free ports that fail on purpose.

A resilience feature must never make an upstream problem worse than having no such feature: every
scenario here checks what the client gets, how fast, and how many requests the upstream saw.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from inference_server.providers import (
    CallContext,
    ChatRequest,
    ChatResponse,
    ProviderError,
    ProviderPlugin,
)
from tests.support.fake_upstream import Action, FakeUpstream, PortUpstream, completion
from tests.support.providers import ChatStub

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
BODY = {"model": "llama-2-7b", "messages": [{"role": "user", "content": "Hello"}]}


def seed_env(base_url: str, **extra: str) -> dict[str, str]:
    """The seed's one-provider configuration, from environment variables only."""
    return {
        "INFERENCE_INFERENCE__PROVIDER": "lmstudio",
        "INFERENCE_INFERENCE__BASE_URL": base_url,
        "INFERENCE_LOGGING__LEVEL": "critical",
        **extra,
    }


@pytest.fixture
async def seed_gateway(make_settings, make_gateway):
    """A gateway with every setting at its default except where a test says otherwise."""

    async def make(base_url: str, config: dict[str, Any] | None = None, **env: str) -> Any:
        settings = make_settings(config or {}, env=seed_env(base_url, **env), base=False)
        return await make_gateway(settings)

    return make


def sdk_for(client: Any, **kwargs: Any) -> openai.AsyncOpenAI:
    """The official SDK with its default retries (max_retries=2) unless told otherwise."""
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", **kwargs)


async def test_seed_lm_studio_not_running_is_502_every_time_fast_and_recovers(
    seed_gateway,
) -> None:
    upstream = PortUpstream()  # nothing listens on its port yet
    client = await seed_gateway(upstream.base_url)
    durations = []
    for _ in range(8):
        started = time.perf_counter()
        resp = await client.post("/v1/chat/completions", json=BODY)
        durations.append(time.perf_counter() - started)
        assert resp.status == 502
        body = await resp.json()
        assert body["error"]["code"] == "PROVIDER_CONNECTION_FAILED"
        assert resp.headers["x-should-retry"] == "false"
    # The first requests retry with backoff (0.25 s base); once the breaker opened, each is a
    # single panic-routed attempt: milliseconds, never a 503 lockout.
    assert sum(durations) < 6
    assert max(durations[-4:]) < 0.25
    # The openai SDK sees the same 502 and, told x-should-retry: false, does not resend it.
    sdk = sdk_for(client)
    started = time.perf_counter()
    with pytest.raises(openai.InternalServerError) as info:
        await sdk.chat.completions.create(model="llama-2-7b", messages=USER)
    assert info.value.code == "PROVIDER_CONNECTION_FAILED"
    assert time.perf_counter() - started < 0.5
    # LM Studio comes back: the very next request succeeds.
    await upstream.start()
    try:
        done = await sdk.chat.completions.create(model="llama-2-7b", messages=USER)
        assert done.choices[0].message.content == "Hello from the fake upstream."
        health = await (await client.get("/health")).json()
        assert health["routes"]["*"]["status"] == "healthy"
    finally:
        await sdk.close()
        await upstream.stop()


def rate_limited(retry_after: str = "1") -> Action:
    return Action(
        "status",
        429,
        {
            "error": {
                "message": "Rate limit reached for requests",
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        },
        headers={"Retry-After": retry_after},
    )


async def test_upstream_429_reaches_the_sdk_as_rate_limit_error_within_seconds(
    seed_gateway, fake_upstream: FakeUpstream
) -> None:
    client = await seed_gateway(fake_upstream.base_url)
    fake_upstream.always = rate_limited("1")
    sdk = sdk_for(client)  # default retries
    started = time.perf_counter()
    with pytest.raises(openai.RateLimitError) as info:
        await sdk.chat.completions.create(model="llama-2-7b", messages=USER)
    elapsed = time.perf_counter() - started
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.type == "requests"
    assert info.value.response.headers["x-inference-error-source"] == "upstream"
    assert elapsed < 6  # the gateway waited out up to 3 one-second pauses; the SDK none
    assert len(fake_upstream.requests) == 4  # 1 + max_retries, the SDK sent one request
    # No breaker was involved: once the upstream allows again, the model serves at once.
    fake_upstream.always = None
    await asyncio.sleep(1.05)  # the last pause runs out
    done = await sdk.chat.completions.create(model="llama-2-7b", messages=USER)
    assert done.choices[0].message.content
    health = await (await client.get("/health")).json()
    assert health["routes"]["*"]["deployments"]["local/llama-2-7b"]["breaker"] == "closed"
    await sdk.close()


async def test_quota_exhausted_is_not_retried_by_anyone(
    seed_gateway, fake_upstream: FakeUpstream
) -> None:
    client = await seed_gateway(fake_upstream.base_url)
    fake_upstream.always = Action(
        "status",
        429,
        {
            "error": {
                "message": "You exceeded your current quota",
                "type": "insufficient_quota",
                "param": None,
                "code": "insufficient_quota",
            }
        },
    )
    sdk = sdk_for(client)
    with pytest.raises(openai.RateLimitError) as info:
        await sdk.chat.completions.create(model="llama-2-7b", messages=USER)
    assert info.value.code == "insufficient_quota"
    assert info.value.response.headers["x-should-retry"] == "false"
    assert len(fake_upstream.requests) == 1
    await sdk.close()


async def test_one_model_never_blocks_another(seed_gateway, fake_upstream: FakeUpstream) -> None:
    client = await seed_gateway(
        fake_upstream.base_url,
        INFERENCE_INFERENCE__RETRY_BACKOFF_BASE_SECS="0.001",
        INFERENCE_ROUTING__PANIC="false",
    )
    fake_upstream.by_model["llama-2-7b"] = Action("status", 500, {"error": "model crashed"})
    for _ in range(2):  # 4 + 1 attempts: 5 consecutive faults open llama-2-7b's breaker
        resp = await client.post("/v1/chat/completions", json=BODY)
        assert resp.status == 502
    health = await (await client.get("/health")).json()
    assert health["routes"]["*"]["deployments"]["local/llama-2-7b"]["breaker"] == "open"
    # mistral-7b was never requested before: its own breaker is closed.
    resp = await client.post("/v1/chat/completions", json={**BODY, "model": "mistral-7b"})
    assert resp.status == 200
    # And with panic routing off, llama-2-7b's refusal names the cause and the real wait.
    resp = await client.post("/v1/chat/completions", json=BODY)
    assert resp.status == 503
    message = (await resp.json())["error"]["message"]
    assert "local/llama-2-7b: PROVIDER_ERROR" in message
    assert "model crashed" in message
    assert 25 <= int(resp.headers["Retry-After"]) <= 30


async def test_sdk_retries_do_not_multiply_upstream_requests(
    seed_gateway, fake_upstream: FakeUpstream
) -> None:
    client = await seed_gateway(
        fake_upstream.base_url, INFERENCE_INFERENCE__RETRY_BACKOFF_BASE_SECS="0.001"
    )
    fake_upstream.always = Action("status", 502, {"error": "bad gateway upstream"})
    sdk = sdk_for(client)
    with pytest.raises(openai.InternalServerError) as info:
        await sdk.chat.completions.create(model="llama-2-7b", messages=USER)
    assert info.value.response.headers["x-should-retry"] == "false"
    assert info.value.response.headers["x-inference-attempts"] == "4"
    assert len(fake_upstream.requests) == 4  # not 3 × 4
    await sdk.close()


async def test_streams_carry_x_request_id_and_an_actionable_cut_message(
    seed_gateway, fake_upstream: FakeUpstream
) -> None:
    client = await seed_gateway(fake_upstream.base_url)
    resp = await client.post(
        "/v1/chat/completions", json={**BODY, "stream": True}, headers={"x-request-id": "abc-1"}
    )
    assert resp.status == 200
    assert resp.headers["x-request-id"] == "abc-1"
    await resp.read()
    resp = await client.post("/v1/chat/completions", json={**BODY, "stream": True})
    assert resp.headers["x-request-id"].startswith("req_")
    await resp.read()
    fake_upstream.script(Action("cut", chunks=6))
    resp = await client.post("/v1/chat/completions", json={**BODY, "stream": True})
    text = (await resp.read()).decode()
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    error = events[-1]
    assert "closed the stream after 4 chunks before it was complete" in error
    assert "TransferEncodingError" not in error
    assert "ClientPayloadError" not in error


# --- a plugin that raises something other than a GatewayError ------------------------------


class FlakyProvider(ChatStub):
    """Fails with a 5xx-like error, raises a bare KeyError (a plugin bug), or answers."""

    mode = "ok"

    async def chat(self, request: ChatRequest, ctx: CallContext) -> ChatResponse:
        mode = FlakyProvider.mode
        if mode == "fail":
            raise ProviderError("upstream down")
        if mode == "bug":
            raise KeyError("choices")
        return completion(ctx.upstream_model)


async def test_plugin_bug_in_a_half_open_probe_leaves_the_deployment_serving(
    make_settings, make_gateway
) -> None:
    plugin = ProviderPlugin(name="flaky", factory=FlakyProvider, default_base_url="flaky://x")
    settings = make_settings(
        {
            "providers": {"flaky": {"plugin": "flaky", "max_retries": 0}},
            "models": {"m": {"provider": "flaky"}},
            "routing": {
                "panic": False,
                "breaker": {"consecutive_failures": 1, "cooldown_secs": 0.2},
            },
            "logging": {"level": "critical"},
        },
        plugins={"flaky": plugin},
    )
    client = await make_gateway(settings)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    try:
        FlakyProvider.mode = "fail"
        assert (await client.post("/v1/chat/completions", json=body)).status == 502
        assert (await client.post("/v1/chat/completions", json=body)).status == 503  # open
        await asyncio.sleep(0.25)
        FlakyProvider.mode = "bug"  # the half-open probe hits a plugin bug
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 500
        assert (await resp.json())["error"]["code"] == "INTERNAL_ERROR"
        FlakyProvider.mode = "ok"  # the plugin recovers
        status = 503
        deadline = time.monotonic() + 3
        while status != 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            status = (await client.post("/v1/chat/completions", json=body)).status
        assert status == 200
    finally:
        FlakyProvider.mode = "ok"


# --- under load ----------------------------------------------------------------------------


async def test_upstream_killed_and_restarted_under_20_concurrent_clients(seed_gateway) -> None:
    upstream = PortUpstream()
    await upstream.start()
    client = await seed_gateway(
        upstream.base_url, INFERENCE_INFERENCE__RETRY_BACKOFF_BASE_SECS="0.01"
    )
    outcomes: list[tuple[float, int, str]] = []
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    stop_at = t0 + 3.0

    async def one_client() -> None:
        while loop.time() < stop_at:
            try:
                resp = await client.post("/v1/chat/completions", json=BODY)
                payload = await resp.json()
            except (aiohttp.ClientError, ValueError) as exc:  # never expected
                outcomes.append((loop.time() - t0, -1, repr(exc)))
                continue
            if resp.status == 200:
                assert payload["choices"][0]["message"]["content"]
                outcomes.append((loop.time() - t0, 200, "ok"))
            else:
                error = payload["error"]
                assert set(error) == {"message", "type", "param", "code"}
                outcomes.append((loop.time() - t0, resp.status, error["code"]))
            await asyncio.sleep(0.01)

    async def chaos() -> float:
        await asyncio.sleep(0.5)
        await upstream.stop()
        await asyncio.sleep(1.0)
        await upstream.start()
        return loop.time() - t0

    clients = [asyncio.create_task(one_client()) for _ in range(20)]
    back_at = await chaos()
    await asyncio.gather(*clients)
    await upstream.stop()
    codes = Counter((status, code) for _, status, code in outcomes)
    assert all(status in (200, 502, 503, 504) for status, _ in codes), codes
    assert (503, "NO_DEPLOYMENT_AVAILABLE") not in codes  # panic routing: never a lockout
    # Serving again within 1 s of the upstream's return, and from then on only successes.
    after = [(t, status) for t, status, _ in outcomes if t > back_at + 1.0]
    assert after
    assert all(status == 200 for _, status in after), Counter(s for _, s in after)
    first_ok = min(t for t, status, _ in outcomes if status == 200 and t > back_at)
    assert first_ok - back_at < 1.0


async def test_429_storm_never_503_and_upstream_load_stays_within_the_retry_budget(
    seed_gateway, fake_upstream: FakeUpstream
) -> None:
    client = await seed_gateway(fake_upstream.base_url)
    fake_upstream.always = rate_limited("1")
    statuses: Counter[int] = Counter()

    async def one_client() -> None:
        for _ in range(5):
            resp = await client.post("/v1/chat/completions", json=BODY)
            await resp.read()
            statuses[resp.status] += 1
            assert int(resp.headers["Retry-After"]) >= 1

    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(one_client() for _ in range(20))), 60)
    windows = (time.monotonic() - started) / 10 + 1  # the floor is per 10 s window
    assert statuses == Counter({429: 100})
    # Each client request reaches the upstream at most once, plus the budget's retries
    # (0.2 × requests + 10 per window): never 1 + max_retries times each.
    assert len(fake_upstream.requests) <= 100 * 1.2 + 10 * windows


async def test_failing_route_under_load_stays_within_the_retry_budget(
    seed_gateway, fake_upstream: FakeUpstream
) -> None:
    # Breaker off, so only the retry budget stands between 200 requests and 800 attempts.
    client = await seed_gateway(
        fake_upstream.base_url,
        INFERENCE_INFERENCE__RETRY_BACKOFF_BASE_SECS="0.001",
        INFERENCE_ROUTING__BREAKER__ENABLED="false",
    )
    fake_upstream.always = Action("status", 500, {"error": "always failing"})

    async def one_client() -> None:
        for _ in range(10):
            resp = await client.post("/v1/chat/completions", json=BODY)
            assert resp.status == 502
            assert resp.headers["x-should-retry"] == "false"

    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(one_client() for _ in range(20))), 60)
    windows = (time.monotonic() - started) / 10 + 1  # the floor is per 10 s window
    assert len(fake_upstream.requests) <= 200 * 1.2 + 10 * windows
