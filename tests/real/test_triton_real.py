"""The triton plugin against a real Triton Inference Server (PyTriton), through the gateway.

The models (tests/real/triton_models.py) echo the prompt they receive word by word, so every
assertion about content is an assertion about the chat template and the parameter mapping that
reached Triton.  Covered: ``/generate`` (a batched model, token counts and finish reason from its
outputs), ``/generate_stream`` with delta and cumulative text, a decoupled model answering a
non-streaming request, stop strings across events, the official openai SDK, and the error paths
a client can meet: a model Triton does not know, a configured model that is unloaded (not
ready), and a model that fails mid-stream (exactly one ``data: {"error": ...}`` event, no
``[DONE]``).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from inference_server_triton import TritonProvider
from openai.types.chat import ChatCompletionMessageParam

from inference_server.providers import CallContext, ProviderConfig, Timeouts
from tests.conftest import GatewayFactory, SettingsFactory
from tests.real.triton_fixture import TritonServer

pytestmark = pytest.mark.real

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello to Triton"}]
#: The ChatML prompt for USER, split as the echo models split it: their "tokens".
PROMPT_WORDS = [
    "<|im_start|>user",
    "Say",
    "hello",
    "to",
    "Triton<|im_end|>",
    "<|im_start|>assistant",
]
TIMEOUTS = Timeouts(connect=5, total=60, first_byte=60, idle=60)

#: The triton provider's models: upstream name → options (the issue's settings shape).
TRITON_MODELS: dict[str, Any] = {
    "echo": {"chat_template": "chatml"},
    "echo_stream": {},
    "echo_cumulative": {"stream_output": "cumulative"},
    "fail_stream": {},
    "spare": {},
    "missing_model": {},
}
#: Public model names → upstream models.
PUBLIC = {
    "triton-llm": "echo",
    "triton-stream": "echo_stream",
    "triton-cumulative": "echo_cumulative",
    "triton-fail": "fail_stream",
    "triton-spare": "spare",
    "triton-missing": "missing_model",
}

Client = TestClient[web.Request, web.Application]


def echoed(limit: int | None = None) -> str:
    """What an echo model answers for USER with ``max_tokens=limit``."""
    return " ".join(PROMPT_WORDS[:limit])


@pytest.fixture
async def gateway(
    make_settings: SettingsFactory,
    make_gateway: GatewayFactory,
    triton_server: TritonServer,
) -> Client:
    settings = make_settings(
        {
            "providers": {
                "triton": {
                    "plugin": "triton",
                    "base_url": triton_server.base_url,
                    "max_retries": 0,
                    "timeout_secs": 60,
                    "models": TRITON_MODELS,
                }
            },
            "models": {
                name: {"provider": "triton", "upstream_model": up} for name, up in PUBLIC.items()
            },
        }
    )
    return await make_gateway(settings)


@pytest.fixture
async def sdk(gateway: Client) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key="x", max_retries=0)
    yield client
    await client.close()


async def stream_events(gateway: Client, body: dict[str, Any]) -> tuple[int, list[str]]:
    """POST a streaming request; (status, the ``data:`` payloads in order)."""
    resp = await gateway.post("/v1/chat/completions", json={**body, "stream": True})
    text = await resp.text()
    events = [
        line[len("data: ") :]
        for block in text.split("\n\n")
        for line in block.split("\n")
        if line.startswith("data: ")
    ]
    return resp.status, events


def content_of(events: list[str]) -> str:
    out = ""
    for event in events:
        if event == "[DONE]":
            continue
        for choice in json.loads(event).get("choices") or ():
            out += choice["delta"].get("content") or ""
    return out


# --- /generate -----------------------------------------------------------------------------


async def test_non_streaming_chat_renders_chatml_and_reads_counts_from_outputs(
    gateway: Client,
) -> None:
    resp = await gateway.post(
        "/v1/chat/completions",
        json={"model": "triton-llm", "messages": USER, "max_tokens": 3, "temperature": 1},
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["content"] == echoed(3)
    assert choice["finish_reason"] == "length"  # the model's finish_reason output
    # From the model's num_input_tokens / num_output_tokens outputs, not estimated.
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}


async def test_max_completion_tokens_and_a_natural_end(gateway: Client) -> None:
    resp = await gateway.post(
        "/v1/chat/completions",
        json={"model": "triton-llm", "messages": USER, "max_completion_tokens": 50},
    )
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] == echoed()
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_a_whole_float_max_tokens_is_typed_int32_for_triton(
    triton_server: TritonServer,
    session: aiohttp.ClientSession,
) -> None:
    """Triton itself rejects 2.0 for an INT32 input; the plugin types it from the metadata."""
    async with session.post(
        f"{triton_server.base_url}/v2/models/echo/generate",
        json={"text_input": "a b c", "max_tokens": 2.0},
    ) as raw:
        assert "non-signed-integer" in (await raw.json(content_type=None))["error"]
    config = ProviderConfig(
        name="triton",
        plugin="triton",
        base_url=triton_server.base_url,
        api_key=None,
        timeouts=TIMEOUTS,
        max_retries=0,
        options={"models": {"echo": {}}, "model_defaults": {}, "metadata_cache_secs": 60},
    )
    provider = TritonProvider(session, config)
    ctx = CallContext(request_id="r1", upstream_model="echo", timeouts=TIMEOUTS)
    result = await provider.chat({"messages": USER, "max_tokens": 2.0}, ctx)
    assert result["choices"][0]["message"]["content"] == echoed(2)


# --- /generate_stream ----------------------------------------------------------------------


async def test_streaming_chat_converts_sse_without_done(gateway: Client) -> None:
    status, events = await stream_events(
        gateway,
        {"model": "triton-stream", "messages": USER, "stream_options": {"include_usage": True}},
    )
    assert status == 200
    assert events[-1] == "[DONE]"  # the gateway's; Triton sends none
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert content_of(events) == echoed()
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) == 6
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    # echo_stream reports no counts: estimated at ~4 characters per token.
    assert usage["completion_tokens"] == -(-len(echoed()) // 4)


async def test_cumulative_stream_is_sent_as_deltas_and_honours_the_limit(gateway: Client) -> None:
    status, events = await stream_events(
        gateway, {"model": "triton-cumulative", "messages": USER, "max_tokens": 4}
    )
    assert status == 200
    assert content_of(events) == echoed(4)
    deltas = [
        c["choices"][0]["delta"]["content"]
        for c in map(json.loads, events[:-1])
        if c["choices"] and c["choices"][0]["delta"].get("content")
    ]
    assert deltas == ["<|im_start|>user", " Say", " hello", " to"]
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"  # model said so


async def test_a_stop_string_split_across_events_ends_the_stream(gateway: Client) -> None:
    # " to" and " Triton<|im_end|>" arrive as separate events; "to Tri" spans them.
    status, events = await stream_events(
        gateway, {"model": "triton-stream", "messages": USER, "stop": ["to Tri"]}
    )
    assert status == 200
    assert content_of(events) == "<|im_start|>user Say hello "
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "stop"
    assert events[-1] == "[DONE]"


async def test_a_decoupled_model_answers_a_non_streaming_request(gateway: Client) -> None:
    resp = await gateway.post(
        "/v1/chat/completions", json={"model": "triton-stream", "messages": USER, "max_tokens": 2}
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] == echoed(2)


# --- the official SDK ----------------------------------------------------------------------


async def test_openai_sdk_non_streaming(sdk: openai.AsyncOpenAI) -> None:
    done = await sdk.chat.completions.create(model="triton-llm", messages=USER, max_tokens=2)
    assert done.choices[0].message.content == echoed(2)
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None
    assert done.usage.completion_tokens == 2


async def test_openai_sdk_streaming(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="triton-stream",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    finish = None
    usage = None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == echoed()
    assert finish == "stop"
    assert usage is not None
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_openai_sdk_raises_on_the_mid_stream_error_event(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="triton-fail",
        messages=USER,
        stream=True,
    )
    text: list[str] = []

    async def consume() -> None:
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIError, match="failed mid-stream"):
        await consume()
    assert "".join(text) == echoed(3)


# --- errors --------------------------------------------------------------------------------


async def test_failure_inside_the_model_mid_stream_is_one_error_event_and_no_done(
    gateway: Client,
) -> None:
    status, events = await stream_events(gateway, {"model": "triton-fail", "messages": USER})
    assert status == 200
    assert "[DONE]" not in events
    assert content_of(events[:-1]) == echoed(3)  # fail_stream sends three words first
    errors = [json.loads(e) for e in events if "error" in json.loads(e)]
    assert len(errors) == 1
    assert events[-1] == json.dumps(errors[0], separators=(",", ":"))
    error = errors[0]["error"]
    assert error["code"] == "STREAM_INTERRUPTED"
    assert "RuntimeError: fail_stream: simulated failure inside the model" in error["message"]
    assert "Traceback" not in error["message"]


async def test_failure_inside_the_model_without_streaming_is_a_non_retryable_400(
    gateway: Client,
) -> None:
    resp = await gateway.post(
        "/v1/chat/completions", json={"model": "triton-fail", "messages": USER}
    )
    assert resp.status == 400
    assert resp.headers["x-should-retry"] == "false"
    error = (await resp.json())["error"]
    assert error["code"] == "MODEL_ERROR"
    assert error["message"].endswith(
        "RuntimeError: fail_stream: simulated failure inside the model"
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_a_model_triton_does_not_know_is_404_model_not_found(
    gateway: Client, stream: bool
) -> None:
    resp = await gateway.post(
        "/v1/chat/completions",
        json={"model": "triton-missing", "messages": USER, "stream": stream},
    )
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["code"] == "MODEL_NOT_FOUND"
    assert "missing_model" in error["message"]


async def test_health_models_and_an_unloaded_model_that_is_not_ready(
    gateway: Client,
    triton_server: TritonServer,
    session: aiohttp.ClientSession,
) -> None:
    """Readiness per model: ``spare`` is served, then unloaded through the repository API."""
    config = ProviderConfig(
        name="triton",
        plugin="triton",
        base_url=triton_server.base_url,
        api_key=None,
        timeouts=TIMEOUTS,
        max_retries=0,
        options={
            "models": {m: {} for m in ("echo", "spare")},
            "model_defaults": {},
            "metadata_cache_secs": 0,
        },
    )
    provider = TritonProvider(session, config)
    assert (await provider.health()).healthy
    assert [m.id for m in await provider.list_models()] == ["echo", "spare"]
    ok = await gateway.post(
        "/v1/chat/completions", json={"model": "triton-spare", "messages": USER}
    )
    assert ok.status == 200

    unload = urllib.request.Request(
        f"{triton_server.base_url}/v2/repository/models/spare/unload",
        data=b"{}",
        method="POST",
        headers={"triton-access-token": triton_server.access_token},
    )
    with urllib.request.urlopen(unload, timeout=30) as answer:
        assert answer.status == 200

    # Unloading is asynchronous, and Triton reports itself not ready (400) for ~2 s meanwhile.
    settled = "Triton is up; model(s) not ready: spare"
    deadline = time.monotonic() + 60
    status = await provider.health()
    while status.detail != settled and time.monotonic() < deadline:
        assert not status.healthy
        await asyncio.sleep(0.2)
        status = await provider.health()
    assert (status.healthy, status.detail) == (False, settled)
    assert [m.id for m in await provider.list_models()] == ["echo"]
    resp = await gateway.post(
        "/v1/chat/completions", json={"model": "triton-spare", "messages": USER}
    )
    assert resp.status == 502
    assert resp.headers["x-should-retry"] == "true"  # it may be loaded again
    error = (await resp.json())["error"]
    assert error["code"] == "MODEL_NOT_READY"
    assert "has no available versions" in error["message"]
