"""The openai SDK against keys, limits and budgets: the error classes, codes and headers it sees."""

from __future__ import annotations

import hashlib

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
KEY = "sk-sdk-test-0123456789abcdef"
ADMIN = "sdk-admin-token"


@pytest.fixture
async def gateway(gateway_for):
    return await gateway_for(
        {"allowed_models": ["gpt-oss-20b", "llama-2-7b"]},
        server={"admin_token": ADMIN},
        auth={
            "enabled": True,
            "keys": {
                "team": {
                    "key_sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                    "models": ["gpt-oss-20b"],
                    "rpm": 2,
                    "tpm": 10000,
                }
            },
        },
    )


async def test_sdk_sees_auth_permission_and_rate_limit_errors(gateway) -> None:
    base_url = str(gateway.make_url("/v1"))
    wrong = openai.AsyncOpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth_err:
        await wrong.chat.completions.create(model="gpt-oss-20b", messages=USER)
    assert auth_err.value.code == "INVALID_API_KEY"
    await wrong.close()

    sdk = openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as perm:
        await sdk.chat.completions.create(model="llama-2-7b", messages=USER)
    assert perm.value.code == "MODEL_NOT_ALLOWED_FOR_KEY"

    raw = await sdk.chat.completions.with_raw_response.create(model="gpt-oss-20b", messages=USER)
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert raw.headers["x-ratelimit-limit-tokens"] == "10000"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 10000
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    assert raw.parse().choices[0].message.content
    await sdk.chat.completions.create(model="gpt-oss-20b", messages=USER)
    with pytest.raises(openai.RateLimitError) as limited:
        await sdk.chat.completions.create(model="gpt-oss-20b", messages=USER)
    assert limited.value.code == "RATE_LIMITED"
    assert limited.value.response.headers["x-should-retry"] == "true"
    assert int(limited.value.response.headers["retry-after"]) >= 1
    await sdk.close()


async def test_sdk_budget_is_not_retried(gateway_for) -> None:
    gateway = await gateway_for(
        auth={
            "enabled": True,
            "keys": {
                "team": {
                    "key_sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                    "budget": {"tokens": 10, "period": "day"},
                }
            },
        },
    )
    sdk = openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=KEY, max_retries=3)
    await sdk.chat.completions.create(model="gpt-oss-20b", messages=USER)  # 19 tokens
    with pytest.raises(openai.RateLimitError) as spent:
        await sdk.chat.completions.create(model="gpt-oss-20b", messages=USER)
    assert spent.value.code == "BUDGET_EXCEEDED"
    assert spent.value.response.headers["x-should-retry"] == "false"
    await sdk.close()


async def test_sdk_reads_rate_limit_headers_on_every_endpoint(gateway) -> None:
    """Embeddings, completions, responses and the models list each carry the six headers;
    so do the 403 and 429 errors the SDK raises."""
    sdk = openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=KEY, max_retries=0)
    calls = (
        sdk.embeddings.with_raw_response.create(model="gpt-oss-20b", input="hi"),
        sdk.models.with_raw_response.list(),
        sdk.completions.with_raw_response.create(model="gpt-oss-20b", prompt="hi", max_tokens=5),
    )
    seen = []
    for call in calls:
        raw = await call
        assert raw.headers["x-ratelimit-limit-requests"] == "2"
        assert raw.headers["x-ratelimit-limit-tokens"] == "10000"
        assert raw.headers["x-ratelimit-reset-tokens"].endswith("s")
        seen.append(raw.headers["x-ratelimit-remaining-requests"])
    assert seen == ["1", "1", "0"]
    errors: list[openai.APIStatusError] = []
    with pytest.raises(openai.RateLimitError) as limited:
        await sdk.responses.create(model="gpt-oss-20b", input="hi")
    errors.append(limited.value)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await sdk.embeddings.create(model="llama-2-7b", input="hi")
    errors.append(denied.value)
    for error in errors:
        assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
        assert error.response.headers["x-ratelimit-limit-tokens"] == "10000"
        assert int(error.response.headers["x-ratelimit-remaining-tokens"]) <= 10000
    await sdk.close()
