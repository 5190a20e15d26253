"""The openai plugin through the whole gateway, against the scriptable fake upstream.

Unlike the unit tier, the upstream here is a real HTTP server, so SSE framing, connection reuse
and the core's usage handling all run for real.  The settings use the ``providers:``/``models:``
table the way an operator would write it for OpenAI, with the key from ``@secret``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from inference_server_openai import plugin
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import GatewayFactory, SettingsFactory
from tests.support.fake_upstream import Action, FakeUpstream

GATEWAY_KEY = "sk-gateway-owned-key-0123456789"
Client = TestClient[web.Request, web.Application]
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hi"}]

UNSUPPORTED_MAX_TOKENS = {
    "error": {
        "code": "unsupported_parameter",
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
        "Use 'max_completion_tokens' instead.",
        "param": "max_tokens",
        "type": "invalid_request_error",
    }
}


@pytest.fixture
async def gateway(
    make_settings: SettingsFactory, make_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> Callable[..., Awaitable[Client]]:
    """A gateway whose provider 'openai' (plugin openai) points at the fake upstream."""

    async def make(**provider: Any) -> Client:
        settings = make_settings(
            {
                "providers": {
                    "openai": {
                        "plugin": "openai",
                        "base_url": fake_upstream.base_url,
                        "api_key": "@secret openai_api_key",
                        "organization": "org-gw",
                        "project": "proj_gw",
                        **provider,
                    }
                },
                "models": {
                    "gpt-4o-mini": {"provider": "openai"},
                    "reasoner": {"provider": "openai", "upstream_model": "o3-mini"},
                    "newmodel": {"provider": "openai", "upstream_model": "gpt-9"},
                },
            },
            env={"INFERENCE_SECRETS__OPENAI_API_KEY": GATEWAY_KEY},
            plugins={"openai": plugin},
        )
        return await make_gateway(settings)

    return make


def events(text: str) -> list[Any]:
    """The data payloads of an SSE body: JSON objects, and the literal "[DONE]"."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_non_stream_chat(
    gateway: Callable[..., Awaitable[Client]], fake_upstream: FakeUpstream
) -> None:
    client = await gateway()
    resp = await client.post(
        "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MESSAGES}
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "Hello from the fake upstream."
    assert body["usage"]["total_tokens"] == 19
    [sent] = fake_upstream.requests
    assert sent["model"] == "gpt-4o-mini"
    assert "stream" not in sent
    assert "stream_options" not in sent
    headers = {k.lower(): v for k, v in fake_upstream.headers[0].items()}
    assert headers["authorization"] == f"Bearer {GATEWAY_KEY}"
    assert headers["openai-organization"] == "org-gw"
    assert headers["openai-project"] == "proj_gw"


async def test_routed_reasoning_model_gets_max_completion_tokens(
    gateway: Callable[..., Awaitable[Client]], fake_upstream: FakeUpstream
) -> None:
    client = await gateway()
    resp = await client.post(
        "/v1/chat/completions", json={"model": "reasoner", "messages": MESSAGES, "max_tokens": 32}
    )
    assert resp.status == 200
    [sent] = fake_upstream.requests
    assert sent["model"] == "o3-mini"
    assert sent["max_completion_tokens"] == 32
    assert "max_tokens" not in sent


@pytest.mark.parametrize("stream", [False, True])
async def test_unsupported_max_tokens_is_retried_once_renamed(
    gateway: Callable[..., Awaitable[Client]], fake_upstream: FakeUpstream, stream: bool
) -> None:
    fake_upstream.script(Action(kind="status", status=400, body=UNSUPPORTED_MAX_TOKENS))
    client = await gateway()
    request = {"model": "newmodel", "messages": MESSAGES, "max_tokens": 16, "stream": stream}
    first = await client.post("/v1/chat/completions", json=request)
    assert first.status == 200
    text = await first.text()
    if stream:
        assert events(text)[-1] == "[DONE]"
    second = await client.post("/v1/chat/completions", json=request)
    assert second.status == 200
    await second.read()
    sent = [(("max_tokens" in r), r.get("max_completion_tokens")) for r in fake_upstream.requests]
    assert sent == [(True, None), (False, 16), (False, 16)]  # learned: no second 400


async def test_stream_without_usage_request(
    gateway: Callable[..., Awaitable[Client]], fake_upstream: FakeUpstream
) -> None:
    client = await gateway()
    resp = await client.post(
        "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    payloads = events(await resp.text())
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "tok0 tok1 tok2 "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)  # the client did not ask
    # ...but the gateway asked upstream, to record real token counts.
    assert fake_upstream.requests[0]["stream_options"] == {"include_usage": True}


async def test_stream_with_upstream_usage(
    gateway: Callable[..., Awaitable[Client]], fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script(Action(chunks=4))
    client = await gateway()
    resp = await client.post(
        "/v1/chat/completions",
        json={
            "model": "gpt-4o-mini",
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    payloads = events(await resp.text())
    assert payloads[-1] == "[DONE]"
    *chunks, usage_chunk = payloads[:-1]
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert fake_upstream.requests[0]["stream_options"] == {"include_usage": True}


async def test_stream_usage_synthesised_when_upstream_omits_it(
    gateway: Callable[..., Awaitable[Client]], fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script(Action(usage=False))
    client = await gateway(stream_usage=False)
    resp = await client.post(
        "/v1/chat/completions",
        json={
            "model": "gpt-4o-mini",
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    payloads = events(await resp.text())
    assert payloads[-1] == "[DONE]"
    usage_chunk = payloads[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 3  # one per content delta
    assert usage_chunk["usage"]["total_tokens"] > 3


async def test_openai_sdk_through_the_gateway(
    gateway: Callable[..., Awaitable[Client]], fake_upstream: FakeUpstream
) -> None:
    client = await gateway()
    sdk = AsyncOpenAI(
        base_url=str(client.make_url("/v1")), api_key="client-side-key", max_retries=0
    )
    try:
        reply = await sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert reply.choices[0].message.content == "Hello from the fake upstream."
        stream = await sdk.chat.completions.create(
            model="reasoner",
            messages=MESSAGES,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
        text = ""
        usage = None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        assert text == "tok0 tok1 tok2 "
        assert usage is not None
        assert usage.total_tokens == 8
    finally:
        await sdk.close()
    # The client's own key is never forwarded: the gateway authenticates with its own.
    assert {h["Authorization"] for h in fake_upstream.headers} == {f"Bearer {GATEWAY_KEY}"}
    assert fake_upstream.requests[1]["max_completion_tokens"] == 10


async def test_health_lists_models_with_the_key(
    gateway: Callable[..., Awaitable[Client]], fake_upstream: FakeUpstream
) -> None:
    client = await gateway()
    resp = await client.get("/health")
    assert resp.status == 200
    body = await resp.json()
    assert body["providers"]["openai"]["status"] == "healthy"
    assert body["providers"]["openai"]["plugin"] == "openai"


async def test_upstream_auth_failure_through_the_fake(
    gateway: Callable[..., Awaitable[Client]], fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script(
        Action(
            kind="status",
            status=401,
            body={"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}},
        )
    )
    client = await gateway()
    resp = await client.post(
        "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    )
    assert resp.status == 502
    body = await resp.json()
    assert body["error"]["code"] == "PROVIDER_AUTH_FAILED"
    assert len(fake_upstream.requests) == 1
