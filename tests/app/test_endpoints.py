"""/v1/embeddings and /v1/completions over HTTP: validation errors in the OpenAI envelope, an
operation the route's provider does not serve, metrics by endpoint."""

from __future__ import annotations

from typing import Any

import pytest
from inference_server_mock import plugin as mock_plugin

from inference_server.providers import (
    CallContext,
    ChatRequest,
    ChatResponse,
    ProviderPlugin,
)
from tests.support.fake_upstream import FakeUpstream, completion
from tests.support.providers import ChatStub


@pytest.mark.parametrize(
    ("path", "body", "code", "param"),
    [
        ("/v1/embeddings", {"model": "gpt-oss-20b"}, "MISSING_PARAMETER", "input"),
        ("/v1/embeddings", {"input": ""}, "INVALID_PARAMETER", "input"),
        ("/v1/embeddings", {"input": []}, "INVALID_PARAMETER", "input"),
        ("/v1/embeddings", {"input": ["a", 1]}, "INVALID_PARAMETER", "input"),
        ("/v1/embeddings", {"input": ["a"] * 2049}, "INVALID_PARAMETER", "input"),
        ("/v1/embeddings", {"input": "a", "encoding_format": "hex"}, "INVALID_PARAMETER",
         "encoding_format"),
        ("/v1/embeddings", {"input": "a", "dimensions": 0}, "INVALID_PARAMETER", "dimensions"),
        ("/v1/embeddings", {"input": "a", "model": "gpt-4"}, "MODEL_NOT_ALLOWED", "model"),
        ("/v1/completions", {"model": "gpt-oss-20b"}, "MISSING_PARAMETER", "prompt"),
        ("/v1/completions", {"prompt": {"a": 1}}, "INVALID_PARAMETER", "prompt"),
        ("/v1/completions", {"prompt": "a", "temperature": 3}, "INVALID_PARAMETER",
         "temperature"),
        ("/v1/completions", {"prompt": "a", "logprobs": 6}, "INVALID_PARAMETER", "logprobs"),
        ("/v1/completions", {"prompt": "a", "n": 3, "best_of": 2}, "INVALID_PARAMETER",
         "best_of"),
        ("/v1/completions", {"prompt": "a", "stop": ["1", "2", "3", "4", "5"]},
         "INVALID_PARAMETER", "stop"),
        ("/v1/completions", {"prompt": "a", "stream": True, "best_of": 2},
         "INVALID_PARAMETER", "best_of"),
        ("/v1/completions", ["prompt"], "INVALID_REQUEST", None),
    ],
)  # fmt: skip
async def test_validation_errors_are_400_envelopes(
    gateway_for, fake_upstream: FakeUpstream, path: str, body: Any, code: str, param: str | None
) -> None:
    client = await gateway_for({"allowed_models": ["gpt-oss-20b"]})
    resp = await client.post(path, json=body)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    assert error["message"]
    assert fake_upstream.requests == []


async def test_large_bodies_are_validated_by_their_own_endpoints_schema(
    make_settings, make_gateway
) -> None:
    """A body over 64 KB is validated off the event loop: with the endpoint's schema, not chat's
    (an embeddings or completions body has no ``messages``)."""
    client = await make_gateway(make_settings({"inference": {"provider": "mock"}}))
    big = ["word " * 20] * 1000  # ~100 KB
    resp = await client.post("/v1/embeddings", json={"input": big})
    assert resp.status == 200, await resp.text()
    assert len((await resp.json())["data"]) == 1000
    resp = await client.post("/v1/completions", json={"prompt": "x" * 100_000, "max_tokens": 2})
    assert resp.status == 200, await resp.text()
    resp = await client.post("/v1/embeddings", json={"input": [*big, 1]})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "input"


async def test_malformed_json_and_media_type(gateway_for) -> None:
    client = await gateway_for()
    for path in ("/v1/embeddings", "/v1/completions"):
        resp = await client.post(path, data=b"{", headers={"Content-Type": "application/json"})
        assert (resp.status, (await resp.json())["error"]["code"]) == (400, "INVALID_JSON")
        resp = await client.post(path, data=b"{}", headers={"Content-Type": "text/plain"})
        assert resp.status == 415


class ChatOnly(ChatStub):
    """A provider with no optional capabilities."""

    calls = 0

    async def chat(self, request: ChatRequest, ctx: CallContext) -> ChatResponse:
        ChatOnly.calls += 1
        return completion(ctx.upstream_model)


async def test_operation_the_provider_lacks_is_a_clear_400_and_falls_back(
    make_settings, make_gateway
) -> None:
    plugin = ProviderPlugin(name="chatonly", factory=ChatOnly, default_base_url="x://y")
    settings = make_settings(
        {
            "providers": {
                "plain": {"plugin": "chatonly"},
                "mocked": {"plugin": "mock"},
            },
            "models": {
                "m": {"provider": "plain"},
                "both": {"provider": "plain", "fallbacks": ["e"]},
                "e": {"provider": "mocked"},
            },
            "routing": {"panic": False, "breaker": {"consecutive_failures": 1}},
        },
        plugins={"chatonly": plugin, "mock": mock_plugin},
    )
    client = await make_gateway(settings)
    for _ in range(3):  # never a breaker fault: still a 400 every time, never a 503
        resp = await client.post("/v1/embeddings", json={"model": "m", "input": "hi"})
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["code"] == "OPERATION_NOT_SUPPORTED"
        assert "does not serve embeddings" in error["message"]
    resp = await client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert (await resp.json())["error"]["code"] == "OPERATION_NOT_SUPPORTED"
    assert ChatOnly.calls == 0
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.post("/v1/chat/completions", json=chat)).status == 200
    # A route whose first provider lacks the capability falls back to one that has it.
    resp = await client.post("/v1/embeddings", json={"model": "both", "input": "hi"})
    assert resp.status == 200, await resp.text()
    assert resp.headers["x-inference-deployment"] == "mocked/e"


async def test_metrics_count_each_endpoint(gateway_for) -> None:
    client = await gateway_for()
    assert (await client.post("/v1/embeddings", json={"input": "a"})).status == 200
    assert (await client.post("/v1/completions", json={"prompt": "a"})).status == 200
    text = await (await client.get("/metrics")).text()
    assert 'endpoint="/v1/embeddings"' in text
    assert 'endpoint="/v1/completions"' in text


# --- /v1/responses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"model": "gpt-oss-20b"}, "MISSING_PARAMETER", "input"),
        ({"input": []}, "INVALID_PARAMETER", "input"),
        ({"input": [1]}, "INVALID_PARAMETER", "input"),
        ({"input": "a", "temperature": -1}, "INVALID_PARAMETER", "temperature"),
        ({"input": "a", "max_output_tokens": 0}, "INVALID_PARAMETER", "max_output_tokens"),
        ({"input": "a", "tool_choice": "sometimes"}, "INVALID_PARAMETER", "tool_choice"),
        ({"input": "a", "text": {"format": {"type": "xml"}}}, "INVALID_PARAMETER",
         "text.format.type"),
        ({"input": "a", "previous_response_id": "x" * 200}, "INVALID_PARAMETER",
         "previous_response_id"),
        ({"input": "a", "previous_response_id": "../etc"}, "INVALID_PARAMETER",
         "previous_response_id"),
        ({"input": "a", "tools": [{"name": "f"}]}, "MISSING_PARAMETER", "tools.0.type"),
        ({"input": "a", "tools": [{"type": "web_search"}]}, "INVALID_PARAMETER", "tools.0.type"),
        ({"input": [{"role": "robot", "content": "x"}]}, "INVALID_PARAMETER", "input.0.role"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "INVALID_PARAMETER",
         "input.0.call_id"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": 3}]},
         "INVALID_PARAMETER", "input.0.output"),
        ({"input": [{"type": "file_search_call"}]}, "INVALID_PARAMETER", "input.0.type"),
        ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]},
         "INVALID_PARAMETER", "input.0.content.0"),
    ],
)  # fmt: skip
async def test_responses_validation_errors(
    gateway_for, fake_upstream: FakeUpstream, body: Any, code: str, param: str
) -> None:
    client = await gateway_for()
    resp = await client.post("/v1/responses", json=body)
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert fake_upstream.requests == []


async def test_unknown_or_malformed_response_ids_are_404(gateway_for) -> None:
    client = await gateway_for()
    for rid in ("resp_nope", "a%20b", "x" * 300):
        for method in ("GET", "DELETE"):
            resp = await client.request(method, f"/v1/responses/{rid}")
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "RESPONSE_NOT_FOUND"


# --- /v1/models capabilities -------------------------------------------------------------------


async def test_models_say_what_each_serves(make_settings, make_gateway) -> None:
    plugin = ProviderPlugin(name="chatonly", factory=ChatOnly, default_base_url="x://y")
    settings = make_settings(
        {
            "providers": {"plain": {"plugin": "chatonly"}, "mocked": {"plugin": "mock"}},
            "models": {
                "chat-only": {"provider": "plain"},
                "everything": {"provider": "mocked"},
                "embedder": {"provider": "mocked", "capabilities": ["embeddings"]},
                "with-fallback": {"provider": "plain", "fallbacks": ["everything"]},
            },
        },
        plugins={"chatonly": plugin, "mock": mock_plugin},
    )
    client = await make_gateway(settings)
    data = (await (await client.get("/v1/models")).json())["data"]
    caps = {m["id"]: m["capabilities"] for m in data}
    assert caps == {
        "chat-only": ["chat", "responses"],
        "everything": ["chat", "completions", "embeddings", "responses"],
        "embedder": ["embeddings"],
        "with-fallback": ["chat", "completions", "embeddings", "responses"],
    }
    one = await (await client.get("/v1/models/embedder")).json()
    assert one["capabilities"] == ["embeddings"]
    # A declared capability list is enforced: the embedding model does not chat.
    chat = {"model": "embedder", "messages": [{"role": "user", "content": "hi"}]}
    resp = await client.post("/v1/chat/completions", json=chat)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "OPERATION_NOT_SUPPORTED"
    resp = await client.post("/v1/embeddings", json={"model": "embedder", "input": "hi"})
    assert resp.status == 200


def test_unknown_capabilities_are_a_config_error(make_settings) -> None:
    from inference_server.settings import ConfigError

    with pytest.raises(ConfigError) as info:
        make_settings(
            {
                "providers": {"mocked": {"plugin": "mock"}},
                "models": {"m": {"provider": "mocked", "capabilities": ["chat", "images"]}},
            }
        )
    assert any(p.startswith("models.m.capabilities: must list") for p in info.value.problems)
