"""The request pipeline, top-down in one place.

``chat_completions`` reads as the gateway works:
admit → validate → cache → route → attempt (with retry) → respond or stream → record.
Steps that later issues fill in (auth, rate limits, cache, fallbacks) have their slot here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web

from inference_server.context import RequestContext
from inference_server.errors import (
    GatewayError,
    InvalidRequest,
    ProviderBadResponse,
    ProviderConnectionFailed,
    ProviderTimeout,
    UnsupportedMediaType,
)
from inference_server.keys import (
    CTX,
    HEALTH,
    OPEN_STREAMS,
    REGISTRY,
    RETRIER,
    SETTINGS,
    TELEMETRY,
)
from inference_server.providers.base import CallContext, ChatChunk
from inference_server.registry import Target
from inference_server.schemas import validate_chat
from inference_server.streaming import SSE_HEADERS, relay

T = TypeVar("T")


async def read_json(request: web.Request) -> Any:
    """The body as JSON; 415 for another content type, 400 for malformed JSON, 413 if too big."""
    ctype = request.content_type
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got '{ctype or 'none'}'"
        )
    raw = await request.read()  # aiohttp enforces client_max_size (413)
    if not raw:
        raise InvalidRequest("Request body is empty", code="INVALID_JSON")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"Malformed JSON body: {exc}", code="INVALID_JSON") from exc


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    app = request.app
    ctx = request[CTX]
    settings = app[SETTINGS]

    # 1. admit — authentication and rate limits slot in here.
    # 2. validate
    body = validate_chat(await read_json(request))
    model = body.get("model") or settings.default_model
    body["model"] = model
    ctx.model = model
    ctx.stream = bool(body.get("stream"))
    # 3. cache — response caching slots in here.
    # 4. route
    target = app[REGISTRY].resolve(model)
    ctx.provider = target.config.name
    ctx.upstream_model = target.upstream_model
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    call = CallContext(
        request_id=ctx.request_id,
        upstream_model=target.upstream_model,
        timeouts=target.config.timeouts,
        headers=ctx.trace_headers,
        include_usage=include_usage,
    )
    # 5. attempt (retries before the first byte only) → 6. respond or stream
    if ctx.stream:
        first, chunks = await attempt(request, ctx, target, lambda: open_stream(target, body, call))
        return await stream(request, ctx, body, first, chunks, include_usage)
    result = await attempt(request, ctx, target, lambda: target.provider.chat(body, call))
    # 7. record
    ctx.usage = result.get("usage")
    return web.Response(body=orjson.dumps(result), content_type="application/json")


async def open_stream(
    target: Target, body: dict[str, Any], call: CallContext
) -> tuple[ChatChunk, AsyncIterator[ChatChunk]]:
    """Start the upstream stream and wait for its first chunk (within the first-byte timeout).

    Nothing has been sent to the client yet, so any failure here may still be retried and is
    reported with a proper HTTP status.
    """
    chunks = target.provider.stream_chat(body, call)
    try:
        async with asyncio.timeout(call.timeouts.first_byte):
            first = await anext(chunks)
    except StopAsyncIteration:
        raise ProviderBadResponse(
            f"Provider '{target.config.name}' ended the stream before sending anything"
        ) from None
    except TimeoutError:
        await _aclose(chunks)
        raise ProviderTimeout(
            f"Provider '{target.config.name}' sent no first token within "
            f"{call.timeouts.first_byte:g}s"
        ) from None
    except BaseException:
        await _aclose(chunks)
        raise
    return first, chunks


async def attempt(
    request: web.Request,
    ctx: RequestContext,
    target: Target,
    fn: Callable[[], Awaitable[T]],
) -> T:
    """Run one upstream operation with retries, recording attempts, time and provider health."""
    app = request.app
    health = app[HEALTH]
    telemetry = app[TELEMETRY]
    name = target.config.name

    async def once() -> T:
        ctx.attempts += 1
        started = time.perf_counter()
        with telemetry.client_span(
            "chat " + target.upstream_model,
            {
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": target.upstream_model,
                "gen_ai.system": target.config.plugin,
                "inference.provider": name,
                "inference.attempt": ctx.attempts,
            },
        ) as span:
            if span is not None:
                ctx.trace_headers.clear()
                telemetry.inject(ctx.trace_headers)
            try:
                result = await fn()
            except GatewayError as exc:
                telemetry.record_error(span, exc.code, exc.message)
                if isinstance(exc, ProviderConnectionFailed):
                    health.mark(name, False, exc.message)
                raise
            finally:
                ctx.upstream_secs += time.perf_counter() - started
        health.mark(name, True, "request succeeded")
        return result

    return await app[RETRIER].call(once, max_retries=target.config.max_retries)


async def stream(
    request: web.Request,
    ctx: RequestContext,
    body: dict[str, Any],
    first: ChatChunk,
    chunks: AsyncIterator[ChatChunk],
    include_usage: bool,
) -> web.StreamResponse:
    """Send the 200 + SSE headers now that a first chunk exists, then relay the rest."""
    ctx.first_token_secs = time.perf_counter() - ctx.started
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    response.headers["x-request-id"] = ctx.request_id
    try:
        await response.prepare(request)
    except BaseException:
        await _aclose(chunks)
        raise
    ctx.status = 200
    open_streams = request.app[OPEN_STREAMS]
    task = asyncio.current_task()
    if task is not None:
        open_streams.add(task)
    try:
        await relay(
            request,
            response,
            ctx,
            body,
            first,
            chunks,
            include_usage=include_usage,
            error_format=request.app[SETTINGS].server.error_format,
        )
    finally:
        if task is not None:
            open_streams.discard(task)
    return response


async def _aclose(chunks: AsyncIterator[ChatChunk]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()
