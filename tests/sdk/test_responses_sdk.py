"""The openai SDK's Responses API through the gateway: translated onto chat for the mock and an
OpenAI-compatible upstream (stream events, function calls both ways, a conversation continued
by previous_response_id from the store, GET/DELETE), native pass-through for the openai plugin."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.support.fake_upstream import Action, FakeUpstream, openai_plugin_settings

TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "lookup",
        "description": "Look a word up",
        "parameters": {"type": "object", "properties": {"input": {"type": "string"}}},
    }
]


@pytest.fixture
async def mock_sdk(make_settings, make_gateway) -> AsyncIterator[openai.AsyncOpenAI]:
    client = await make_gateway(make_settings({"inference": {"provider": "mock"}}))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    yield sdk
    await sdk.close()


async def test_non_stream_response_with_usage(mock_sdk: openai.AsyncOpenAI) -> None:
    resp = await mock_sdk.responses.create(
        model="mock-model", input="Say hello", instructions="Be brief", max_output_tokens=5
    )
    assert resp.object == "response"
    assert resp.id.startswith("resp_")
    assert resp.output_text == "Mock reply to: Say hello"
    assert resp.status == "incomplete"  # 5 tokens: cut by max_output_tokens
    assert resp.incomplete_details is not None
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage is not None
    assert resp.usage.output_tokens == 5
    assert resp.usage.total_tokens == resp.usage.input_tokens + 5
    assert resp.instructions == "Be brief"


async def test_stream_has_the_standard_event_sequence(mock_sdk: openai.AsyncOpenAI) -> None:
    stream = await mock_sdk.responses.create(
        model="mock-model", input="Say hello", max_output_tokens=4, stream=True
    )
    events: list[Any] = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[4:-4] == ["response.output_text.delta"] * 4
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "Mock reply to: Say"
    final = events[-1].response
    assert final.output_text == deltas
    assert final.usage is not None
    assert final.usage.output_tokens == 4


async def test_two_turns_by_previous_response_id_and_get_delete(
    mock_sdk: openai.AsyncOpenAI,
) -> None:
    first = await mock_sdk.responses.create(model="mock-model", input="My name is Ann")
    second = await mock_sdk.responses.create(
        model="mock-model", input="What is my name", previous_response_id=first.id
    )
    assert second.previous_response_id == first.id
    # The mock's prompt_tokens count the whole conversation: the first turn came along.
    alone = await mock_sdk.responses.create(model="mock-model", input="What is my name")
    assert second.usage is not None
    assert alone.usage is not None
    assert second.usage.input_tokens > alone.usage.input_tokens
    fetched = await mock_sdk.responses.retrieve(first.id)
    assert fetched.output_text == first.output_text
    await mock_sdk.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as gone:
        await mock_sdk.responses.retrieve(first.id)
    assert gone.value.code == "RESPONSE_NOT_FOUND"
    with pytest.raises(openai.BadRequestError) as missing:
        await mock_sdk.responses.create(
            model="mock-model", input="again", previous_response_id=first.id
        )
    assert missing.value.code == "PREVIOUS_RESPONSE_NOT_FOUND"
    assert missing.value.param == "previous_response_id"
    unstored = await mock_sdk.responses.create(model="mock-model", input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        await mock_sdk.responses.retrieve(unstored.id)


async def test_function_call_round_trip(mock_sdk: openai.AsyncOpenAI) -> None:
    resp = await mock_sdk.responses.create(model="mock-model", input="apple", tools=TOOLS)
    calls: list[Any] = [item for item in resp.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "lookup"
    assert json.loads(call.arguments) == {"input": "apple"}
    follow = await mock_sdk.responses.create(
        model="mock-model",
        previous_response_id=resp.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "a fruit"}],
        tools=TOOLS,
    )
    assert follow.output_text.startswith("Mock reply to:")
    # The same round trip without the store: the caller sends the whole conversation.
    again = await mock_sdk.responses.create(
        model="mock-model",
        store=False,
        input=[
            {"role": "user", "content": "apple"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": "lookup",
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "a fruit"},
        ],
        tools=TOOLS,
    )
    assert again.output_text.startswith("Mock reply to:")


async def test_streamed_function_call(mock_sdk: openai.AsyncOpenAI) -> None:
    stream = await mock_sdk.responses.create(
        model="mock-model", input="pear", tools=TOOLS, stream=True
    )
    events: list[Any] = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    done = events[-2].item
    assert done.type == "function_call"
    assert json.loads(done.arguments) == {"input": "pear"}
    assert events[-1].response.output[0].call_id == done.call_id


# --- translated onto an OpenAI-compatible upstream; native through the openai plugin -------


@pytest.fixture
async def fake_sdk(gateway_for) -> AsyncIterator[openai.AsyncOpenAI]:
    client = await gateway_for()
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    yield sdk
    await sdk.close()


async def test_translated_request_reaches_the_upstream_as_chat(
    fake_sdk: openai.AsyncOpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script(Action("status", 500, {"error": "down"}))  # retried before any byte
    resp = await fake_sdk.responses.create(
        model="gpt-oss-20b",
        instructions="Be nice",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        max_output_tokens=30,
        tools=TOOLS,
        tool_choice={"type": "function", "name": "lookup"},
        text={"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}}},
    )
    assert resp.output_text == "Hello from the fake upstream."
    assert resp.usage is not None
    assert resp.usage.total_tokens == 19
    sent = fake_upstream.requests[-1]
    assert sent["messages"] == [
        {"role": "system", "content": "Be nice"},
        {"role": "user", "content": "Hi"},
    ]
    assert sent["max_tokens"] == 30
    assert sent["tools"][0]["function"]["name"] == "lookup"
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"]["name"] == "out"
    assert len(fake_upstream.requests) == 2


async def test_translated_stream_cut_ends_with_error_and_failed(
    fake_sdk: openai.AsyncOpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script(Action("cut", chunks=4))
    stream = await fake_sdk.responses.create(model="gpt-oss-20b", input="Hi", stream=True)
    events: list[Any] = [event async for event in stream]
    assert events[0].type == "response.created"
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2].code == "STREAM_INTERRUPTED"
    assert events[-1].response.status == "failed"
    assert events[-1].response.id == events[0].response.id
    assert [e.sequence_number for e in events] == list(range(len(events)))


async def test_native_pass_through_with_the_openai_plugin(
    make_settings, make_gateway, fake_upstream: FakeUpstream
) -> None:
    client = await make_gateway(openai_plugin_settings(make_settings, fake_upstream))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    resp = await sdk.responses.create(
        model="gpt-x", input="Hi", previous_response_id="resp_upstream_old"
    )
    assert resp.id == "resp_upstream"
    assert resp.output_text == "Native hello."
    sent = fake_upstream.requests[-1]
    assert sent["input"] == "Hi"
    assert sent["previous_response_id"] == "resp_upstream_old"  # the upstream's own store
    assert "messages" not in sent
    stream = await sdk.responses.create(model="gpt-x", input="Hi", stream=True)
    events: list[Any] = [event async for event in stream]
    assert [e.type for e in events] == [
        "response.created",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.completed",
    ]
    assert events[-1].response.output_text == "Native hello."
    await sdk.close()


async def test_an_upstream_without_responses_is_translated_from_then_on(
    make_settings, make_gateway, fake_upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """The openai plugin in front of llama.cpp (no /v1/responses): the first request finds the
    bare 404 and is answered through chat anyway; later ones go straight to chat."""
    fake_upstream.has_responses = False
    client = await make_gateway(openai_plugin_settings(make_settings, fake_upstream))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    stream = await sdk.responses.create(model="gpt-x", input="Hi", stream=True)
    events: list[Any] = [event async for event in stream]
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text
    assert fake_upstream.responses_calls == 1
    assert "messages" in fake_upstream.requests[-1]  # the chat translation reached the upstream
    resp = await sdk.responses.create(model="gpt-x", input="Hi again")
    assert resp.output_text
    assert fake_upstream.responses_calls == 1  # not probed again
    assert sum("has no /v1/responses" in r.getMessage() for r in caplog.records) == 1
    await sdk.close()


async def test_a_404_with_a_code_is_an_answer_not_a_missing_route(
    make_settings, make_gateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script(
        Action(
            "status",
            status=404,
            body={"error": {"message": "no such model", "type": "invalid_request_error",
                            "param": None, "code": "model_not_found"}},
        )
    )  # fmt: skip
    client = await make_gateway(openai_plugin_settings(make_settings, fake_upstream))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        await sdk.responses.create(model="gpt-x", input="Hi")
    assert err.value.code == "model_not_found"
    resp = await sdk.responses.create(model="gpt-x", input="Hi")
    assert resp.id == "resp_upstream"  # still native
    assert fake_upstream.responses_calls == 2
    await sdk.close()


async def test_responses_translate_never_asks_the_upstreams_responses_api(
    make_settings, make_gateway, fake_upstream: FakeUpstream
) -> None:
    settings = openai_plugin_settings(make_settings, fake_upstream, responses="translate")
    client = await make_gateway(settings)
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    resp = await sdk.responses.create(model="gpt-x", input="Hi")
    assert resp.output_text
    assert fake_upstream.responses_calls == 0
    await sdk.close()
