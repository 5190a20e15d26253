"""LM Studio provider: its OpenAI-compatible server at ``base_url`` (default port 1234).

LM Studio's quirks handled here or in the shared OpenAI-compatible base: errors sometimes come
as ``{"error": "text"}`` or without ``code``; with one model loaded it ignores the ``model``
field (the gateway validates model names itself); JIT-loaded models take a per-request ``ttl``.

LM Studio usually runs without a key, but it may sit behind a proxy that wants one (``api_key``
or credentials in ``base_url``), and such a proxy may echo it in an error: every error leaving
this provider is scrubbed by the core's ``Scrubber`` first, so neither the client, the logs, the
spans nor the metrics ever see it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from inference_server.providers import (
    CallContext,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    GatewayError,
    ModelInfo,
    OpenAICompatibleProvider,
    ProviderConfig,
    ProviderPlugin,
    Scrubber,
    Setting,
    provider_secrets,
    scrub_stream,
)


class LMStudioProvider(OpenAICompatibleProvider):
    """OpenAI-compatible calls plus LM Studio's optional JIT ``ttl``; errors scrubbed."""

    def __init__(self, session: aiohttp.ClientSession, config: ProviderConfig) -> None:
        super().__init__(session, config)
        self.scrubber = Scrubber(provider_secrets(config))

    async def chat(self, request: ChatRequest, ctx: CallContext) -> ChatResponse:
        try:
            return await super().chat(request, ctx)
        except GatewayError as exc:
            self.scrubber.scrub_error(exc)
            raise

    def stream_chat(self, request: ChatRequest, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        chunks = super().stream_chat(request, ctx)
        return scrub_stream(chunks, self.scrubber) if self.scrubber else chunks

    async def list_models(self) -> list[ModelInfo]:
        # health() calls this, so /health's detail text is scrubbed too.
        try:
            return await super().list_models()
        except GatewayError as exc:
            self.scrubber.scrub_error(exc)
            raise

    def build_body(self, request: ChatRequest, ctx: CallContext, *, stream: bool) -> dict[str, Any]:
        body = super().build_body(request, ctx, stream=stream)
        ttl = self.config.options.get("ttl")
        if ttl is not None and "ttl" not in body:
            body["ttl"] = ttl
        return body


plugin = ProviderPlugin(
    name="lmstudio",
    factory=LMStudioProvider,
    settings={
        "ttl": Setting(
            (int,),
            None,
            gte=1,
            nullable=True,
            description="seconds a JIT-loaded model stays loaded when idle (LM Studio 'ttl')",
        ),
    },
    default_base_url="http://127.0.0.1:1234/v1",
)
