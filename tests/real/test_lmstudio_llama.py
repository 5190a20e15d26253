"""The lmstudio plugin against a real llama.cpp server (the engine inside LM Studio).

Through the gateway with the official openai SDK as client: models, completions, streams, and
the real-world quirks this upstream has (it ignores ``stream_options.include_usage``, so the
gateway must synthesise the usage chunk; it serves any model name, so the gateway's own
allowed list is what returns MODEL_NOT_ALLOWED).
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.real.conftest import LlamaServer

pytestmark = pytest.mark.real
USER: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]


@pytest.fixture
async def sdk(make_settings, make_gateway, llama_server: LlamaServer):
    settings = make_settings(
        {
            "inference": {
                "provider": "lmstudio",
                "base_url": llama_server.base_url,
                "default_model": llama_server.model,
                "timeout_secs": 60,
            }
        }
    )
    client = await make_gateway(settings)
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    yield sdk
    await sdk.close()


async def test_models_come_from_the_real_server(sdk, llama_server: LlamaServer) -> None:
    models = await sdk.models.list()
    assert [m.id for m in models.data] == [llama_server.model]
    assert models.data[0].owned_by == "local"
    assert isinstance(models.data[0].created, int)  # llama-cpp-python omits it; we fill it


async def test_completion_with_real_usage(sdk, llama_server: LlamaServer) -> None:
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


async def test_stream_with_synthesised_usage(sdk, llama_server: LlamaServer) -> None:
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
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert usage.completion_tokens == len(content_chunks)
    assert 0 < usage.completion_tokens <= 6
    assert usage.prompt_tokens > 0
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish in (["length"], ["stop"])


async def test_default_model_and_raw_sse(make_settings, make_gateway, llama_server) -> None:
    settings = make_settings(
        {"inference": {"base_url": llama_server.base_url, "default_model": llama_server.model}}
    )
    client = await make_gateway(settings)
    resp = await client.post(
        "/v1/chat/completions", json={"messages": USER, "max_tokens": 4, "stream": True}
    )
    assert resp.status == 200
    raw = await resp.text()
    blocks = [b for b in raw.split("\n\n") if b]
    assert blocks[-1] == "data: [DONE]"
    for block in blocks[:-1]:
        assert block.startswith("data: ")
        assert json.loads(block[6:])["object"] == "chat.completion.chunk"  # no pings leak


async def test_allowed_list_guards_a_server_that_serves_any_name(
    make_settings, make_gateway, llama_server
) -> None:
    settings = make_settings(
        {"inference": {"base_url": llama_server.base_url, "allowed_models": [llama_server.model]}}
    )
    client = await make_gateway(settings)
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        await sdk.chat.completions.create(model="gpt-4", messages=USER, max_tokens=2)
    assert err.value.code == "MODEL_NOT_ALLOWED"
    await sdk.close()


# --- the other endpoints (issue 14) -----------------------------------------------------------


async def test_embeddings_one_64_float_vector_per_input(sdk, llama_server: LlamaServer) -> None:
    out = await sdk.embeddings.create(
        model=llama_server.model, input=["hello", "world"], encoding_format="float"
    )
    assert [len(d.embedding) for d in out.data] == [64, 64]
    assert out.data[0].embedding != out.data[1].embedding
    assert out.usage.prompt_tokens > 0
    decoded = await sdk.embeddings.create(model=llama_server.model, input="hello")  # base64
    assert decoded.data[0].embedding == pytest.approx(out.data[0].embedding, rel=1e-5)
    # The same server still chats.
    done = await sdk.chat.completions.create(model=llama_server.model, messages=USER, max_tokens=4)
    assert done.choices[0].message.content is not None


async def test_legacy_completions_stream_and_not(sdk, llama_server: LlamaServer) -> None:
    done = await sdk.completions.create(model=llama_server.model, prompt="Once", max_tokens=6)
    assert done.object == "text_completion"
    assert done.choices[0].finish_reason in ("length", "stop")
    assert done.usage is not None
    assert 0 < done.usage.completion_tokens <= 6
    stream = await sdk.completions.create(
        model=llama_server.model,
        prompt="Once",
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    assert pieces
    assert usage is not None
    assert usage.completion_tokens > 0


async def test_responses_translated_onto_chat(sdk, llama_server: LlamaServer) -> None:
    """llama-cpp-python has no /v1/responses: the gateway translates onto chat."""
    first = await sdk.responses.create(
        model=llama_server.model, input="My name is Ann", max_output_tokens=6
    )
    assert first.status in ("completed", "incomplete")
    assert first.usage is not None
    assert first.usage.input_tokens > 0
    assert 0 < first.usage.output_tokens <= 6
    second = await sdk.responses.create(
        model=llama_server.model,
        input="What is my name?",
        previous_response_id=first.id,
        max_output_tokens=6,
    )
    alone = await sdk.responses.create(
        model=llama_server.model, input="What is my name?", max_output_tokens=6
    )
    assert second.usage is not None
    assert alone.usage is not None
    assert second.usage.input_tokens > alone.usage.input_tokens  # the first turn came along
    # A function-call round trip as a client sends it (the call, then its output).
    tools: list[Any] = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
    follow = await sdk.responses.create(
        model=llama_server.model,
        input=[
            {"role": "user", "content": "Look up apple"},
            {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "a fruit"},
        ],
        tools=tools,
        max_output_tokens=4,
    )
    assert follow.status in ("completed", "incomplete")
    stream = await sdk.responses.create(
        model=llama_server.model, input="Hi", max_output_tokens=4, stream=True
    )
    events: list[Any] = [event async for event in stream]
    assert events[0].type == "response.created"
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert events[-1].response.usage.output_tokens > 0  # estimated: llama sends no usage
