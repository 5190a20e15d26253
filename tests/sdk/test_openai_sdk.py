"""The official openai SDK as the client: what it accepts is the gateway's contract."""

from __future__ import annotations

import asyncio

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.support.fake_upstream import Action, FakeUpstream

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]


@pytest.fixture
async def base_url(gateway_for) -> str:
    client = await gateway_for({"allowed_models": ["gpt-oss-20b", "llama-2-7b"]})
    return str(client.make_url("/v1"))


async def test_async_client_completion_models_and_stream(base_url: str) -> None:
    sdk = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    completion = await sdk.chat.completions.create(model="gpt-oss-20b", messages=USER)
    assert completion.choices[0].message.content == "Hello from the fake upstream."
    assert completion.usage is not None
    assert completion.usage.total_tokens == 19
    assert completion._request_id  # x-request-id exposed by the SDK
    models = await sdk.models.list()
    assert [m.id for m in models.data] == ["gpt-oss-20b", "llama-2-7b"]
    assert (await sdk.models.retrieve("llama-2-7b")).owned_by == "local"
    stream = await sdk.chat.completions.create(
        model="gpt-oss-20b", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == "tok0 tok1 tok2 "
    assert usage is not None
    assert usage.completion_tokens == 3
    await sdk.close()


async def test_sync_client(base_url: str) -> None:
    def run() -> tuple[str, str]:
        with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0) as sdk:
            done = sdk.chat.completions.create(model="gpt-oss-20b", messages=USER)
            streamed = "".join(
                c.choices[0].delta.content or ""
                for c in sdk.chat.completions.create(
                    model="gpt-oss-20b", messages=USER, stream=True
                )
                if c.choices
            )
            return done.choices[0].message.content or "", streamed

    done, streamed = await asyncio.to_thread(run)
    assert done == "Hello from the fake upstream."
    assert streamed == "tok0 tok1 tok2 "


async def test_error_exceptions_carry_codes(base_url: str, fake_upstream: FakeUpstream) -> None:
    sdk = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        await sdk.chat.completions.create(model="gpt-oss-20b", messages=[])
    assert bad.value.code == "EMPTY_MESSAGES"
    assert bad.value.param == "messages"
    assert bad.value.request_id
    with pytest.raises(openai.BadRequestError) as not_allowed:
        await sdk.chat.completions.create(model="gpt-4", messages=USER)
    assert not_allowed.value.code == "MODEL_NOT_ALLOWED"
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk.models.retrieve("nope")
    assert missing.value.code == "MODEL_NOT_FOUND"
    fake_upstream.script(*[Action("status", 500, {"error": "down"})] * 4)
    with pytest.raises(openai.InternalServerError) as upstream:
        await sdk.chat.completions.create(model="gpt-oss-20b", messages=USER)
    assert upstream.value.status_code == 502
    assert upstream.value.code == "PROVIDER_ERROR"
    fake_upstream.script(
        Action("status", 429, {"error": {"message": "no"}}, headers={"Retry-After": "300"})
    )
    with pytest.raises(openai.RateLimitError) as limited:
        await sdk.chat.completions.create(model="gpt-oss-20b", messages=USER)
    # Paused for the capped Retry-After (retry_after_max_secs, 30 s), which the client is told.
    assert limited.value.response.headers["retry-after"] == "30"
    await sdk.close()


async def test_mid_stream_failure_raises_in_the_sdk(
    base_url: str, fake_upstream: FakeUpstream
) -> None:
    sdk = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    fake_upstream.script(Action("cut", chunks=6))
    stream = await sdk.chat.completions.create(model="gpt-oss-20b", messages=USER, stream=True)
    received = []

    async def consume() -> None:
        async for chunk in stream:
            received.append(chunk)

    with pytest.raises(openai.APIError) as err:
        await consume()
    assert received  # it had started: the failure is reported in-band, not as a silent end
    # What a user can act on, not a library's class names.
    assert "closed the stream after 4 chunks" in err.value.message
    assert "Error" not in err.value.message
    await sdk.close()
