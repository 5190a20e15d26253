"""The OpenAI-compatible wire layer with mocked HTTP (aioresponses): bodies, headers, mapping."""

from __future__ import annotations

import aiohttp
import pytest
from aioresponses import CallbackResult

from inference_server import errors as e
from inference_server.providers.base import CallContext, ProviderConfig, Timeouts
from inference_server.providers.openai_compat import OpenAICompatibleProvider

URL = "http://upstream.test/v1"
T = Timeouts(connect=1, total=5, first_byte=5, idle=5)
CTX = CallContext(
    request_id="req_1",
    upstream_model="up-model",
    timeouts=T,
    headers={"traceparent": "00-abc-def-01"},
)


def provider(session: aiohttp.ClientSession, api_key: str | None = "sk-test"):
    cfg = ProviderConfig(
        name="p", plugin="lmstudio", base_url=URL, api_key=api_key, timeouts=T, max_retries=0
    )
    return OpenAICompatibleProvider(session, cfg)


async def test_chat_sends_upstream_model_auth_and_correlation(http_mock, session) -> None:
    seen = {}

    def capture(url, **kwargs):
        seen.update(kwargs)
        return CallbackResult(payload={"id": "x", "choices": [{"index": 0}]})

    http_mock.post(f"{URL}/chat/completions", callback=capture)
    result = await provider(session).chat(
        {"model": "public", "messages": [], "stream": False, "tools": [1]}, CTX
    )
    assert result["id"] == "x"
    import orjson

    body = orjson.loads(seen["data"])
    assert body == {"model": "up-model", "messages": [], "tools": [1]}
    assert seen["headers"]["Authorization"] == "Bearer sk-test"
    assert seen["headers"]["X-Client-Request-Id"] == "req_1"
    assert seen["headers"]["traceparent"] == "00-abc-def-01"


async def test_no_auth_header_without_key(http_mock, session) -> None:
    seen = {}

    def capture(url, **kwargs):
        seen.update(kwargs)
        return CallbackResult(payload={"choices": []})

    http_mock.post(f"{URL}/chat/completions", callback=capture)
    await provider(session, api_key=None).chat({"messages": []}, CTX)
    assert "Authorization" not in seen["headers"]


@pytest.mark.parametrize(
    ("status", "body", "cls", "code"),
    [
        (500, {"error": {"message": "boom"}}, e.ProviderError, "PROVIDER_ERROR"),
        (401, {"error": {"message": "bad key"}}, e.ProviderAuthFailed, "PROVIDER_AUTH_FAILED"),
        (429, {"error": {"message": "slow"}}, e.ProviderRateLimited, "rate_limit_exceeded"),
        (400, {"error": "No models loaded"}, e.ProviderRejected, "PROVIDER_REJECTED"),
    ],
)
async def test_status_mapping(http_mock, session, status, body, cls, code) -> None:
    http_mock.post(f"{URL}/chat/completions", status=status, payload=body)
    with pytest.raises(cls) as info:
        await provider(session).chat({"messages": []}, CTX)
    assert info.value.code == code


async def test_error_inside_a_200_body(http_mock, session) -> None:
    http_mock.post(f"{URL}/chat/completions", payload={"error": {"message": "oom"}})
    with pytest.raises(e.ProviderError, match="oom"):
        await provider(session).chat({"messages": []}, CTX)


async def test_connection_error_maps_to_connection_failed(http_mock, session) -> None:
    http_mock.post(
        f"{URL}/chat/completions",
        exception=aiohttp.ClientConnectorError(
            connection_key=None,  # type: ignore[arg-type]
            os_error=OSError(111, "refused"),
        ),
    )
    with pytest.raises(e.ProviderConnectionFailed):
        await provider(session).chat({"messages": []}, CTX)


async def test_stream_parses_sse_and_asks_for_usage(http_mock, session) -> None:
    seen = {}
    sse = (
        b': ping\r\n\r\ndata: {"choices": [{"delta": {"content": "a"}}]}\r\n\r\n'
        b'data: {"choices": [], "usage": {"total_tokens": 3}}\r\n\r\ndata: [DONE]\r\n\r\n'
    )

    def capture(url, **kwargs):
        seen.update(kwargs)
        return CallbackResult(body=sse, content_type="text/event-stream")

    http_mock.post(f"{URL}/chat/completions", callback=capture)
    ctx = CallContext(request_id="r", upstream_model="m", timeouts=T, include_usage=True)
    chunks = [c async for c in provider(session).stream_chat({"messages": []}, ctx)]
    assert chunks == [
        {"choices": [{"delta": {"content": "a"}}]},
        {"choices": [], "usage": {"total_tokens": 3}},
    ]
    import orjson

    body = orjson.loads(seen["data"])
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


async def test_stream_without_any_event_is_a_bad_response(http_mock, session) -> None:
    http_mock.post(f"{URL}/chat/completions", body=b"", content_type="text/event-stream")
    with pytest.raises(e.ProviderBadResponse):
        [c async for c in provider(session).stream_chat({"messages": []}, CTX)]


async def test_stream_error_event_before_first_chunk_is_retryable(http_mock, session) -> None:
    http_mock.post(
        f"{URL}/chat/completions",
        body=b'data: {"error": "overloaded"}\n\n',
        content_type="text/event-stream",
    )
    with pytest.raises(e.ProviderError) as info:
        [c async for c in provider(session).stream_chat({"messages": []}, CTX)]
    assert info.value.retryable
    assert not isinstance(info.value, e.StreamInterrupted)


async def test_list_models_and_health(http_mock, session) -> None:
    http_mock.get(f"{URL}/models", payload={"data": [{"id": "a", "owned_by": "me"}, {"id": "b"}]})
    http_mock.get(f"{URL}/models", status=503, body="down")
    p = provider(session)
    assert [m.id for m in await p.list_models()] == ["a", "b"]
    status = await p.health()
    assert not status.healthy
    assert "503" in status.detail
