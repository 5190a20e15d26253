"""The openai SDK's embeddings and (legacy) completions calls through the gateway: against the
mock provider and a fake OpenAI-compatible upstream, streamed and not, with routing fallbacks
and usage counted."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import openai
import pytest

from tests.support.fake_upstream import Action, FakeUpstream


@pytest.fixture
async def fake_sdk(gateway_for) -> AsyncIterator[openai.AsyncOpenAI]:
    client = await gateway_for({"allowed_models": ["gpt-oss-20b", "llama-2-7b"]})
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    yield sdk
    await sdk.close()


@pytest.fixture
async def mock_sdk(make_settings, make_gateway) -> AsyncIterator[openai.AsyncOpenAI]:
    client = await make_gateway(make_settings({"inference": {"provider": "mock"}}))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    yield sdk
    await sdk.close()


# --- embeddings ------------------------------------------------------------------------------


async def test_embeddings_pass_through_float_and_base64(
    fake_sdk: openai.AsyncOpenAI, fake_upstream: FakeUpstream
) -> None:
    one = await fake_sdk.embeddings.create(model="gpt-oss-20b", input="hello")
    assert [d.embedding for d in one.data] == [[0.0, 5.0, 1.0, 0.0]]
    assert fake_upstream.requests[-1]["input"] == ["hello"]
    assert fake_upstream.requests[-1]["encoding_format"] == "float"
    assert one.usage.prompt_tokens == 3
    # The SDK asks for base64 by default when encoding_format is not given, and decodes it.
    many = await fake_sdk.embeddings.create(model="gpt-oss-20b", input=["a", "bcd"])
    assert [d.embedding for d in many.data] == [[0.0, 1.0, 1.0, 0.0], [1.0, 3.0, 1.0, 0.0]]
    assert [d.index for d in many.data] == [0, 1]
    tokens = await fake_sdk.embeddings.create(
        model="gpt-oss-20b", input=[[1, 2, 3], [4]], encoding_format="float"
    )
    assert [d.embedding[1] for d in tokens.data] == [3.0, 1.0]


async def test_embeddings_per_token_vectors_are_mean_pooled(
    fake_sdk: openai.AsyncOpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.embedding_per_token = True  # llama-cpp-python without a pooling type
    out = await fake_sdk.embeddings.create(
        model="gpt-oss-20b", input="hey", encoding_format="float"
    )
    vec = out.data[0].embedding
    mean = [0.0, 3.0, 2.0, 0.0]
    norm = math.sqrt(sum(x * x for x in mean))
    assert vec == pytest.approx([x / norm for x in mean])


async def test_embeddings_from_the_mock_are_deterministic(mock_sdk: openai.AsyncOpenAI) -> None:
    a = await mock_sdk.embeddings.create(model="mock-model", input=["x y", "z"])
    b = await mock_sdk.embeddings.create(model="mock-model", input="x y", dimensions=16)
    assert len(a.data) == 2
    assert len(a.data[0].embedding) == 64
    assert len(b.data[0].embedding) == 16
    again = await mock_sdk.embeddings.create(model="mock-model", input=["x y", "z"])
    assert again.data[0].embedding == a.data[0].embedding
    assert a.data[0].embedding != a.data[1].embedding
    assert sum(x * x for x in a.data[0].embedding) == pytest.approx(1.0)
    assert a.usage.prompt_tokens == 3


async def test_embeddings_upstream_failure_is_retried(
    fake_sdk: openai.AsyncOpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script(Action("status", 500, {"error": "down"}))
    out = await fake_sdk.embeddings.create(model="gpt-oss-20b", input="hello")
    assert len(out.data) == 1
    assert len(fake_upstream.requests) == 2  # the 500, then the retry


# --- completions -----------------------------------------------------------------------------


async def test_completions_non_stream_and_stream(
    fake_sdk: openai.AsyncOpenAI, fake_upstream: FakeUpstream
) -> None:
    done = await fake_sdk.completions.create(
        model="gpt-oss-20b", prompt="Once", max_tokens=5, echo=False, suffix="!", best_of=1
    )
    assert done.choices[0].text == "Once upon a time."
    assert done.object == "text_completion"
    assert done.usage is not None
    assert done.usage.total_tokens == 9
    sent = fake_upstream.requests[-1]
    assert (sent["prompt"], sent["suffix"], sent["best_of"]) == ("Once", "!", 1)
    stream = await fake_sdk.completions.create(
        model="gpt-oss-20b", prompt="Once", stream=True, stream_options={"include_usage": True}
    )
    text, usage, finishes = "", None, []
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
            finishes.append(chunk.choices[0].finish_reason)
        if chunk.usage:
            usage = chunk.usage
    assert text == "tok0 tok1 tok2 "
    assert finishes[-1] == "length"
    assert usage is not None
    assert usage.completion_tokens == 3


async def test_completions_from_the_mock(mock_sdk: openai.AsyncOpenAI) -> None:
    done = await mock_sdk.completions.create(model="mock-model", prompt="Say hi", max_tokens=4)
    assert done.choices[0].text == "Mock reply to: Say"
    assert done.choices[0].finish_reason == "length"
    streamed = await mock_sdk.completions.create(
        model="mock-model", prompt="Say hi", max_tokens=4, stream=True
    )
    assert "".join([c.choices[0].text async for c in streamed if c.choices]) == (
        "Mock reply to: Say"
    )
