"""The openai SDK's ``client.responses.connect()`` (the Responses API's WebSocket mode) against
the gateway, unchanged: async and sync, several responses on one socket, a follow-up chained by
``previous_response_id``, lanes, cancel, errors, and a native (openai plugin) upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.support.fake_upstream import FakeUpstream, openai_plugin_settings

TERMINAL = {"response.completed", "response.incomplete", "response.failed", "error"}


@pytest.fixture
async def mock_sdk(make_settings, make_gateway) -> AsyncIterator[openai.AsyncOpenAI]:
    client = await make_gateway(make_settings({"inference": {"provider": "mock"}}))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    yield sdk
    await sdk.close()


async def one_response(conn: Any) -> list[Any]:
    """Events up to (and including) the response's terminal event, bounded."""
    events: list[Any] = []
    async with asyncio.timeout(10):
        while not events or events[-1].type not in TERMINAL:
            events.append(await conn.recv())
    return events


async def test_async_connect_three_responses_then_a_chained_follow_up(
    mock_sdk: openai.AsyncOpenAI,
) -> None:
    finals: list[Any] = []
    async with mock_sdk.responses.connect() as conn:
        for name in ("Ann", "Bob", "Cy"):
            await conn.response.create(model="mock-model", input=f"My name is {name}")
            events = await one_response(conn)
            kinds = [e.type for e in events]
            assert kinds[:2] == ["response.created", "response.in_progress"]
            assert "response.output_text.delta" in kinds
            assert kinds[-1] == "response.completed"
            assert [e.sequence_number for e in events] == list(range(len(events)))
            final = events[-1].response
            assert final.output_text.startswith(f"Mock reply to: My name is {name}")
            # every event of one response names the same response
            assert {e.response.id for e in events if hasattr(e, "response")} == {final.id}
            finals.append(final)
        assert len({f.id for f in finals}) == 3
        await conn.response.create(
            model="mock-model", input="What is my name", previous_response_id=finals[0].id
        )
        chained = (await one_response(conn))[-1].response
        await conn.response.create(model="mock-model", input="What is my name")
        alone = (await one_response(conn))[-1].response
    assert chained.previous_response_id == finals[0].id
    # the mock counts the whole conversation as input: the first turn came along
    assert chained.usage.input_tokens > alone.usage.input_tokens
    # stored like an HTTP response: the HTTP API continues and fetches it too
    fetched = await mock_sdk.responses.retrieve(chained.id)
    assert fetched.output_text == chained.output_text


async def test_sync_connect_three_responses_then_a_chained_follow_up(
    make_settings, make_gateway
) -> None:
    """The sync client blocks: it runs in a thread while the gateway serves on this loop."""
    client = await make_gateway(make_settings({"inference": {"provider": "mock"}}))
    await asyncio.to_thread(sync_scenario, str(client.make_url("/v1")))


def sync_scenario(base_url: str) -> None:
    sdk = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
    finals: list[Any] = []
    with sdk.responses.connect() as conn:
        for text in ("one", "two", "three"):
            conn.response.create(model="mock-model", input=text)
            events: list[Any] = []
            while not events or events[-1].type not in TERMINAL:
                events.append(conn.recv())
            assert events[-1].type == "response.completed"
            finals.append(events[-1].response)
        conn.response.create(model="mock-model", input="and?", previous_response_id=finals[2].id)
        events = []
        while not events or events[-1].type not in TERMINAL:
            events.append(conn.recv())
    for final, text in zip(finals, ("one", "two", "three"), strict=True):
        assert final.output_text.startswith(f"Mock reply to: {text}")
    assert events[-1].response.previous_response_id == finals[2].id
    sdk.close()


async def test_errors_are_error_events_and_the_socket_goes_on(
    mock_sdk: openai.AsyncOpenAI,
) -> None:
    async with mock_sdk.responses.connect() as conn:
        await conn.send({"type": "response.steer"})  # type: ignore[arg-type]
        error = await conn.recv()
        assert error.type == "error"
        raw: Any = error
        assert raw.error.param == "type"
        assert raw.status == 400
        await conn.response.create(model="mock-model", input="hi", previous_response_id="resp_nope")
        missing: Any = await conn.recv()
        assert missing.type == "error"
        assert missing.error.code == "PREVIOUS_RESPONSE_NOT_FOUND"
        await conn.response.create(model="mock-model", input="hi", background=True)
        assert (await conn.recv()).type == "error"
        await conn.response.create(model="mock-model", input="still here")
        final = (await one_response(conn))[-1]
        assert final.type == "response.completed"


async def test_lanes_echo_their_stream_id_and_cancel_stops_a_response(
    make_settings, make_gateway
) -> None:
    settings = make_settings(
        {
            "inference": {
                "provider": "mock",
                "options": {"tokens_per_second": 50, "reply_tokens": 200},
            }
        }
    )
    client = await make_gateway(settings)
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    async with sdk.responses.connect() as conn:
        await conn.response.create(
            model="mock-model", input="long " * 50, stream_id="lane-a", max_output_tokens=200
        )
        first: Any = await conn.recv()
        assert first.type == "response.created"
        assert first.stream_id == "lane-a"
        await conn.send({"type": "response.cancel", "response_id": first.response.id})  # type: ignore[arg-type]
        events = [first]
        async with asyncio.timeout(10):
            while events[-1].type != "response.failed":
                events.append(await conn.recv())
        assert events[-2].type == "error"
        assert events[-2].code == "REQUEST_CANCELLED"
        assert events[-1].response.id == first.response.id
        assert events[-1].response.status == "failed"
        assert all(e.stream_id == "lane-a" for e in events)
        await conn.response.create(model="mock-model", input="after", stream_id="lane-a")
        final: Any = (await one_response(conn))[-1]
        assert final.type == "response.completed"
        assert final.stream_id == "lane-a"
    await sdk.close()


async def test_native_upstream_over_the_socket(
    make_settings, make_gateway, fake_upstream: FakeUpstream
) -> None:
    client = await make_gateway(openai_plugin_settings(make_settings, fake_upstream))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    async with sdk.responses.connect() as conn:
        await conn.response.create(model="gpt-x", input="Hi", previous_response_id="resp_old")
        events = await one_response(conn)
    assert [e.type for e in events] == [
        "response.created",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.completed",
    ]
    assert events[-1].response.output_text == "Native hello."
    sent = fake_upstream.requests[-1]
    assert sent["previous_response_id"] == "resp_old"  # the upstream's own store
    assert sent["stream"] is True
    await sdk.close()


async def test_store_false_chains_within_the_connection_only(mock_sdk: openai.AsyncOpenAI) -> None:
    """OpenAI's WebSocket mode keeps the most recent response of a connection for chaining, even
    with ``store: false``; nothing is stored, so no other connection can continue it."""
    async with mock_sdk.responses.connect() as conn:
        await conn.response.create(model="mock-model", input="My name is Ann", store=False)
        first = (await one_response(conn))[-1].response
        await conn.response.create(
            model="mock-model", input="What is my name", previous_response_id=first.id, store=False
        )
        chained: Any = (await one_response(conn))[-1]
        await conn.response.create(model="mock-model", input="What is my name", store=False)
        alone: Any = (await one_response(conn))[-1]
    assert chained.type == "response.completed"
    assert chained.response.previous_response_id == first.id
    assert chained.response.usage.input_tokens > alone.response.usage.input_tokens
    async with mock_sdk.responses.connect() as conn:
        await conn.response.create(model="mock-model", input="again", previous_response_id=first.id)
        error: Any = await conn.recv()
    assert error.type == "error"
    assert error.error.code == "PREVIOUS_RESPONSE_NOT_FOUND"
    with pytest.raises(openai.NotFoundError):
        await mock_sdk.responses.retrieve(first.id)
