"""Every example of the seed README, replayed against a real LM Studio-compatible upstream.

The gateway runs with the seed's example configuration (allowed models, default model) in front
of the real llama.cpp server; each request below is the seed's curl command, and each assertion is
the response it documents (with the error envelope the Core gateway issue specifies).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.real.conftest import LlamaServer
from tests.support.procs import free_port

pytestmark = pytest.mark.real


@pytest.fixture
async def client(make_settings, make_gateway, llama_server: LlamaServer):
    settings = make_settings(
        {
            "inference": {
                "provider": "lmstudio",
                "base_url": llama_server.base_url,
                "default_model": "gpt-oss-20b",
                "timeout_secs": 30,
                "allowed_models": ["gpt-oss-20b", "llama-2-7b"],
            }
        }
    )
    return await make_gateway(settings)


async def chat(client, body: dict[str, Any]):
    return await client.post(
        "/v1/chat/completions", json=body, headers={"Content-Type": "application/json"}
    )


async def test_health_check(client) -> None:
    resp = await client.get("/")
    assert await resp.json() == {"message": "Ok"}


async def test_provider_health_check(client) -> None:
    body = await (await client.get("/health")).json()
    assert body["status"] == "healthy"
    assert body["provider"] == "lmstudio"
    assert body["http_config"] == {"timeout_secs": 30, "connect_timeout_secs": 30, "max_retries": 3}


async def test_list_available_models(client) -> None:
    body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [{k: m[k] for k in ("id", "object", "owned_by")} for m in body["data"]] == [
        {"id": "gpt-oss-20b", "object": "model", "owned_by": "local"},
        {"id": "llama-2-7b", "object": "model", "owned_by": "local"},
    ]


def assert_completion(body: dict[str, Any]) -> None:
    assert body["id"]
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"]  # the upstream's (llama.cpp echoes the requested name)
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_basic_completion_uses_the_default_model(client) -> None:
    resp = await chat(
        client,
        {
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8,
        },
    )
    assert resp.status == 200
    assert_completion(await resp.json())


async def test_completion_with_model_and_parameters(client) -> None:
    resp = await chat(
        client,
        {
            "model": "gpt-oss-20b",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Explain quantum computing in simple terms."},
            ],
            "temperature": 0.7,
            "max_tokens": 150,
        },
    )
    assert resp.status == 200
    body = await resp.json()
    assert_completion(body)
    assert body["usage"]["completion_tokens"] <= 150


async def test_advanced_parameters(client) -> None:
    resp = await chat(
        client,
        {
            "model": "gpt-oss-20b",
            "messages": [{"role": "user", "content": "Write a creative story about a robot."}],
            "temperature": 0.9,
            "max_tokens": 200,
            "top_p": 0.95,
            "frequency_penalty": 0.5,
            "presence_penalty": 0.5,
            "stop": ["The end", "END"],
            "seed": 42,
        },
    )
    assert resp.status == 200
    assert_completion(await resp.json())


async def test_validation_error_example(client) -> None:
    resp = await chat(client, {"messages": []})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert (err["message"], err["code"]) == ("Messages array cannot be empty", "EMPTY_MESSAGES")


async def test_model_not_allowed_example(client) -> None:
    resp = await chat(
        client, {"model": "gpt-4", "messages": [{"role": "user", "content": "Hello"}]}
    )
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["message"] == (
        "Model 'gpt-4' is not in the allowed list. Available models: gpt-oss-20b, llama-2-7b"
    )
    assert err["code"] == "MODEL_NOT_ALLOWED"


async def test_provider_error_example_when_lm_studio_is_not_running(
    make_settings, make_gateway
) -> None:
    settings = make_settings(
        {"inference": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "max_retries": 0}}
    )
    client = await make_gateway(settings)
    resp = await chat(client, {"messages": [{"role": "user", "content": "Hello"}]})
    assert resp.status == 502
    err = (await resp.json())["error"]
    assert err["code"] == "PROVIDER_CONNECTION_FAILED"
    assert err["message"].startswith("Connection failed: error sending request")


async def test_legacy_error_shape_matches_the_seed_exactly(make_settings, make_gateway) -> None:
    settings = make_settings(
        {
            "server": {"error_format": "legacy"},
            "inference": {"allowed_models": ["gpt-oss-20b", "llama-2-7b"]},
        }
    )
    client = await make_gateway(settings)
    empty = await chat(client, {"messages": []})
    assert await empty.json() == {
        "error": "Messages array cannot be empty",
        "code": "EMPTY_MESSAGES",
    }
    not_allowed = await chat(
        client, {"model": "gpt-4", "messages": [{"role": "user", "content": "Hello"}]}
    )
    assert await not_allowed.json() == {
        "error": "Model 'gpt-4' is not in the allowed list. Available models: gpt-oss-20b, "
        "llama-2-7b",
        "code": "MODEL_NOT_ALLOWED",
    }
