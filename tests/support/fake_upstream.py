"""A scriptable fake OpenAI-compatible upstream, served for real on a free loopback port.

Integration tests script what the next requests get (success, an error status, a hang, a stream
cut mid-way, an in-band stream error) and then check what the gateway did, including whether it
cancelled the upstream request when its own client went away.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict


@dataclass
class Action:
    """What the fake does with one request."""

    kind: str = "ok"  # ok | status | echo | cut | stream_error | garbage
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # before the response starts
    chunks: int = 3  # content chunks in a stream
    interval: float = 0.0  # between stream chunks
    usage: bool = True  # send a usage chunk when asked (include_usage)


def echo_error(request: web.Request) -> dict[str, Any]:
    """A hostile upstream's error: the bearer token it was sent, in every field."""
    token = request.headers.get("Authorization", "").removeprefix("Bearer ")
    return {
        "error": {
            "message": f"Incorrect API key provided: {token}",
            "type": token,
            "param": token,
            "code": token,
        }
    }


def _echo_headers(request: web.Request) -> dict[str, str]:
    return {"x-echo": request.headers.get("Authorization", "")}


def completion(model: str, text: str = "Hello from the fake upstream.") -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    }


def sse(obj: Any) -> bytes:
    import json

    return f"data: {json.dumps(obj)}\n\n".encode()


class FakeUpstream:
    """The fake's state: scripted actions in, recorded requests and cancellations out."""

    def __init__(self, models: tuple[str, ...] = ("gpt-oss-20b", "llama-2-7b")) -> None:
        self.models = models
        self.actions: deque[Action] = deque()
        #: What every request for a model gets, for as long as it is set (before ``actions``).
        self.by_model: dict[str, Action] = {}
        #: What every request gets while set (a persistent failure), before ``actions``.
        self.always: Action | None = None
        self.requests: list[dict[str, Any]] = []
        self.headers: list[CIMultiDict[str]] = []
        self.cancelled = asyncio.Event()
        self.finished_streams = 0
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self._chat)
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_post("/v1/embeddings", self._embeddings)
        self.app.router.add_post("/v1/completions", self._completions)
        self.app.router.add_post("/v1/responses", self._responses)
        #: Answer embeddings like llama-cpp-python without a pooling type: a vector per token.
        self.embedding_per_token = False
        #: False: POST /v1/responses is a bare 404 (FastAPI's, as llama-cpp-python answers).
        self.has_responses = True
        #: How many requests reached POST /v1/responses.
        self.responses_calls = 0
        self.base_url = ""  # set by the fixture once the server listens
        self.server: Any = None  # the aiohttp TestServer, so a test can stop it
        #: When set, GET /models answers this status with :func:`echo_error` (hostile upstream).
        self.models_echo_status: int | None = None

    def script(self, *actions: Action) -> None:
        """Queue the behaviour of the next requests (then: plain success)."""
        self.actions.extend(actions)

    async def _models(self, request: web.Request) -> web.Response:
        if self.models_echo_status is not None:
            return web.json_response(
                echo_error(request),
                status=self.models_echo_status,
                headers=_echo_headers(request),
            )
        action = self.actions.popleft() if self.actions else Action()
        if action.kind == "status":
            return web.json_response(action.body, status=action.status, headers=action.headers)
        data = [{"id": m, "object": "model", "owned_by": "fake", "created": 1} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(CIMultiDict(request.headers))
        action = self.by_model.get(body.get("model")) or self.always
        if action is None:
            action = self.actions.popleft() if self.actions else Action()
        try:
            if action.delay:
                await asyncio.sleep(action.delay)
            if action.kind == "status":
                if isinstance(action.body, (bytes, str)):
                    return web.Response(
                        body=action.body, status=action.status, headers=action.headers
                    )
                return web.json_response(action.body, status=action.status, headers=action.headers)
            if action.kind == "echo":
                return web.json_response(
                    echo_error(request), status=action.status, headers=_echo_headers(request)
                )
            if action.kind == "garbage":
                return web.Response(body=b"<html>not json</html>", content_type="text/html")
            if body.get("stream"):
                return await self._stream(request, body, action)
            return web.json_response(completion(body.get("model", "?")))
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    def _next(self, body: dict[str, Any], request: web.Request) -> Action:
        self.requests.append(body)
        self.headers.append(CIMultiDict(request.headers))
        action = self.by_model.get(str(body.get("model"))) or self.always
        return action or (self.actions.popleft() if self.actions else Action())

    async def _embeddings(self, request: web.Request) -> web.Response:
        """Vectors of 4 floats: [index, len(input), 1, 0] (or two per-token rows of them)."""
        body = await request.json()
        action = self._next(body, request)
        if action.kind == "status":
            return web.json_response(action.body, status=action.status, headers=action.headers)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = []
        for i, item in enumerate(inputs):
            vec: Any = [float(i), float(len(item)), 1.0, 0.0]
            if self.embedding_per_token:
                vec = [vec, [float(i), float(len(item)), 3.0, 0.0]]
            data.append({"object": "embedding", "index": i, "embedding": vec})
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)},
            }
        )

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """A native Responses API: "Native hello." (streamed in two deltas, no [DONE])."""
        self.responses_calls += 1
        if not self.has_responses:
            return web.json_response({"detail": "Not Found"}, status=404)
        body = await request.json()
        action = self._next(body, request)
        if action.kind == "status":
            return web.json_response(action.body, status=action.status, headers=action.headers)
        item = {
            "type": "message",
            "id": "msg_up",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Native hello.", "annotations": []}],
        }
        response = {
            "id": "resp_upstream",
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": body.get("model"),
            "output": [item],
            "usage": {"input_tokens": 6, "output_tokens": 2, "total_tokens": 8},
        }
        if not body.get("stream"):
            return web.json_response(response)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        started = {**response, "status": "in_progress", "output": [], "usage": None}
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": started},
            {"type": "response.output_text.delta", "item_id": "msg_up", "output_index": 0,
             "content_index": 0, "delta": "Native "},
            {"type": "response.output_text.delta", "item_id": "msg_up", "output_index": 0,
             "content_index": 0, "delta": "hello."},
            {"type": "response.completed", "response": response},
        ]  # fmt: skip
        for n, event in enumerate(events):
            event["sequence_number"] = n
            await resp.write(f"event: {event['type']}\n".encode() + sse(event))
        return resp

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        """A ``text_completion``: "Once upon a time." (streamed as "tok0 tok1 tok2 ")."""
        body = await request.json()
        action = self._next(body, request)
        if action.kind == "status":
            return web.json_response(action.body, status=action.status, headers=action.headers)
        base = {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.get("model"),
        }
        if not body.get("stream"):
            choice = {"index": 0, "text": "Once upon a time.", "logprobs": None}
            return web.json_response(
                {
                    **base,
                    "choices": [{**choice, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9},
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(action.chunks):
            choice = {"index": 0, "text": f"tok{i} ", "logprobs": None, "finish_reason": None}
            await resp.write(sse({**base, "choices": [choice]}))
        last = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}
        await resp.write(sse({**base, "choices": [last]}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def _stream(
        self, request: web.Request, body: dict[str, Any], action: Action
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model"),
        }
        try:
            await resp.write(
                sse(
                    {
                        **base,
                        "choices": [
                            {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
                        ],
                    }
                )
            )
            for i in range(action.chunks):
                if action.interval:
                    await asyncio.sleep(action.interval)
                if action.kind == "cut" and i == action.chunks // 2:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if action.kind == "stream_error" and i == action.chunks // 2:
                    event = action.body or {
                        "error": {
                            "message": "model crashed",
                            "type": "server_error",
                            "code": "model_crash",
                        }
                    }
                    await resp.write(sse(event))
                    return resp
                await resp.write(
                    sse(
                        {
                            **base,
                            "choices": [
                                {
                                    "index": 0,
                                    "delta": {"content": f"tok{i} "},
                                    "finish_reason": None,
                                }
                            ],
                        }
                    )
                )
            await resp.write(
                sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            )
            wants_usage = (body.get("stream_options") or {}).get("include_usage")
            if wants_usage and action.usage:
                await resp.write(
                    sse(
                        {
                            **base,
                            "choices": [],
                            "usage": {
                                "prompt_tokens": 5,
                                "completion_tokens": action.chunks,
                                "total_tokens": 5 + action.chunks,
                            },
                        }
                    )
                )
            await resp.write(b"data: [DONE]\n\n")
            self.finished_streams += 1
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled.set()
            raise
        return resp


class PortUpstream:
    """A fake upstream on one fixed free port that can be killed and started again there
    (each start serves a fresh :class:`FakeUpstream`; ``requests`` counts over all of them)."""

    def __init__(self) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.fake: FakeUpstream | None = None
        self.past_requests = 0
        self._runner: web.AppRunner | None = None

    @property
    def requests(self) -> int:
        return self.past_requests + (len(self.fake.requests) if self.fake else 0)

    async def start(self) -> FakeUpstream:
        self.fake = FakeUpstream()
        runner = web.AppRunner(self.fake.app, handle_signals=False, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self._runner = runner
        return self.fake

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.fake is not None:
            self.past_requests += len(self.fake.requests)
            self.fake = None


def openai_plugin_settings(make_settings: Any, upstream: FakeUpstream, **options: Any) -> Any:
    """Settings with one ``openai``-plugin provider ``oa`` at ``upstream`` serving ``gpt-x``
    (``options``: the provider's plugin options, e.g. ``responses="translate"``)."""
    provider = {"plugin": "openai", "base_url": upstream.base_url, **options}
    return make_settings({"providers": {"oa": provider}, "models": {"gpt-x": {"provider": "oa"}}})
