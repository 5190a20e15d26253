"""WebSockets against every bundled provider on real servers (llama.cpp behind the lmstudio and
openai plugins, Triton): one chat request per model over the multiplexed chat socket, all at
once, and one ``client.responses.connect()`` response per model (translated onto chat)."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import orjson
import pytest
from websockets.asyncio.client import connect

from tests.real.test_three_providers import EXPECTED, gateway_url  # noqa: F401 (the fixture)

pytestmark = pytest.mark.real
TERMINAL = {"response.completed", "response.incomplete", "response.failed", "error"}


async def test_chat_over_one_socket_for_every_provider(gateway_url: str) -> None:  # noqa: F811
    url = gateway_url.replace("http://", "ws://") + "/chat/completions"
    async with connect(url) as ws:
        for model in EXPECTED:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": "Say hello"}],
                "max_tokens": 4,
            }
            await ws.send(orjson.dumps({"id": model, "body": body}).decode())
        text: dict[str, str] = dict.fromkeys(EXPECTED, "")
        ended: dict[str, dict[str, Any]] = {}
        async with asyncio.timeout(120):
            while len(ended) < len(EXPECTED):
                frame = orjson.loads(await ws.recv())
                if "chunk" in frame:
                    for choice in frame["chunk"]["choices"]:
                        text[frame["id"]] += choice["delta"].get("content") or ""
                else:
                    ended[frame["id"]] = frame
    for model in EXPECTED:
        assert ended[model].get("done") is True, ended[model]
        assert text[model], model
        assert ended[model]["usage"]["completion_tokens"] > 0, model


async def test_responses_connect_for_every_provider(gateway_url: str) -> None:  # noqa: F811
    sdk = openai.AsyncOpenAI(base_url=gateway_url, api_key="client-key", max_retries=0)
    async with sdk.responses.connect() as conn:
        for model in EXPECTED:
            await conn.response.create(model=model, input="Say hello", max_output_tokens=4)
            events: list[Any] = []
            async with asyncio.timeout(120):
                while not events or events[-1].type not in TERMINAL:
                    events.append(await conn.recv())
            assert events[-1].type in ("response.completed", "response.incomplete"), events[-1]
            assert events[-1].response.output_text, model
    await sdk.close()
