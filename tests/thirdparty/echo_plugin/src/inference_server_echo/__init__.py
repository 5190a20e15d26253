"""Echo provider: answers every chat with the last user message, behind a configurable prefix.

It is the smallest complete provider (no upstream at all), written against the public plugin API
only (``inference_server.providers``), so that the test that installs it from a wheel proves what
a third-party author gets: discovery through the entry point, the settings they declared (with
defaults applied), and the gateway's streaming, usage and error handling around their code.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from inference_server.providers import (
    CallContext,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    HealthStatus,
    InvalidRequest,
    ModelInfo,
    Provider,
    ProviderPlugin,
    Setting,
)


def _last_user_text(request: ChatRequest) -> str:
    for message in reversed(request.get("messages") or []):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return str(message["content"])
    # Raised before anything is sent: the client gets a 400, not a broken stream.
    raise InvalidRequest("the echo provider needs a user message with text content")


class EchoProvider(Provider):
    """Replies ``prefix + <last user message>``; streams it one word per chunk."""

    def _reply(self, request: ChatRequest) -> str:
        return f"{self.config.options['prefix']}{_last_user_text(request)}"

    async def chat(self, request: ChatRequest, ctx: CallContext) -> ChatResponse:
        text = self._reply(request)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": ctx.upstream_model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": len(text.split()),
                "completion_tokens": len(text.split()),
                "total_tokens": 2 * len(text.split()),
            },
        }

    async def stream_chat(self, request: ChatRequest, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        words = self._reply(request).split(" ")
        base: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": ctx.upstream_model,
        }
        for i, word in enumerate(words):
            delta = {"role": "assistant", "content": word} if i == 0 else {"content": f" {word}"}
            yield {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        # No usage chunk: the gateway synthesises one when the client asked for it.
        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(id=str(m), owned_by="echo") for m in self.config.options["models"]]

    async def health(self) -> HealthStatus:
        return HealthStatus(True, "echo needs no upstream")


plugin = ProviderPlugin(
    name="echo",
    factory=EchoProvider,
    settings={
        "prefix": Setting((str,), "echo: ", description="text put before the echoed message"),
        "models": Setting((list,), ["echo-1"], description="ids listed by /v1/models"),
    },
    default_base_url="echo://local",
)
