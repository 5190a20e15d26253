"""Writing SSE to the client: chunks as they arrive, usage at the end, errors in-band.

The pipeline has already read the first chunk before calling :func:`relay`, so the 200 status is
only sent once the upstream has produced something.  After that, every failure ends the stream
with exactly one ``data: {"error": ...}`` event and no ``[DONE]``: the openai SDK raises on it,
where a silent cut would look like a complete (truncated) answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from aiohttp import web

from inference_server.context import RequestContext
from inference_server.errors import (
    ErrorFormat,
    GatewayError,
    InternalError,
    ServiceUnavailable,
    error_body,
)
from inference_server.providers.base import ChatChunk

if TYPE_CHECKING:
    from inference_server.cache import StreamCollector
    from inference_server.scrub import Scrubber

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def sse_event(obj: Any) -> bytes:
    """One data-only SSE event (no ``event:`` line: older openai SDKs mis-handle named events)."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def estimate_prompt_tokens(request: dict[str, Any]) -> int:
    """Estimate prompt tokens when the upstream does not report usage.

    ~4 characters per token plus ~4 tokens of chat framing per message: the usual rule of thumb
    for BPE vocabularies.  Only used when the upstream sends no usage (see ARCHITECTURE.md).
    """
    chars = 0
    prompt = request.get("prompt")  # legacy completions
    if isinstance(prompt, str):
        chars += len(prompt)
    elif isinstance(prompt, list):
        chars += sum(len(p) if isinstance(p, str) else 4 * len(p) for p in prompt)
    messages = request.get("messages") or []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, dict) else None
                if isinstance(text, str):
                    chars += len(text)
    return math.ceil(chars / 4) + 4 * len(messages) + 3


class UsageTracker:
    """Follows a stream to produce the final usage chunk the client asked for."""

    __slots__ = ("completion_deltas", "seen_usage", "text", "usage_chunk_sent")

    def __init__(self, collect_text: bool = False) -> None:
        self.completion_deltas = 0
        self.seen_usage: dict[str, Any] | None = None
        self.usage_chunk_sent = False
        #: The assembled completion, only when asked (recording content on spans is opt-in).
        self.text: list[str] | None = [] if collect_text else None

    def observe(self, chunk: ChatChunk) -> None:
        usage = chunk.get("usage")
        if usage:
            self.seen_usage = usage
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta")
            if delta is None:  # a legacy text_completion chunk
                delta = {"content": choice.get("text")}
            content = delta.get("content")
            if content or delta.get("tool_calls") or delta.get("refusal"):
                self.completion_deltas += 1
                if self.text is not None and isinstance(content, str) and not choice.get("index"):
                    self.text.append(content)

    def final_usage(self, request: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(usage, estimated): the upstream's numbers when it sent any, else an estimate."""
        if self.seen_usage is not None:
            return self.seen_usage, False
        prompt = estimate_prompt_tokens(request)
        # Local servers stream one token per delta, so the delta count is a token count there.
        completion = self.completion_deltas
        return (
            {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
            True,
        )


class Sink(Protocol):
    """Where a relayed stream goes: an HTTP SSE response (:class:`SSESink`) or one request's
    frames on a WebSocket (websocket.py).  The relays (chat's :func:`relay`, the Responses
    events) only ever talk to this, so both transports share one relay."""

    async def send(self, obj: dict[str, Any]) -> None:
        """One chunk (chat) or event (Responses) as it arrives."""

    async def done(self, usage: dict[str, Any]) -> None:
        """The stream ended normally (chat: after the usage chunk, if any)."""

    async def error(self, err: GatewayError) -> None:
        """The stream failed after it started: one in-band error (never raises)."""

    def interrupted(self) -> GatewayError | None:
        """On cancellation: the error to tell a client still listening, or None when the
        client itself is gone (then nothing is written)."""

    async def end(self) -> None:
        """After that error: complete the message (HTTP: the chunked body's end)."""


class SSESink:
    """:class:`Sink` over an HTTP ``StreamResponse``: SSE events, ``[DONE]``, an error event."""

    __slots__ = ("encode", "error_format", "request", "response")

    def __init__(
        self,
        request: web.Request,
        response: web.StreamResponse,
        error_format: str,
        encode: Callable[[Any], bytes] = sse_event,
    ) -> None:
        self.request = request
        self.response = response
        self.error_format = error_format
        #: chat's data-only events, or the Responses API's named ones
        self.encode = encode

    async def send(self, obj: dict[str, Any]) -> None:
        await self.response.write(self.encode(obj))

    async def done(self, usage: dict[str, Any]) -> None:
        await self.response.write(DONE)

    async def error(self, err: GatewayError) -> None:
        fmt: ErrorFormat = "legacy" if self.error_format == "legacy" else "openai"
        try:
            await self.response.write(sse_event(error_body(err, fmt)))
        except (ConnectionResetError, RuntimeError):
            return

    def interrupted(self) -> GatewayError | None:
        # The client left (handler cancellation) or shutdown hit its deadline.
        transport = self.request.transport
        if transport is not None and not transport.is_closing():
            return ServiceUnavailable(
                "The server is shutting down; the stream was cut at the shutdown deadline"
            )
        return None

    async def end(self) -> None:
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await self.response.write_eof()  # a complete HTTP message: the client reads the event


async def relay(
    sink: Sink,
    ctx: RequestContext,
    body: dict[str, Any],
    first: ChatChunk,
    chunks: AsyncIterator[ChatChunk],
    *,
    include_usage: bool,
    scrubber: Scrubber,
    collect_text: bool = False,
    collector: StreamCollector | None = None,
) -> str | None:
    """Forward ``first`` and the rest of ``chunks``; end with usage + done or an error.

    Returns the assembled completion of choice 0 when ``collect_text`` (else None).
    ``collector`` (the response cache's) sees every chunk and is completed only after
    ``[DONE]`` was written: a stream that failed or was cancelled is never stored.
    """
    tracker = UsageTracker(collect_text)
    template: dict[str, Any] = {
        "id": first.get("id"),
        "object": first.get("object") or "chat.completion.chunk",
        "created": first.get("created") or int(time.time()),
        "model": first.get("model"),
    }
    send = sink.send
    chunk: ChatChunk | None = first
    try:
        while chunk is not None:
            tracker.observe(chunk)
            if collector is not None:
                collector.observe(chunk)
            is_usage_only = not chunk.get("choices") and chunk.get("usage")
            if is_usage_only:
                if include_usage:
                    tracker.usage_chunk_sent = True
                    await send(chunk)
            else:
                if include_usage and "usage" not in chunk:
                    chunk["usage"] = None
                await send(chunk)
            chunk = await anext(chunks, None)
        usage, estimated = tracker.final_usage(body)
        ctx.usage = usage
        ctx.usage_estimated = estimated
        if include_usage and not tracker.usage_chunk_sent:
            await send({**template, "choices": [], "usage": usage})
        if estimated:
            ctx.log.debug("stream usage estimated: {}", usage)
        await sink.done(usage)
        if collector is not None:
            await collector.completed(usage)
    except asyncio.CancelledError:
        # Tell a client that is still listening why its stream ends; then let the
        # cancellation proceed.
        err = sink.interrupted()
        if err is not None:
            await sink.error(err)
            await sink.end()
            ctx.error_code = err.code
        else:
            ctx.error_code = "CLIENT_DISCONNECTED"
        raise
    except GatewayError as exc:
        scrubber.scrub_error(exc)  # the request's runtime's (issue 16)
        ctx.error_code = exc.code
        ctx.log.warning("stream failed after it started: {} ({})", exc.message, exc.code)
        await sink.error(exc)
    except (ConnectionResetError, web.HTTPException):
        ctx.error_code = "CLIENT_DISCONNECTED"
    except Exception as exc:  # a bug: still end the stream honestly
        ctx.log.exception("unexpected error while streaming")
        ctx.error_code = "INTERNAL_ERROR"
        await sink.error(InternalError(f"Internal error: {type(exc).__name__}"))
    finally:
        await aclose_chunks(chunks)
    return None if tracker.text is None else "".join(tracker.text)


async def aclose_chunks(chunks: AsyncIterator[ChatChunk]) -> None:
    """Close an upstream chunk iterator (its provider then drops the upstream connection)."""
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()
