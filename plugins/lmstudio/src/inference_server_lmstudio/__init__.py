"""LM Studio provider: its OpenAI-compatible server at ``base_url`` (default port 1234).

LM Studio's quirks handled here or in the shared OpenAI-compatible base: errors sometimes come
as ``{"error": "text"}`` or without ``code``; with one model loaded it ignores the ``model``
field (the gateway validates model names itself); JIT-loaded models take a per-request ``ttl``.
"""

from __future__ import annotations

from typing import Any

from inference_server.providers import (
    CallContext,
    ChatRequest,
    OpenAICompatibleProvider,
    ProviderPlugin,
    Setting,
)


class LMStudioProvider(OpenAICompatibleProvider):
    """OpenAI-compatible calls plus LM Studio's optional JIT ``ttl``."""

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
