"""A deterministic local provider: real answers with no model server.

It exists so a newcomer gets a working gateway with ``INFERENCE_INFERENCE_PROVIDER=mock make run``
and so benchmarks and tests have an upstream whose cost and timing are known.  The same request
always produces the same text; ``latency_ms`` delays the first token and ``tokens_per_second``
paces the rest, for streaming and non-streaming calls alike.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from inference_server.providers import (
    CallContext,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
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

    @staticmethod
    def _tool_call(request: ChatRequest) -> dict[str, Any] | None:
        """With ``tools`` and a user turn last, call a tool (the named ``tool_choice``, else the
        first) with the user's text as ``{"input": ...}``; after a tool result, answer in text."""
        tools = request.get("tools") or []
        choice = request.get("tool_choice")
        messages = request.get("messages") or []
        if not tools or choice == "none" or not messages or messages[-1].get("role") != "user":
            return None
        name = tools[0].get("function", {}).get("name")
        if isinstance(choice, dict):
            name = choice.get("function", {}).get("name") or name
        digest = hashlib.sha256(repr(messages).encode()).hexdigest()[:24]
        arguments = json.dumps({"input": _text_of(messages[-1].get("content"))})
        return {
            "id": f"call_{digest}",
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }

    async def chat(self, request: ChatRequest, ctx: CallContext) -> ChatResponse:
        started = time.monotonic()
        call = self._tool_call(request)
        if call is not None:
            await self._pace(started, 1)
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": ctx.upstream_model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                        "logprobs": None,
                        "finish_reason": "tool_calls",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
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
        call = self._tool_call(request)
        if call is not None:
            first = {"index": 0, "id": call["id"], "type": "function",
                     "function": {"name": call["function"]["name"], "arguments": ""}}  # fmt: skip
            yield chunk({"role": "assistant", "content": None, "tool_calls": [first]})
            arguments = call["function"]["arguments"]
            half = len(arguments) // 2
            for piece in (arguments[:half], arguments[half:]):
                yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            yield chunk({}, "tool_calls")
            return
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

    # --- optional capabilities -------------------------------------------------------------

    async def embed(self, request: EmbeddingRequest, ctx: CallContext) -> EmbeddingResponse:
        """One unit-length vector per input, derived from a hash of the input (same input, same
        vector); ``dimensions`` when given, else ``embedding_dims``."""
        started = time.monotonic()
        width = int(request.get("dimensions") or self.config.options.get("embedding_dims") or 64)
        data = []
        tokens = 0
        for index, item in enumerate(request.get("input") or ()):
            text = item if isinstance(item, str) else " ".join(str(t) for t in item)
            tokens += len(text.split()) if isinstance(item, str) else len(item)
            seed = hashlib.sha256(text.encode()).digest()
            raw = [
                (hashlib.sha256(seed + i.to_bytes(4, "little")).digest()[0] - 127.5) / 127.5
                for i in range(width)
            ]
            norm = math.sqrt(sum(x * x for x in raw)) or 1.0
            data.append(
                {"object": "embedding", "index": index, "embedding": [x / norm for x in raw]}
            )
        await self._pace(started, 0)
        return {
            "object": "list",
            "data": data,
            "model": ctx.upstream_model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @staticmethod
    def _as_chat(request: CompletionRequest) -> ChatRequest:
        prompt = request.get("prompt")
        text = prompt if isinstance(prompt, str) else " ".join(str(p) for p in prompt or ())
        return {**request, "messages": [{"role": "user", "content": text}]}

    async def complete(self, request: CompletionRequest, ctx: CallContext) -> CompletionResponse:
        """The chat reply's text as a ``text_completion`` (``echo`` prepends the prompt)."""
        chat = await self.chat(self._as_chat(request), ctx)
        prompt = request.get("prompt")
        prefix = prompt if request.get("echo") and isinstance(prompt, str) else ""
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": chat["created"],
            "model": ctx.upstream_model,
            "choices": [
                {
                    "index": c["index"],
                    "text": prefix + c["message"]["content"],
                    "logprobs": None,
                    "finish_reason": c["finish_reason"],
                }
                for c in chat["choices"]
            ],
            "usage": chat["usage"],
        }

    async def stream_complete(
        self, request: CompletionRequest, ctx: CallContext
    ) -> AsyncIterator[CompletionResponse]:
        """The chat stream's tokens as ``text_completion`` chunks."""
        ident = f"cmpl-{uuid.uuid4().hex}"
        async for chunk in self.stream_chat(self._as_chat(request), ctx):
            out: CompletionResponse = {
                "id": ident,
                "object": "text_completion",
                "created": chunk["created"],
                "model": ctx.upstream_model,
                "choices": [
                    {
                        "index": c["index"],
                        "text": c["delta"].get("content") or "",
                        "logprobs": None,
                        "finish_reason": c["finish_reason"],
                    }
                    for c in chunk["choices"]
                ],
            }
            if "usage" in chunk:
                out["usage"] = chunk["usage"]
            yield out

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
        "embedding_dims": Setting(
            (int,), 64, gte=1, lte=8192, description="length of the mock's embedding vectors"
        ),
    },
    default_base_url="mock://local",
)
