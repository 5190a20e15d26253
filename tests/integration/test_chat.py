"""The gateway against a fake OpenAI-compatible upstream on a free port: every documented path."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.support.fake_upstream import Action
from tests.support.procs import free_port

USER = [{"role": "user", "content": "What is the capital of France?"}]


def events(raw: str) -> list[Any]:
    """SSE data payloads of a response body ([DONE] kept as the string)."""
    out: list[Any] = []
    for block in raw.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def post(client, body: dict[str, Any], **kw: Any):
    return await client.post("/v1/chat/completions", json=body, **kw)


# --- success paths ------------------------------------------------------------------------


async def test_completion_uses_default_model_and_keeps_request_id(gateway_for, fake_upstream):
    client = await gateway_for()
    resp = await post(client, {"messages": USER}, headers={"x-request-id": "abc-123"})
    assert resp.status == 200
    assert resp.headers["x-request-id"] == "abc-123"
    body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["usage"] == {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
    assert fake_upstream.requests[0]["model"] == "gpt-oss-20b"
    assert fake_upstream.headers[0]["X-Client-Request-Id"] == "abc-123"


async def test_unvalidated_parameters_pass_through_unchanged(gateway_for, fake_upstream):
    client = await gateway_for()
    extra = {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "logprobs": True,
        "n": 2,
        "user": "u-1",
        "seed": 42,
        "top_p": 0.95,
        "stop": ["The end", "END"],
        "frequency_penalty": 0.5,
        "presence_penalty": 0.5,
        "temperature": 0.9,
        "max_tokens": 200,
        "some_future_field": {"x": [1, 2]},
    }
    resp = await post(client, {"model": "gpt-oss-20b", "messages": USER, **extra})
    assert resp.status == 200
    sent = fake_upstream.requests[0]
    for key, value in extra.items():
        assert sent[key] == value, key
    assert "stream" not in sent


async def test_model_not_allowed_lists_available_models(gateway_for):
    client = await gateway_for({"allowed_models": ["gpt-oss-20b", "llama-2-7b"]})
    resp = await post(
        client, {"model": "gpt-4", "messages": [{"role": "user", "content": "Hello"}]}
    )
    assert resp.status == 400
    assert (await resp.json())["error"] == {
        "message": "Model 'gpt-4' is not in the allowed list. Available models: gpt-oss-20b, llama-2-7b",
        "type": "invalid_request_error",
        "param": "model",
        "code": "MODEL_NOT_ALLOWED",
    }


async def test_models_allowed_list_and_lookup(gateway_for):
    client = await gateway_for({"allowed_models": ["gpt-oss-20b", "llama-2-7b"]})
    body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in body["data"]] == [
        ("gpt-oss-20b", "model", "local"),
        ("llama-2-7b", "model", "local"),
    ]
    assert all(isinstance(m["created"], int) for m in body["data"])
    one = await client.get("/v1/models/llama-2-7b")
    assert (await one.json())["id"] == "llama-2-7b"
    missing = await client.get("/v1/models/nope")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "MODEL_NOT_FOUND"


async def test_models_from_provider_are_cached(gateway_for, fake_upstream):
    client = await gateway_for({"models_cache_secs": 60})
    first = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in first["data"]] == ["gpt-oss-20b", "llama-2-7b"]
    fake_upstream.models = ("changed",)
    second = await (await client.get("/v1/models")).json()
    assert second == first


async def test_health_reports_the_seed_shape(gateway_for):
    client = await gateway_for()
    resp = await client.get("/health")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "healthy"
    assert body["provider"] == "lmstudio"
    assert body["http_config"] == {"timeout_secs": 30, "connect_timeout_secs": 30, "max_retries": 3}
    assert (await (await client.get("/")).json()) == {"message": "Ok"}


async def test_health_is_unhealthy_when_provider_is_down(make_settings, make_gateway):
    settings = make_settings({"inference": {"base_url": f"http://127.0.0.1:{free_port()}/v1"}})
    client = await make_gateway(settings)
    resp = await client.get("/health")
    assert resp.status == 503
    assert (await resp.json())["status"] == "unhealthy"


async def test_request_connection_failure_marks_unhealthy_at_once(
    make_settings, make_gateway, fake_upstream
):
    settings = make_settings(
        {
            "inference": {"base_url": fake_upstream.base_url, "max_retries": 0},
            "health": {"probe_max_age_secs": 3600},
        }
    )
    client = await make_gateway(settings)
    assert (await client.get("/health")).status == 200
    # The upstream goes away: a request sees the refusal, and /health says so at once
    # although the last probe is far younger than its max age.
    await fake_upstream.server.close()
    resp = await post(client, {"messages": USER})
    assert resp.status == 502
    health = await client.get("/health")
    assert health.status == 503


# --- client errors over HTTP ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"messages": []}, 400, "EMPTY_MESSAGES"),
        ({}, 400, "MISSING_PARAMETER"),
        ({"messages": USER, "temperature": 5}, 400, "INVALID_PARAMETER"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "INVALID_PARAMETER"),
    ],
)
async def test_validation_errors(gateway_for, fake_upstream, body, status, code):
    client = await gateway_for()
    resp = await post(client, body)
    assert resp.status == status
    err = (await resp.json())["error"]
    assert err["code"] == code
    assert set(err) == {"message", "type", "param", "code"}
    assert fake_upstream.requests == []


async def test_transport_errors(gateway_for):
    client = await gateway_for({}, server={"max_body_bytes": 2048})
    bad_json = await client.post(
        "/v1/chat/completions", data=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert (bad_json.status, (await bad_json.json())["error"]["code"]) == (400, "INVALID_JSON")
    wrong_type = await client.post(
        "/v1/chat/completions", data=b"{}", headers={"Content-Type": "text/plain"}
    )
    assert (wrong_type.status, (await wrong_type.json())["error"]["code"]) == (
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    )
    big = await post(client, {"messages": [{"role": "user", "content": "x" * 5000}]})
    assert (big.status, (await big.json())["error"]["code"]) == (413, "REQUEST_TOO_LARGE")
    missing = await client.get("/v2/nothing")
    assert (missing.status, (await missing.json())["error"]["code"]) == (404, "NOT_FOUND")
    wrong_method = await client.get("/v1/chat/completions")
    assert (wrong_method.status, (await wrong_method.json())["error"]["code"]) == (
        405,
        "METHOD_NOT_ALLOWED",
    )
    assert wrong_method.headers["x-request-id"]


async def test_legacy_error_format(gateway_for):
    client = await gateway_for({}, server={"error_format": "legacy"})
    resp = await post(client, {"messages": []})
    assert await resp.json() == {
        "error": "Messages array cannot be empty",
        "code": "EMPTY_MESSAGES",
    }


# --- upstream faults ------------------------------------------------------------------------


async def test_upstream_refused_is_502_after_retries(make_settings, make_gateway):
    settings = make_settings(
        {"inference": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "max_retries": 2}}
    )
    client = await make_gateway(settings)
    resp = await post(client, {"messages": [{"role": "user", "content": "Hello"}]})
    assert resp.status == 502
    err = (await resp.json())["error"]
    assert err["code"] == "PROVIDER_CONNECTION_FAILED"
    assert err["message"].startswith("Connection failed: error sending request")


async def test_upstream_timeout_is_504(gateway_for, fake_upstream):
    client = await gateway_for({"timeout_secs": 0.2, "max_retries": 1})
    fake_upstream.script(Action(delay=2), Action(delay=2))
    resp = await post(client, {"messages": USER})
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "PROVIDER_TIMEOUT"
    assert len(fake_upstream.requests) == 2


async def test_upstream_5xx_is_retried(gateway_for, fake_upstream):
    client = await gateway_for({"max_retries": 3})
    fake_upstream.script(Action("status", 500, {"error": "x"}), Action("status", 503, "busy"))
    resp = await post(client, {"messages": USER})
    assert resp.status == 200
    assert len(fake_upstream.requests) == 3


async def test_upstream_5xx_exhausted_is_502(gateway_for, fake_upstream):
    client = await gateway_for({"max_retries": 1})
    fake_upstream.script(*[Action("status", 500, {"error": "kaput"})] * 2)
    resp = await post(client, {"messages": USER})
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "PROVIDER_ERROR"


async def test_upstream_429_retry_after_honoured_then_kept(gateway_for, fake_upstream):
    client = await gateway_for({"max_retries": 3, "retry_after_max_secs": 5})
    fake_upstream.script(
        Action("status", 429, {"error": {"message": "slow"}}, headers={"Retry-After": "1"})
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await post(client, {"messages": USER})).status == 200
    assert loop.time() - started >= 0.9
    # A Retry-After beyond the cap is not waited out: the client gets the upstream's 429 with
    # the pause the gateway took (the cap) as Retry-After, and nothing more goes upstream.
    fake_upstream.script(
        Action(
            "status",
            429,
            {"error": {"message": "later", "type": "requests", "code": "rate_limit_exceeded"}},
            headers={"Retry-After": "120"},
        )
    )
    resp = await post(client, {"messages": USER})
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "5"
    assert resp.headers["x-should-retry"] == "true"  # one attempt: the client may come back
    assert resp.headers["x-inference-error-source"] == "upstream"
    assert (await resp.json())["error"] == {
        "message": "later",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    sent = len(fake_upstream.requests)
    again = await post(client, {"messages": USER})
    assert again.status == 429
    assert int(again.headers["Retry-After"]) <= 5
    assert len(fake_upstream.requests) == sent  # paused: not sent upstream


async def test_upstream_4xx_keeps_status_and_message(gateway_for, fake_upstream):
    client = await gateway_for()
    fake_upstream.script(
        Action(
            "status",
            400,
            {
                "error": {
                    "message": "This model's maximum context length is 256 tokens",
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": "context_length_exceeded",
                }
            },
        )
    )
    resp = await post(client, {"messages": USER})
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert err["message"] == "This model's maximum context length is 256 tokens"
    assert err["code"] == "context_length_exceeded"  # the upstream's own, unchanged
    assert err["type"] == "invalid_request_error"
    assert err["param"] == "messages"
    assert resp.headers["x-inference-error-source"] == "upstream"
    assert resp.headers["x-should-retry"] == "false"
    assert len(fake_upstream.requests) == 1


async def test_upstream_garbage_is_502(gateway_for, fake_upstream):
    client = await gateway_for()
    fake_upstream.script(Action("garbage"))
    resp = await post(client, {"messages": USER})
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "PROVIDER_BAD_RESPONSE"


# --- streaming --------------------------------------------------------------------------------


async def test_stream_forwards_chunks_then_done(gateway_for, fake_upstream):
    client = await gateway_for()
    resp = await post(client, {"messages": USER, "stream": True})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    evs = events(await resp.text())
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "tok0 tok1 tok2 "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)


async def test_stream_usage_from_upstream(gateway_for, fake_upstream):
    client = await gateway_for()
    resp = await post(
        client, {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    )
    evs = events(await resp.text())
    assert fake_upstream.requests[0]["stream_options"] == {"include_usage": True}
    usage_chunk = evs[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert all(c["usage"] is None for c in evs[:-2])


async def test_stream_usage_synthesised_when_upstream_omits_it(gateway_for, fake_upstream):
    client = await gateway_for()
    fake_upstream.script(Action(chunks=4, usage=False))
    resp = await post(
        client, {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    )
    evs = events(await resp.text())
    assert evs[-1] == "[DONE]"
    usage = evs[-2]
    assert usage["choices"] == []
    assert usage["id"] == evs[0]["id"]
    assert usage["usage"]["completion_tokens"] == 4
    assert usage["usage"]["prompt_tokens"] > 0
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 4


async def test_stream_cut_midway_ends_with_one_error_event(gateway_for, fake_upstream):
    client = await gateway_for()
    fake_upstream.script(Action("cut", chunks=6))
    resp = await post(client, {"messages": USER, "stream": True})
    assert resp.status == 200
    evs = events(await resp.text())
    assert "[DONE]" not in evs
    errors = [e for e in evs if "error" in e]
    assert len(errors) == 1
    assert evs[-1] is errors[0]
    assert errors[0]["error"]["code"] == "STREAM_INTERRUPTED"
    assert len(fake_upstream.requests) == 1  # never retried after the first byte


async def test_stream_in_band_upstream_error(gateway_for, fake_upstream):
    client = await gateway_for()
    fake_upstream.script(Action("stream_error", chunks=4))
    evs = events(await (await post(client, {"messages": USER, "stream": True})).text())
    assert "[DONE]" not in evs
    assert "model crashed" in evs[-1]["error"]["message"]


async def test_stream_failure_before_first_chunk_gets_a_status(gateway_for, fake_upstream):
    client = await gateway_for({"max_retries": 1})
    fake_upstream.script(*[Action("status", 500, {"error": "down"})] * 2)
    resp = await post(client, {"messages": USER, "stream": True})
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "PROVIDER_ERROR"
    fake_upstream.script(Action("status", 500, {"error": "blip"}))
    ok = await post(client, {"messages": USER, "stream": True})
    assert ok.status == 200
    assert events(await ok.text())[-1] == "[DONE]"


async def test_stream_first_byte_timeout_is_504(gateway_for, fake_upstream):
    client = await gateway_for({"stream_first_byte_timeout_secs": 0.2, "max_retries": 0})
    fake_upstream.script(Action(delay=3))
    resp = await post(client, {"messages": USER, "stream": True})
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "PROVIDER_TIMEOUT"


async def test_stream_idle_timeout_ends_with_error_event(gateway_for, fake_upstream):
    client = await gateway_for({"stream_idle_timeout_secs": 0.3, "max_retries": 0})
    fake_upstream.script(Action(chunks=3, interval=1.0))
    resp = await post(client, {"messages": USER, "stream": True})
    evs = events(await resp.text())
    assert "[DONE]" not in evs
    assert evs[-1]["error"]["code"] == "STREAM_INTERRUPTED"


async def test_client_disconnect_cancels_upstream(gateway_for, fake_upstream):
    client = await gateway_for()
    fake_upstream.script(Action(chunks=50, interval=0.05))
    resp = await post(client, {"messages": USER, "stream": True})
    await resp.content.readuntil(b"\n\n")  # the stream has started
    resp.close()  # the client goes away mid-stream
    await asyncio.wait_for(fake_upstream.cancelled.wait(), timeout=5)
    assert fake_upstream.finished_streams == 0
