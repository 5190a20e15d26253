"""The response cache through the real app: hits, misses, bypasses for JSON and SSE, the SDK
reading a replayed stream, tenants, TTL on a fake clock, what is never stored, coalescing,
Redis shared and Redis gone."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import orjson
import pytest

from inference_server.cache import CACHE, cache_key, parse_cache_control
from inference_server.context import RequestContext
from inference_server.keys import CTX
from tests.support.fake_upstream import Action, FakeUpstream

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
ON = {"cache": {"enabled": True}}


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-oss-20b", "messages": HI, **extra}


async def sse_events(resp: Any) -> list[Any]:
    """The data of every SSE event ([DONE] as the string)."""
    text = (await resp.read()).decode()
    out: list[Any] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


async def test_json_miss_then_hit_without_the_upstream(gateway_for, fake_upstream) -> None:
    client = await gateway_for(**ON)
    first = await client.post(CHAT, json=body())
    assert first.status == 200
    assert first.headers["x-inference-cache"] == "miss"
    assert "age" not in first.headers
    second = await client.post(CHAT, json=body())
    assert second.status == 200
    assert second.headers["x-inference-cache"] == "hit"
    assert second.headers["age"] == "0"
    assert await second.json() == await first.json()
    assert len(fake_upstream.requests) == 1


async def test_off_by_default_no_header_no_state(gateway_for, fake_upstream) -> None:
    client = await gateway_for()
    assert client.app[CACHE] is None
    for _ in range(2):
        resp = await client.post(CHAT, json=body())
        assert resp.status == 200
        assert "x-inference-cache" not in resp.headers
    assert len(fake_upstream.requests) == 2


async def test_streamed_answer_is_stored_and_answers_json_and_sse(
    gateway_for, fake_upstream
) -> None:
    client = await gateway_for(**ON)
    first = await client.post(CHAT, json=body(stream=True))
    assert first.headers["x-inference-cache"] == "miss"
    original = await sse_events(first)
    assert original[-1] == "[DONE]"
    # The same request as JSON: assembled from the stream, no upstream call.
    as_json = await client.post(CHAT, json=body())
    assert as_json.headers["x-inference-cache"] == "hit"
    completion = await as_json.json()
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"] == {
        "role": "assistant",
        "content": "tok0 tok1 tok2 ",
    }
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["id"] == "chatcmpl-fake"
    # And as a stream again, with a usage chunk now that it is asked for.
    replayed = await client.post(
        CHAT, json=body(stream=True, stream_options={"include_usage": True}, user="someone")
    )
    assert replayed.headers["x-inference-cache"] == "hit"
    assert replayed.headers["Content-Type"].startswith("text/event-stream")
    events = await sse_events(replayed)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == completion["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1]) == (
        "tok0 tok1 tok2 "
    )
    assert len(fake_upstream.requests) == 1


async def test_json_answer_replays_as_a_stream(gateway_for, fake_upstream) -> None:
    client = await gateway_for(**ON)
    assert (await client.post(CHAT, json=body())).headers["x-inference-cache"] == "miss"
    resp = await client.post(CHAT, json=body(stream=True))
    assert resp.headers["x-inference-cache"] == "hit"
    events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    assert "usage" not in events[0]  # not asked for: no usage field, no usage chunk
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == "Hello from the fake upstream."
    assert len(fake_upstream.requests) == 1


async def test_openai_sdk_reads_a_replayed_stream_like_the_original(
    gateway_for, fake_upstream
) -> None:
    client = await gateway_for(**ON)
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)

    async def run() -> dict[str, Any]:
        stream = await sdk.chat.completions.create(
            model="gpt-oss-20b",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        out: dict[str, Any] = {"text": "", "roles": [], "finish": None, "usage": None}
        async for chunk in stream:
            out["id"], out["model"] = chunk.id, chunk.model
            for choice in chunk.choices:
                out["text"] += choice.delta.content or ""
                if choice.delta.role:
                    out["roles"].append(choice.delta.role)
                out["finish"] = choice.finish_reason or out["finish"]
            if chunk.usage is not None:
                out["usage"] = chunk.usage.model_dump()
        return out

    original = await run()
    replayed = await run()
    await sdk.close()
    assert original["usage"] == {
        **original["usage"],
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "total_tokens": 8,
    }
    assert replayed == original
    assert len(fake_upstream.requests) == 1


async def test_cache_control_no_cache_no_store_max_age(gateway_for, fake_upstream) -> None:
    client = await gateway_for(**ON)
    cache = client.app[CACHE]
    assert cache is not None
    now = [1000.0]
    cache.clock = lambda: now[0]
    assert (await client.post(CHAT, json=body())).headers["x-inference-cache"] == "miss"
    no_store = await client.post(CHAT, json=body(), headers={"Cache-Control": "no-store"})
    assert no_store.headers["x-inference-cache"] == "bypass"
    assert len(fake_upstream.requests) == 2
    now[0] += 30
    hit = await client.post(CHAT, json=body())
    assert (hit.headers["x-inference-cache"], hit.headers["age"]) == ("hit", "30")
    too_old = await client.post(CHAT, json=body(), headers={"Cache-Control": "max-age=10"})
    assert too_old.headers["x-inference-cache"] == "miss"  # asked the upstream, stored anew
    assert len(fake_upstream.requests) == 3
    fresh = await client.post(CHAT, json=body(), headers={"Cache-Control": "max-age=10"})
    assert (fresh.headers["x-inference-cache"], fresh.headers["age"]) == ("hit", "0")
    refresh = await client.post(CHAT, json=body(), headers={"Cache-Control": "no-cache"})
    assert refresh.headers["x-inference-cache"] == "miss"
    assert len(fake_upstream.requests) == 4


async def test_ttl_expiry_on_a_fake_clock(gateway_for, fake_upstream) -> None:
    client = await gateway_for(cache={"enabled": True, "ttl_secs": 60})
    cache = client.app[CACHE]
    assert cache is not None
    now = [5000.0]
    cache.clock = lambda: now[0]
    await client.post(CHAT, json=body())
    now[0] += 59.9
    assert (await client.post(CHAT, json=body())).headers["x-inference-cache"] == "hit"
    now[0] += 0.2
    assert (await client.post(CHAT, json=body())).headers["x-inference-cache"] == "miss"
    assert len(fake_upstream.requests) == 2


async def test_tenants_never_read_each_others_answers(
    make_settings, aiohttp_client, fake_upstream
) -> None:
    from aiohttp import web

    from inference_server.app import create_app

    @web.middleware
    async def api_key(request: web.Request, handler: Any) -> web.StreamResponse:
        # Stands in for issue 12's authentication: it names the key on the context.
        ctx: RequestContext = request[CTX]
        ctx.key_name = request.headers.get("x-test-key")
        response: web.StreamResponse = await handler(request)
        return response

    async def gateway(**cache: Any) -> Any:
        settings = make_settings(
            {"inference": {"base_url": fake_upstream.base_url}, "cache": {"enabled": True, **cache}}
        )
        app = create_app(settings)
        app.middlewares.insert(1, api_key)
        return await aiohttp_client(app)

    client = await gateway()
    for key, expected in (("alice", "miss"), ("bob", "miss"), ("alice", "hit"), ("bob", "hit")):
        resp = await client.post(CHAT, json=body(), headers={"x-test-key": key})
        assert resp.headers["x-inference-cache"] == expected, key
    assert len(fake_upstream.requests) == 2
    shared = await gateway(scope="global")
    await shared.post(CHAT, json=body(), headers={"x-test-key": "alice"})
    resp = await shared.post(CHAT, json=body(), headers={"x-test-key": "bob"})
    assert resp.headers["x-inference-cache"] == "hit"
    assert len(fake_upstream.requests) == 3


@pytest.mark.parametrize(
    "action",
    [
        Action(kind="status", status=500, body={"error": {"message": "boom"}}),
        Action(
            kind="status",
            status=429,
            body={"error": {"message": "slow down"}},
            headers={"Retry-After": "0"},  # no pause: the next request may go upstream
        ),
        Action(kind="status", status=400, body={"error": {"message": "bad", "code": "x"}}),
    ],
    ids=["500", "429", "400"],
)
async def test_errors_are_never_stored(gateway_for, fake_upstream, action: Action) -> None:
    client = await gateway_for({"max_retries": 0}, **ON)
    fake_upstream.script(action)
    failed = await client.post(CHAT, json=body())
    assert failed.status >= 400
    assert failed.headers["x-inference-cache"] == "miss"
    ok = await client.post(CHAT, json=body())
    assert ok.status == 200
    assert ok.headers["x-inference-cache"] == "miss"  # the error was not kept
    assert len(fake_upstream.requests) == 2


@pytest.mark.parametrize("kind", ["cut", "stream_error"])
async def test_a_broken_stream_is_never_stored(gateway_for, fake_upstream, kind: str) -> None:
    client = await gateway_for({"max_retries": 0}, **ON)
    fake_upstream.script(Action(kind=kind, chunks=4))
    broken = await client.post(CHAT, json=body(stream=True))
    events = await sse_events(broken)
    assert "[DONE]" not in events
    assert "error" in events[-1]
    again = await client.post(CHAT, json=body(stream=True))
    assert again.headers["x-inference-cache"] == "miss"
    assert (await sse_events(again))[-1] == "[DONE]"
    assert len(fake_upstream.requests) == 2


async def test_a_cancelled_stream_is_never_stored(gateway_for, fake_upstream) -> None:
    client = await gateway_for(**ON)
    fake_upstream.script(Action(chunks=50, interval=0.02))
    resp = await client.post(CHAT, json=body(stream=True))
    await resp.content.readline()  # the stream started
    resp.close()  # the client leaves
    async with asyncio.timeout(5):
        await fake_upstream.cancelled.wait()
    again = await client.post(CHAT, json=body(stream=True))
    assert again.headers["x-inference-cache"] == "miss"
    assert len(fake_upstream.requests) == 2


async def test_twenty_identical_concurrent_requests_make_one_upstream_call(
    gateway_for, fake_upstream
) -> None:
    client = await gateway_for(**ON)
    fake_upstream.always = Action(delay=0.3)
    payloads = [body(stream=bool(i % 2)) for i in range(20)]
    responses = await asyncio.gather(*(client.post(CHAT, json=p) for p in payloads))
    assert [r.status for r in responses] == [200] * 20
    results = sorted(r.headers["x-inference-cache"] for r in responses)
    assert results == ["hit"] * 19 + ["miss"]
    for resp, payload in zip(responses, payloads, strict=True):
        if payload["stream"]:
            assert (await sse_events(resp))[-1] == "[DONE]"
        else:
            assert (await resp.json())["choices"][0]["message"]["content"]
    assert len(fake_upstream.requests) == 1
    text = (await (await client.get("/metrics")).read()).decode()
    assert 'inference_cache_coalesced_total{model="gpt-oss-20b"} 19.0' in text
    assert 'inference_cache_requests_total{model="gpt-oss-20b",result="hit"} 19.0' in text


async def test_waiters_call_the_upstream_when_the_leader_fails(gateway_for, fake_upstream) -> None:
    client = await gateway_for({"max_retries": 0}, **ON)
    fake_upstream.script(
        Action(kind="status", status=500, body={"error": {"message": "x"}}, delay=0.3)
    )
    responses = await asyncio.gather(*(client.post(CHAT, json=body()) for _ in range(5)))
    assert sorted(r.status for r in responses) == [200, 200, 200, 200, 502]
    assert len(fake_upstream.requests) == 5


async def test_per_model_override_and_aliases_share_entries(
    make_settings, make_gateway, fake_upstream: FakeUpstream
) -> None:
    up = {"plugin": "lmstudio", "base_url": fake_upstream.base_url}
    settings = make_settings(
        {
            "providers": {"up": up},
            "models": {
                "chat": {"provider": "up", "upstream_model": "gpt-oss-20b"},
                "latest": {"alias": "chat"},
                "fresh": {"provider": "up", "upstream_model": "gpt-oss-20b",
                          "cache": {"enabled": False}},
                "other": {"provider": "up", "upstream_model": "gpt-oss-20b",
                          "cache": {"ttl_secs": 5}},
            },
            "cache": {"enabled": True},
        }
    )  # fmt: skip
    assert settings.cache.for_model("other") == (True, 5.0)
    client = await make_gateway(settings)

    async def ask(model: str) -> str:
        resp = await client.post(CHAT, json={"model": model, "messages": HI})
        assert resp.status == 200
        return str(resp.headers["x-inference-cache"])

    assert [await ask(m) for m in ("chat", "latest", "fresh", "fresh")] == [
        "miss", "hit", "bypass", "bypass",
    ]  # fmt: skip
    assert [await ask(m) for m in ("other", "other")] == ["miss", "hit"]
    assert len(fake_upstream.requests) == 4


def test_settings_are_validated(make_settings) -> None:
    from inference_server.settings import ConfigError

    with pytest.raises(ConfigError) as info:
        make_settings(
            {
                "cache": {"enabled": "yes", "backend": "redis", "max_bytes": 1, "scope": "x"},
                "providers": {"up": {"plugin": "mock"}},
                "models": {"m": {"provider": "up", "cache": {"enabled": True, "ttl": 3}}},
            }
        )
    problems = "\n".join(info.value.problems)
    for expected in (
        "cache.enabled",
        "cache.max_bytes",
        "cache.scope",
        "cache.backend: redis needs state.backend: redis",
        "models.m.cache.ttl: unknown key",
    ):
        assert expected in problems


def test_key_ignores_transport_fields_and_number_forms() -> None:
    base = {"model": "m", "messages": HI, "temperature": 1, "top_p": 0.5}
    key = cache_key("", "chat", base)
    same = {"top_p": 0.5, "temperature": 1.0, "stream": True, "user": "u", "messages": HI}
    assert cache_key("", "chat", {**same, "stream_options": {"include_usage": True}}) == key
    assert cache_key("", "chat", {**base, "model": "alias"}) == key  # the route is the model
    assert cache_key("", "other", base) != key
    assert cache_key("tenant", "chat", base) != key
    assert cache_key("", "chat", {**base, "temperature": 0.9}) != key
    assert cache_key("", "chat", {**base, "messages": [{"role": "user", "content": "ho"}]}) != key


def test_cache_control_parsing() -> None:
    cc = parse_cache_control('No-Cache, max-age="30", max-age=10, private')
    assert (cc.no_cache, cc.no_store, cc.max_age) == (True, False, 10.0)
    assert parse_cache_control("no-store").no_store
    assert parse_cache_control("max-age=-1, max-age=abc, max-age=" + "9" * 40).max_age is None
    assert parse_cache_control(None).max_age is None


async def test_the_server_span_says_what_the_cache_did(gateway_for, fake_upstream) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from inference_server.keys import TELEMETRY

    client = await gateway_for(telemetry={"traces": {"exporter": "console"}}, **ON)
    memory = InMemorySpanExporter()
    provider = client.app[TELEMETRY].provider
    assert provider is not None
    provider.add_span_processor(SimpleSpanProcessor(memory))
    for _ in range(2):
        assert (await client.post(CHAT, json=body())).status == 200
    servers = [s for s in memory.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert [(s.attributes or {}).get("inference.cache") for s in servers] == ["miss", "hit"]


async def test_hits_count_tokens_only_when_asked(gateway_for, fake_upstream) -> None:
    async def tokens(client: Any) -> str:
        text = (await (await client.get("/metrics")).read()).decode()
        lines = [ln for ln in text.splitlines() if ln.startswith("inference_tokens_total{")]
        return " ".join(sorted(ln.rsplit(" ", 1)[1] for ln in lines))

    default = await gateway_for(**ON)
    for _ in range(2):
        await default.post(CHAT, json=body())
    assert await tokens(default) == "12.0 7.0"  # the miss's usage only
    counting = await gateway_for(cache={"enabled": True, "hits_count_tokens": True})
    for _ in range(2):
        await counting.post(CHAT, json=body())
    assert await tokens(counting) == "12.0 12.0 7.0 7.0"  # the hit's too (no deployment)


async def test_a_waiter_never_waits_past_its_own_time_budget(gateway_for, fake_upstream) -> None:
    client = await gateway_for(routing={"max_time_secs": 0.3}, **ON)
    fake_upstream.always = Action(delay=0.8)
    leader = asyncio.ensure_future(client.post(CHAT, json=body()))
    async with asyncio.timeout(5):
        while not fake_upstream.requests:  # the leader is asking the upstream
            await asyncio.sleep(0.01)
    waiter = await client.post(CHAT, json=body())
    # It gave up waiting after its 0.3 s and asked the upstream itself.
    assert waiter.status == 200
    assert waiter.headers["x-inference-cache"] == "miss"
    assert (await leader).headers["x-inference-cache"] == "miss"
    assert len(fake_upstream.requests) == 2
