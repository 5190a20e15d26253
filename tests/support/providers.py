"""A provider base for tests that only need to script ``chat`` (the rest is boilerplate)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from inference_server.providers import (
    CallContext,
    ChatChunk,
    ChatRequest,
    HealthStatus,
    ModelInfo,
    Provider,
)


class ChatStub(Provider):
    """Streams its ``chat`` answer as one chunk, lists model ``m``, is always healthy."""

    async def stream_chat(self, request: ChatRequest, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        yield await self.chat(request, ctx)

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(id="m")]

    async def health(self) -> HealthStatus:
        return HealthStatus(True, "ok")
