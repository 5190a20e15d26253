"""A deterministic local provider: real answers with no model server.

It exists so a newcomer gets a working gateway with ``INFERENCE_INFERENCE_PROVIDER=mock make run``
and so benchmarks and tests have an upstream whose cost and timing are known.  The same request
always produces the same text; ``latency_ms`` delays the first token and ``tokens_per_second``
paces the rest, for streaming and non-streaming calls alike.
"""

from __future__ import annotations

import asyncio
import hashlib
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
    ModelInfo,
    Provider,
    ProviderPlugin,
    Setting,
)

_WORDS = (
    "the",
    "model",
    "answers",
    "with",
    "a",
    "short",
    "and",
    "deterministic",
    "reply",
    "so",
    "tests",
    "can",
    "rely",
    "on",
    "it",
    "every",
    "time",
    "gateway",
    "token",
    "stream",
)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


class MockProvider(Provider):
    """Generates ``reply_tokens`` words derived from a hash of the conversation."""

    def _plan(self, request: ChatRequest) -> tuple[list[str], str, int]:
        """(tokens, finish_reason, prompt_tokens) for ``request``; pure and deterministic."""
        messages = request.get("messages") or []
        prompt_text = " ".join(_text_of(m.get("content")) for m in messages)
        prompt_tokens = len(prompt_text.split()) + 3 * len(messages)
        last_user = next(
            (_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
        )
        digest = hashlib.sha256(prompt_text.encode()).digest()
        head = ["Mock", " reply", " to:"] + [f" {w}" for w in last_user.split()[:6]]
        want = int(self.config.options.get("reply_tokens") or 16)
        tail = [f" {_WORDS[digest[i % len(digest)] % len(_WORDS)]}" for i in range(want)]
        tokens = (head + tail)[: max(want, 1)]
        limit = request.get("max_completion_tokens") or request.get("max_tokens")
        finish = "stop"
        if isinstance(limit, int) and limit < len(tokens):
            tokens, finish = tokens[:limit], "length"
        stop = request.get("stop")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if stops:
            text = "".join(tokens)
            cut = min((text.find(s) for s in stops if s and s in text), default=-1)
            if cut >= 0:
                kept: list[str] = []
                length = 0
                for tok in tokens:
                    if length + len(tok) > cut:
                        if cut > length:
                            kept.append(tok[: cut - length])
                        break
                    kept.append(tok)
                    length += len(tok)
                tokens, finish = kept, "stop"
        return tokens, finish, prompt_tokens

    async def _pace(self, started: float, produced: int) -> None:
        """Sleep until token number ``produced`` is due (first-token latency plus rate)."""
        latency = float(self.config.options.get("latency_ms") or 0) / 1000
        rate = float(self.config.options.get("tokens_per_second") or 0)
        due = started + latency + (produced / rate if rate > 0 else 0.0)
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def chat(self, request: ChatRequest, ctx: CallContext) -> ChatResponse:
        started = time.monotonic()
        tokens, finish, prompt_tokens = self._plan(request)
        await self._pace(started, len(tokens))
        n = int(request.get("n") or 1)
        text = "".join(tokens)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": ctx.upstream_model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
                for i in range(n)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(tokens) * n,
                "total_tokens": prompt_tokens + len(tokens) * n,
            },
        }

    async def stream_chat(self, request: ChatRequest, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        started = time.monotonic()
        tokens, finish, prompt_tokens = self._plan(request)
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": ctx.upstream_model,
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> ChatChunk:
            return {
                **base,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                ],
            }

        await self._pace(started, 0)
        yield chunk({"role": "assistant", "content": ""})
        for i, token in enumerate(tokens):
            await self._pace(started, i + 1)
            yield chunk({"content": token})
        yield chunk({}, finish)
        if ctx.include_usage:
            yield {
                **base,
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": len(tokens),
                    "total_tokens": prompt_tokens + len(tokens),
                },
            }

    async def list_models(self) -> list[ModelInfo]:
        names = self.config.options.get("models") or ["mock-model"]
        return [ModelInfo(id=str(n), owned_by="mock") for n in names]

    async def health(self) -> HealthStatus:
        return HealthStatus(True, "mock provider is always up")


plugin = ProviderPlugin(
    name="mock",
    factory=MockProvider,
    settings={
        "latency_ms": Setting(
            (int, float), 0, gte=0, lte=600_000, description="delay before the first token"
        ),
        "tokens_per_second": Setting(
            (int, float),
            0,
            gte=0,
            lte=1_000_000,
            description="pace of tokens after the first; 0 = no delay",
        ),
        "reply_tokens": Setting(
            (int,), 16, gte=1, lte=100_000, description="tokens per reply before max_tokens applies"
        ),
        "models": Setting((list,), ["mock-model"], description="ids listed by /v1/models"),
    },
    default_base_url="mock://local",
)
