"""The openai plugin in OpenAI-compatible mode (``base_url`` override) against real llama.cpp.

This proves the plugin's OpenAI-only additions are harmless to a server that is not OpenAI.
Those additions are the bearer key, the organization and project headers, and asking for stream
usage on every stream.  The real server is llama-cpp-python, which ignores
``stream_options.include_usage``.  So the gateway must still synthesise the usage chunk when the
client asked for one, and must show none when it did not.  The client is the official openai SDK.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from inference_server_openai import plugin
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import GatewayFactory, SettingsFactory
from tests.real.conftest import LlamaServer

pytestmark = pytest.mark.real
USER: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]
Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def gateway(
    make_settings: SettingsFactory, make_gateway: GatewayFactory, llama_server: LlamaServer
) -> Client:
    settings = make_settings(
        {
            "providers": {
                "llama": {
                    "plugin": "openai",
                    "base_url": llama_server.base_url,
                    "api_key": "@secret llama_key",
                    "organization": "org-local",
                    "project": "proj_local",
                    "timeout_secs": 60,
                }
            },
            "models": {llama_server.model: {"provider": "llama"}},
        },
        env={"INFERENCE_SECRETS__LLAMA_KEY": "sk-local-not-checked-by-llama"},
        plugins={"openai": plugin},
    )
    return await make_gateway(settings)


@pytest.fixture
async def sdk(gateway: Client) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key="x", max_retries=0)
    yield client
    await client.close()


async def test_completion(sdk: openai.AsyncOpenAI, llama_server: LlamaServer) -> None:
    done = await sdk.chat.completions.create(
        model=llama_server.model, messages=USER, max_tokens=8, temperature=0.0, seed=42
    )
    choice = done.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    assert done.usage is not None
    assert done.usage.prompt_tokens > 0
    assert 0 < done.usage.completion_tokens <= 8


async def test_stream_with_usage(sdk: openai.AsyncOpenAI, llama_server: LlamaServer) -> None:
    stream = await sdk.chat.completions.create(
        model=llama_server.model,
        messages=USER,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None
    assert 0 < usage.completion_tokens <= 6
    assert usage.prompt_tokens > 0
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish in (["length"], ["stop"])


async def test_stream_without_usage_shows_none(gateway: Client, llama_server: LlamaServer) -> None:
    resp = await gateway.post(
        "/v1/chat/completions",
        json={"model": llama_server.model, "messages": USER, "max_tokens": 4, "stream": True},
    )
    assert resp.status == 200
    blocks = [b for b in (await resp.text()).split("\n\n") if b]
    assert blocks[-1] == "data: [DONE]"
    chunks = [json.loads(b.removeprefix("data: ")) for b in blocks[:-1]]
    assert chunks
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["choices"]  # no usage-only chunk
        assert "usage" not in chunk


async def test_health_and_models(gateway: Client, llama_server: LlamaServer) -> None:
    health = await gateway.get("/health")
    assert health.status == 200
    body = await health.json()
    assert body["providers"]["llama"]["status"] == "healthy"
    models = await (await gateway.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == [llama_server.model]
