"""Talk directly to the real llama.cpp server: prove the fixture and pin its behaviour.

These tests do not involve the gateway. They show that the ``llama_server`` fixture
serves the tiny model, and they record how llama-cpp-python's server actually behaves
where it differs from OpenAI, so that a change in the pinned upstream shows up here
first rather than as a puzzling gateway failure.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

if TYPE_CHECKING:  # conftest is imported by pytest itself; import it here for types only
    from tests.real.conftest import LlamaServer

pytestmark = pytest.mark.real

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)


def _chat_body(server: LlamaServer, content: str, **extra: Any) -> dict[str, Any]:
    """A chat request; max_tokens is always set because the tiny model never stops."""
    body: dict[str, Any] = {
        "model": server.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
    }
    body.update(extra)
    return body


async def _post_chat(server: LlamaServer, body: dict[str, Any]) -> tuple[int, Any]:
    """POST /chat/completions and return (status, decoded JSON body)."""
    async with (
        aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session,
        session.post(f"{server.base_url}/chat/completions", json=body) as response,
    ):
        return response.status, await response.json()


async def _stream_chat(
    server: LlamaServer, body: dict[str, Any]
) -> tuple[int, str, list[str], list[str]]:
    """POST a streaming chat request; return (status, content type, data payloads, comments).

    SSE events are separated by blank lines; ``data:`` lines carry JSON or ``[DONE]``
    and lines starting with ``:`` are comments (sse-starlette's ``: ping``).
    """
    payloads: list[str] = []
    comments: list[str] = []
    async with (
        aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as session,
        session.post(
            f"{server.base_url}/chat/completions", json={**body, "stream": True}
        ) as response,
    ):
        async for raw in response.content:
            line = raw.decode("utf-8").rstrip("\r\n")
            if line.startswith("data:"):
                payloads.append(line[len("data:") :].strip())
            elif line.startswith(":"):
                comments.append(line)
        return response.status, response.headers.get("Content-Type", ""), payloads, comments


def test_models_endpoint_lists_only_the_tiny_alias(llama_server: LlamaServer) -> None:
    """GET /v1/models answers an OpenAI model list whose only id is the alias."""
    with urllib.request.urlopen(f"{llama_server.base_url}/models", timeout=10) as response:
        assert response.status == 200
        listing = json.load(response)

    assert listing["object"] == "list"
    assert [model["id"] for model in listing["data"]] == [llama_server.model]
    assert listing["data"][0]["object"] == "model"


async def test_chat_completion_returns_one_choice_and_real_usage(
    llama_server: LlamaServer,
) -> None:
    """A non-streaming chat runs to max_tokens and reports real token counts."""
    status, short = await _post_chat(llama_server, _chat_body(llama_server, "Hi"))
    assert status == 200
    assert short["object"] == "chat.completion"
    assert short["id"].startswith("chatcmpl-")
    assert short["model"] == llama_server.model
    [choice] = short["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["message"]["content"]
    assert choice["finish_reason"] == "length"

    usage = short["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    longer = "What is the capital of France? Paris is the capital of France."
    status, long = await _post_chat(llama_server, _chat_body(llama_server, longer))
    assert status == 200
    assert long["usage"]["prompt_tokens"] > usage["prompt_tokens"]


async def test_temperature_zero_gives_identical_completions(llama_server: LlamaServer) -> None:
    """temperature=0 is greedy, so the same request yields the same text (usable as an oracle)."""
    body = _chat_body(llama_server, "hello world", temperature=0)
    first = await _post_chat(llama_server, body)
    second = await _post_chat(llama_server, body)
    assert first[0] == second[0] == 200
    assert first[1]["choices"][0]["message"] == second[1]["choices"][0]["message"]


async def test_stream_sends_chat_completion_chunks_then_done(llama_server: LlamaServer) -> None:
    """stream=True yields a role chunk, one content chunk per token, a finish chunk, [DONE]."""
    status, content_type, payloads, _ = await _stream_chat(
        llama_server, _chat_body(llama_server, "Hi", max_tokens=5)
    )
    assert status == 200
    assert content_type.startswith("text/event-stream")
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]

    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all(len(chunk["choices"]) == 1 for chunk in chunks)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    finishes = [chunk["choices"][0]["finish_reason"] for chunk in chunks]
    assert deltas[0] == {"role": "assistant"}
    assert all(set(delta) == {"content"} for delta in deltas[1:-1])
    assert len(deltas[1:-1]) == 5
    assert deltas[-1] == {}
    assert finishes == [None] * (len(chunks) - 1) + ["length"]


async def test_stream_ignores_include_usage(llama_server: LlamaServer) -> None:
    """Current upstream behaviour: stream_options.include_usage is ignored (no usage chunk).

    OpenAI would end with a chunk whose choices are empty and whose usage is set. If
    this test fails, llama-cpp-python started honouring it and the gateway's usage
    accounting for streams can rely on the upstream.
    """
    status, _, payloads, _ = await _stream_chat(
        llama_server,
        _chat_body(llama_server, "Hi", max_tokens=3, stream_options={"include_usage": True}),
    )
    assert status == 200
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert all(chunk.get("usage") is None for chunk in chunks)
    assert all(chunk["choices"] for chunk in chunks)


async def test_unknown_model_is_served_by_the_loaded_model_and_echoed(
    llama_server: LlamaServer,
) -> None:
    """Current upstream behaviour: an unknown model name is not a 404; it is echoed back."""
    status, body = await _post_chat(
        llama_server, {**_chat_body(llama_server, "Hi"), "model": "no-such-model"}
    )
    assert status == 200
    assert body["model"] == "no-such-model"
    assert body["usage"]["completion_tokens"] == 8


async def test_context_overflow_is_an_openai_style_400(llama_server: LlamaServer) -> None:
    """A prompt longer than n_ctx=512 is rejected with OpenAI's context_length_exceeded error."""
    status, body = await _post_chat(llama_server, _chat_body(llama_server, "hello " * 600))
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["param"] == "messages"


async def test_streamed_context_overflow_is_an_empty_200(llama_server: LlamaServer) -> None:
    """Current upstream behaviour: a streamed overflow is a 200 event stream with no events.

    There is no error event and no [DONE]; a gateway must treat an upstream stream that
    ends without [DONE] as a failure.
    """
    status, content_type, payloads, _ = await _stream_chat(
        llama_server, _chat_body(llama_server, "hello " * 600)
    )
    assert status == 200
    assert content_type.startswith("text/event-stream")
    assert payloads == []


async def test_invalid_field_is_a_500_with_an_openai_style_error(llama_server: LlamaServer) -> None:
    """Current upstream behaviour: request validation errors are 500, not 400/422."""
    status, body = await _post_chat(llama_server, _chat_body(llama_server, "Hi", max_tokens="x"))
    assert status == 500
    assert body["error"]["type"] == "internal_server_error"
    assert "max_tokens" in body["error"]["message"]


async def test_concurrent_streams_both_finish(llama_server: LlamaServer) -> None:
    """With --interrupt_requests False, overlapping requests queue instead of cutting a stream."""
    long_stream = asyncio.create_task(
        _stream_chat(llama_server, _chat_body(llama_server, "Hi", max_tokens=200))
    )
    await asyncio.sleep(0.05)
    status, body = await _post_chat(llama_server, _chat_body(llama_server, "Hi", max_tokens=2))
    assert status == 200
    assert body["choices"][0]["finish_reason"] == "length"

    _, _, payloads, _ = await long_stream
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["choices"][0]["finish_reason"] == "length"
    assert len(payloads) == 200 + 3
