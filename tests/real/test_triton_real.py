"""The triton plugin against a real Triton Inference Server (PyTriton), through the gateway.

The models (tests/real/triton_models.py) echo the prompt they receive word by word, so every
assertion about content is an assertion about the chat template and the parameter mapping that
reached Triton.  Covered: ``/generate`` (a batched model, token counts and finish reason from its
outputs), ``/generate_stream`` with delta and cumulative text, a decoupled model answering a
non-streaming request, stop strings across events, the official openai SDK, and the error paths
a client can meet: a model Triton does not know, a configured model that is unloaded (not
ready), and a model that fails mid-stream (exactly one ``data: {"error": ...}`` event, no
``[DONE]``).  ``/v1/embeddings`` goes through KServe v2 ``infer`` to the ``embed`` model, whose
vectors the tests compute themselves (``expected_vector``); Triton's own statistics show how
many requests carried how many inputs (the batched path).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
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
#: triton_models.EMBED_DIMS and EMBED_MAX_BATCH (that module imports PyTriton: not importable here).
EMBED_DIMS = 8
EMBED_MAX_BATCH = 8
#: Texts to embed; the first and last are the same text.
TEXTS = ["hello Triton", "a second, longer text to embed", "ünïcödé ✓", "hello Triton"]

#: The triton provider's models: upstream name → options (the issue's settings shape).
TRITON_MODELS: dict[str, Any] = {
    "echo": {"chat_template": "chatml"},
    "echo_stream": {},
    "echo_cumulative": {"stream_output": "cumulative"},
    "fail_stream": {},
    "spare": {},
    "missing_model": {},
    # Its first float output is ``norm``: the vector output must be named (and the text input,
    # which is not the default ``text_input``).
    "embed": {"inputs": {"prompt": "TEXT"}, "outputs": {"embedding": "VECTOR"}},
}
#: Public model names → upstream models.
PUBLIC = {
    "triton-llm": "echo",
    "triton-stream": "echo_stream",
    "triton-cumulative": "echo_cumulative",
    "triton-fail": "fail_stream",
    "triton-spare": "spare",
    "triton-missing": "missing_model",
    "triton-embed": "embed",
}

Client = TestClient[web.Request, web.Application]


def expected_vector(text: str) -> list[float]:
    """``embed``'s vector for ``text``: one plus the count of UTF-8 bytes per ``byte % 8``
    bucket, scaled to unit length (computed here in float64; Triton's is float32)."""
    counts = [1.0] * EMBED_DIMS
    for byte in text.encode("utf-8"):
        counts[byte % EMBED_DIMS] += 1.0
    norm = math.sqrt(sum(c * c for c in counts))
    return [c / norm for c in counts]


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


# --- embeddings: KServe v2 infer -----------------------------------------------------------


async def embed_stats(session: aiohttp.ClientSession, server: TritonServer) -> tuple[int, int]:
    """(requests, inputs) Triton has counted for ``embed``: one request may batch many inputs.

    The statistics API is one of PyTriton's token-protected endpoints.
    """
    async with session.get(
        f"{server.base_url}/v2/models/embed/stats",
        headers={"triton-access-token": server.access_token},
    ) as resp:
        assert resp.status == 200, await resp.text()
        stats = (await resp.json(content_type=None))["model_stats"][0]
    return int(stats["inference_stats"]["success"]["count"]), int(stats["inference_count"])


async def stats_after(
    session: aiohttp.ClientSession, server: TritonServer, before: tuple[int, int], inputs: int
) -> tuple[int, int]:
    """The (requests, inputs) added since ``before``, once Triton has counted ``inputs`` more
    inputs (its statistics may trail the response by a moment; bounded wait)."""
    deadline = time.monotonic() + 10
    now = await embed_stats(session, server)
    while now[1] - before[1] < inputs and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        now = await embed_stats(session, server)
    return now[0] - before[0], now[1] - before[1]


async def test_openai_sdk_embeds_a_string_and_a_list_one_vector_per_input(
    sdk: openai.AsyncOpenAI,
) -> None:
    one = await sdk.embeddings.create(model="triton-embed", input=TEXTS[0], encoding_format="float")
    assert len(one.data) == 1
    assert len(one.data[0].embedding) == EMBED_DIMS
    assert one.data[0].embedding == pytest.approx(expected_vector(TEXTS[0]), abs=1e-6)

    many = await sdk.embeddings.create(model="triton-embed", input=TEXTS, encoding_format="float")
    assert [d.index for d in many.data] == list(range(len(TEXTS)))
    for text, item in zip(TEXTS, many.data, strict=True):
        assert len(item.embedding) == EMBED_DIMS
        assert item.embedding == pytest.approx(expected_vector(text), abs=1e-6)
    # Deterministic: the same text gives the same vector, alone or in a batch.
    assert many.data[0].embedding == many.data[3].embedding == one.data[0].embedding
    assert many.data[0].embedding != many.data[1].embedding
    # The model reports no token counts: estimated at ~4 characters per token, per input.
    tokens = sum(math.ceil(len(t) / 4) for t in TEXTS)
    assert (many.usage.prompt_tokens, many.usage.total_tokens) == (tokens, tokens)


async def test_base64_embeddings_decode_to_the_same_floats(sdk: openai.AsyncOpenAI) -> None:
    floats = await sdk.embeddings.create(
        model="triton-embed", input=TEXTS[:2], encoding_format="float"
    )
    encoded = await sdk.embeddings.create(
        model="triton-embed", input=TEXTS[:2], encoding_format="base64"
    )
    for plain, packed in zip(floats.data, encoded.data, strict=True):
        # Typed list[float] by the SDK, but it hands an explicit base64 answer over as it came.
        raw: object = packed.embedding
        assert isinstance(raw, str)
        decoded = struct.unpack(f"<{EMBED_DIMS}f", base64.b64decode(raw))
        assert list(decoded) == pytest.approx(plain.embedding, rel=1e-6)
    # Without encoding_format the SDK asks for base64 itself and decodes it to floats.
    default = await sdk.embeddings.create(model="triton-embed", input=TEXTS[:2])
    for plain, decoded_by_sdk in zip(floats.data, default.data, strict=True):
        assert decoded_by_sdk.embedding == pytest.approx(plain.embedding, rel=1e-6)


async def test_inputs_go_as_batches_of_at_most_the_models_max_batch_size(
    sdk: openai.AsyncOpenAI, triton_server: TritonServer, session: aiohttp.ClientSession
) -> None:
    """One ``infer`` request per batch (Triton counts requests and inputs apart); more inputs
    than ``max_batch_size`` are split, since Triton rejects a larger batch."""
    before = await embed_stats(session, triton_server)
    out = await sdk.embeddings.create(model="triton-embed", input=TEXTS, encoding_format="float")
    assert len(out.data) == len(TEXTS)
    assert await stats_after(session, triton_server, before, len(TEXTS)) == (1, len(TEXTS))

    texts = [f"text number {i}" for i in range(2 * EMBED_MAX_BATCH + 3)]
    before = await embed_stats(session, triton_server)
    out = await sdk.embeddings.create(model="triton-embed", input=texts, encoding_format="float")
    assert [d.index for d in out.data] == list(range(len(texts)))
    for text, item in zip(texts, out.data, strict=True):
        assert item.embedding == pytest.approx(expected_vector(text), abs=1e-6)
    assert await stats_after(session, triton_server, before, len(texts)) == (3, len(texts))


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": USER}),
        ("/v1/chat/completions", {"messages": USER, "stream": True}),
        ("/v1/completions", {"prompt": "Once"}),
    ],
)
async def test_an_embedding_model_cannot_chat_or_complete(
    gateway: Client, path: str, body: dict[str, Any]
) -> None:
    """Triton's ``/generate`` would run it and answer vectors without text (an empty reply)."""
    resp = await gateway.post(path, json={"model": "triton-embed", **body})
    assert resp.status == 400
    assert resp.headers["x-should-retry"] == "false"
    error = (await resp.json())["error"]
    assert (error["code"], error["param"]) == ("UNSUPPORTED", "model")
    assert "no text output 'text_output'" in error["message"]
    assert "/v1/embeddings" in error["message"]


async def test_token_ids_are_refused_by_a_text_embedding_model(gateway: Client) -> None:
    resp = await gateway.post(
        "/v1/embeddings", json={"model": "triton-embed", "input": [[1, 2, 3]]}
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["code"], error["param"]) == ("UNSUPPORTED_PARAMETER", "input")
