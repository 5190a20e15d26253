"""A reusable base for providers that speak the OpenAI HTTP API (LM Studio, OpenAI, vLLM, ...).

Plugins subclass :class:`OpenAICompatibleProvider` and override only what differs (headers,
parameter renames, error quirks).  It maps every transport failure and upstream status to the
gateway's error hierarchy at this boundary, so nothing above it ever sees an aiohttp exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import aiohttp
import orjson

from inference_server.errors import (
    QUOTA_CODES,
    GatewayError,
    ProviderAuthFailed,
    ProviderBadResponse,
    ProviderConnectionFailed,
    ProviderError,
    ProviderQuotaExceeded,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    StreamInterrupted,
    local_resource_error,
)
from inference_server.providers.base import (
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
    ResponsesRequest,
    ResponsesResponse,
)
from inference_server.providers.sse import sse_events

#: The events that end a Responses API stream (it has no ``[DONE]``).
RESPONSES_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds form; HTTP dates are rare upstream)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _mean_pool(vectors: list[Any]) -> list[float]:
    """The mean of per-token vectors, scaled to unit length (what OpenAI's vectors have)."""
    width = len(vectors[0])
    sums = [0.0] * width
    for vec in vectors:
        if not isinstance(vec, list) or len(vec) != width:
            raise ValueError("ragged token vectors")
        for i, x in enumerate(vec):
            sums[i] += float(x)
    mean = [x / len(vectors) for x in sums]
    norm = math.sqrt(sum(x * x for x in mean))
    return [x / norm for x in mean] if norm > 0.0 else mean


def normalise_embeddings(provider: str, payload: dict[str, Any], inputs: int) -> dict[str, Any]:
    """An upstream's embeddings ``list`` in OpenAI's shape: one flat float vector per input.

    llama-cpp-python answers a model without a pooling type with one vector *per token* (a
    list of lists): the gateway **mean-pools** those and scales the result to unit length, as
    llama.cpp's own ``pooling_type: mean`` would, and says so at debug level.  Anything else
    that is not a list of numbers per input is ``PROVIDER_BAD_RESPONSE``.
    """
    data = payload.get("data")
    if not isinstance(data, list) or len(data) != inputs:
        got = len(data) if isinstance(data, list) else "no"
        raise ProviderBadResponse(
            f"Provider '{provider}' returned {got} embeddings for {inputs} inputs"
        )
    out = []
    for position, item in enumerate(data):
        vec = item.get("embedding") if isinstance(item, dict) else None
        if isinstance(vec, list) and vec and isinstance(vec[0], list):
            try:
                vec = _mean_pool(vec)
            except (ValueError, TypeError):
                raise ProviderBadResponse(
                    f"Provider '{provider}' returned unreadable per-token embeddings"
                ) from None
        elif not isinstance(vec, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in vec
        ):
            raise ProviderBadResponse(
                f"Provider '{provider}' returned an embedding that is not a list of numbers"
            )
        index = item.get("index", position)
        out.append({"object": "embedding", "index": index, "embedding": vec})
    out.sort(key=lambda e: e["index"] if isinstance(e["index"], int) else 0)
    usage = payload.get("usage")
    result: dict[str, Any] = {
        "object": "list",
        "data": out,
        "model": payload.get("model"),
    }
    if isinstance(usage, dict):
        result["usage"] = {
            "prompt_tokens": usage.get("prompt_tokens") or 0,
            "total_tokens": usage.get("total_tokens") or usage.get("prompt_tokens") or 0,
        }
    return result


class UpstreamErrorFields:
    """The fields of an upstream error body, whatever shape it came in."""

    __slots__ = ("code", "message", "param", "type")

    def __init__(
        self, message: str, code: str | None, param: str | None, type_: str | None
    ) -> None:
        self.message = message
        self.code = code
        self.param = param
        self.type = type_


def _error_fields(payload: Any, fallback: str) -> UpstreamErrorFields:
    """Pull message, code, param and type out of the many error shapes upstreams use.

    OpenAI sends ``{"error": {...}}``, LM Studio sometimes omits ``code``, llama.cpp uses an
    integer ``code`` (dropped: it only repeats the status) and Triton/LM Studio may send
    ``{"error": "text"}`` or plain text.
    """
    if isinstance(payload, dict):
        err = payload.get("error", payload.get("detail"))
        if isinstance(err, dict):
            code = err.get("code")
            param = err.get("param")
            type_ = err.get("type")
            return UpstreamErrorFields(
                str(err.get("message") or fallback),
                code if isinstance(code, str) and code else None,
                str(param) if param is not None else None,
                type_ if isinstance(type_, str) and type_ else None,
            )
        if isinstance(err, str) and err:
            return UpstreamErrorFields(err, None, None, None)
    return UpstreamErrorFields(fallback, None, None, None)


def _error_message(payload: Any, fallback: str) -> tuple[str, str | None, str | None]:
    """(message, code, param) of an upstream error body (see :func:`_error_fields`)."""
    fields = _error_fields(payload, fallback)
    return fields.message, fields.code, fields.param


def decode_object(
    raw: bytes, what: str, *, error: type[GatewayError] = ProviderBadResponse
) -> dict[str, Any]:
    """``raw`` as a JSON object, or ``error`` saying ``what`` was not one (the shared check of
    every upstream body and stream event: a 200 is not proof of protocol)."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON") from exc
    if not isinstance(payload, dict):
        raise error(f"{what} is not a JSON object")
    return payload


def map_upstream_status(
    provider: str, status: int, body: bytes, headers: Mapping[str, str]
) -> GatewayError:
    """Turn an upstream HTTP error into the gateway error a client should see.

    4xx and 429 keep the upstream's identity: its status and its ``message``, ``type``,
    ``param`` and ``code`` reach the client unchanged (``x-inference-error-source: upstream``).
    A 429 is backpressure (retryable after its Retry-After) unless its code or type says the
    account is out of quota or credit (never retried).  5xx, and 401/403 (the gateway's own
    credentials failing: an operator problem, not the client's), become the gateway's codes.
    """
    try:
        payload: Any = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        payload = body.decode("utf-8", "replace").strip()[:500]
    fallback = payload if isinstance(payload, str) and payload else f"HTTP {status}"
    f = _error_fields(payload, fallback)
    if status in (401, 403):
        return ProviderAuthFailed(
            f"Provider '{provider}' rejected the gateway's credentials ({status}): {f.message}"
        )
    if status >= 500:
        return ProviderError(
            f"Provider '{provider}' failed ({status}): {f.message}",
            retry_after=parse_retry_after(headers.get("Retry-After")),
        )
    if status == 429:
        quota = (f.code or "").lower() in QUOTA_CODES or (f.type or "").lower() in QUOTA_CODES
        cls = ProviderQuotaExceeded if quota else ProviderRateLimited
        return cls(
            f.message,
            code=f.code,
            param=f.param,
            error_type=f.type,
            retry_after=None if quota else parse_retry_after(headers.get("Retry-After")),
        )
    return ProviderRejected(f.message, code=f.code, param=f.param, status=status, error_type=f.type)


def map_client_exception(provider: str, exc: BaseException) -> GatewayError:
    """Translate an aiohttp/asyncio failure talking to the upstream into our hierarchy."""
    if isinstance(exc, GatewayError):
        return exc
    local = local_resource_error(exc)
    if local is not None:
        return local  # the gateway's own shortage: never blamed on the provider
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ProviderConnectionFailed(
            f"Connection failed: error sending request to provider '{provider}' ({exc.os_error})"
        )
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return ProviderTimeout(f"Provider '{provider}' timed out")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return ProviderError(f"Provider '{provider}' closed the connection")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return ProviderError(f"Provider '{provider}' closed the connection mid-response")
    return ProviderError(f"Provider '{provider}' failed: {type(exc).__name__}")


def stream_failure(
    provider: str, exc: BaseException, *, started: bool, chunks: int | None = None
) -> GatewayError:
    """The error for a transport failure while streaming: retryable before the first chunk was
    yielded, :class:`StreamInterrupted` after it (only an in-band event can report it then).

    The message says what a user can act on (who closed what, after how many chunks), never a
    library's class name.
    """
    err = map_client_exception(provider, exc)
    if not started:
        return err
    after = f" after {chunks} chunk{'s' if chunks != 1 else ''}" if chunks is not None else ""
    if isinstance(err, ProviderTimeout):
        what = f"sent nothing for longer than the stream's idle timeout{after}"
    elif not isinstance(err, ProviderError):
        return err  # e.g. the gateway's own resource shortage
    else:
        what = f"closed the stream{after} before it was complete"
    return StreamInterrupted(f"The upstream (provider '{provider}') {what}")


class OpenAICompatibleProvider(Provider):
    """Talks to ``{base_url}/chat/completions`` and ``{base_url}/models``."""

    def request_headers(self, ctx: CallContext | None = None) -> dict[str, str]:
        """Headers for every upstream request; subclasses add auth or vendor headers."""
        return self.http_headers(ctx)

    def build_body(self, request: ChatRequest, ctx: CallContext, *, stream: bool) -> dict[str, Any]:
        """The upstream body: the client's request with the upstream model id (a shallow copy)."""
        body = dict(request)
        body["model"] = ctx.upstream_model
        if stream:
            body["stream"] = True
            if ctx.include_usage:
                options = dict(body.get("stream_options") or {})
                options["include_usage"] = True
                body["stream_options"] = options
        else:
            body.pop("stream", None)
            body.pop("stream_options", None)
        return body

    @property
    def chat_url(self) -> str:
        return f"{self.config.base_url.rstrip('/')}/chat/completions"

    @property
    def models_url(self) -> str:
        return f"{self.config.base_url.rstrip('/')}/models"

    def _check_payload(self, payload: Any) -> None:
        """Raise when a 200 body is an error in disguise (some servers do that)."""
        if isinstance(payload, dict) and payload.get("error"):
            message, code, _ = _error_message(payload, "upstream reported an error")
            raise ProviderError(
                f"Provider '{self.config.name}' error: {message}",
                code=code.upper() if code else None,
            )

    async def _exchange(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        limits: aiohttp.ClientTimeout,
        data: bytes | None = None,
    ) -> bytes:
        """One request/response with the upstream: the body, or the mapped ``GatewayError``."""
        try:
            async with self.session.request(
                method, url, data=data, headers=headers, timeout=limits
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise map_upstream_status(self.config.name, resp.status, raw, resp.headers)
                return raw
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise map_client_exception(self.config.name, exc) from exc

    async def chat(self, request: ChatRequest, ctx: CallContext) -> ChatResponse:
        body = orjson.dumps(self.build_body(request, ctx, stream=False))
        raw = await self._exchange(
            "POST",
            self.chat_url,
            data=body,
            headers=self.request_headers(ctx),
            limits=ctx.timeouts.call_limits,
        )
        payload = decode_object(raw, f"Provider '{self.config.name}''s chat completion")
        self._check_payload(payload)
        if "choices" not in payload:
            raise ProviderBadResponse(
                f"Provider '{self.config.name}' returned no 'choices' in its chat completion"
            )
        return payload

    def stream_chat(self, request: ChatRequest, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        return self._stream(self.chat_url, self.build_body(request, ctx, stream=True), ctx)

    async def _stream(
        self,
        url: str,
        request: dict[str, Any],
        ctx: CallContext,
        terminal: frozenset[str] = frozenset(),
    ) -> AsyncIterator[dict[str, Any]]:
        """POST ``request`` to ``url`` as a stream and yield its SSE objects until ``[DONE]``
        (chat and legacy completions stream the same way), or until an object whose ``type``
        is in ``terminal`` (the Responses API ends with ``response.completed`` & co., no
        ``[DONE]``)."""
        body = orjson.dumps(request)
        name = self.config.name
        try:
            resp = await self.session.post(
                url,
                data=body,
                headers=self.request_headers(ctx),
                timeout=ctx.timeouts.stream_limits,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise map_client_exception(name, exc) from exc
        sent = 0  # chunks yielded: after the first, a failure can only end the stream
        finished = False
        try:
            if resp.status >= 400:
                raw = await resp.read()
                raise map_upstream_status(name, resp.status, raw, resp.headers)
            async with contextlib.aclosing(sse_events(resp.content.iter_any())) as events:
                async for event in events:
                    if event.startswith(b"[DONE]"):
                        finished = True
                        return
                    chunk = self._decode_chunk(event, sent > 0)
                    sent += 1
                    yield chunk
                    if terminal and chunk.get("type") in terminal:
                        finished = True
                        return
            if sent:
                raise StreamInterrupted(
                    f"The upstream (provider '{name}') ended the stream after {sent} "
                    f"chunk{'s' if sent != 1 else ''} without finishing it ([DONE])"
                )
            # llama.cpp does this for a prompt longer than its context: a 200 with no events.
            raise ProviderBadResponse(
                f"Provider '{name}' ended the stream without sending anything"
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise stream_failure(name, exc, started=sent > 0, chunks=sent) from exc
        finally:
            if finished:
                resp.release()
            else:
                # Unfinished (error, or the client went away): drop the connection so the
                # upstream stops generating at once instead of streaming into a dead pool slot.
                resp.close()

    # --- optional capabilities: embeddings and legacy completions (pass-through) ----------

    @property
    def embeddings_url(self) -> str:
        return f"{self.config.base_url.rstrip('/')}/embeddings"

    @property
    def completions_url(self) -> str:
        return f"{self.config.base_url.rstrip('/')}/completions"

    async def _call(self, url: str, request: dict[str, Any], ctx: CallContext, what: str) -> Any:
        raw = await self._exchange(
            "POST",
            url,
            data=orjson.dumps(request),
            headers=self.request_headers(ctx),
            limits=ctx.timeouts.call_limits,
        )
        payload = decode_object(raw, f"Provider '{self.config.name}''s {what}")
        self._check_payload(payload)
        return payload

    async def embed(self, request: EmbeddingRequest, ctx: CallContext) -> EmbeddingResponse:
        body = self.build_body(request, ctx, stream=False)
        body["encoding_format"] = "float"  # the gateway encodes base64 itself (after pooling)
        payload = await self._call(self.embeddings_url, body, ctx, "embeddings")
        return normalise_embeddings(self.config.name, payload, len(request.get("input") or ()))

    async def complete(self, request: CompletionRequest, ctx: CallContext) -> CompletionResponse:
        payload = await self._call(
            self.completions_url, self.build_body(request, ctx, stream=False), ctx, "completion"
        )
        if "choices" not in payload:
            raise ProviderBadResponse(
                f"Provider '{self.config.name}' returned no 'choices' in its completion"
            )
        return cast(CompletionResponse, payload)

    def stream_complete(
        self, request: CompletionRequest, ctx: CallContext
    ) -> AsyncIterator[CompletionResponse]:
        return self._stream(self.completions_url, self.build_body(request, ctx, stream=True), ctx)

    # --- the Responses API, natively (used when a plugin sets ``native_responses``) --------

    @property
    def responses_url(self) -> str:
        return f"{self.config.base_url.rstrip('/')}/responses"

    def responses_body(self, request: ResponsesRequest, ctx: CallContext) -> dict[str, Any]:
        """The upstream body: the client's, with the upstream model id."""
        return {**request, "model": ctx.upstream_model}

    async def respond(self, request: ResponsesRequest, ctx: CallContext) -> ResponsesResponse:
        body = self.responses_body(request, ctx)
        body.pop("stream", None)
        payload = await self._call(self.responses_url, body, ctx, "response")
        if not isinstance(payload.get("output"), list):
            raise ProviderBadResponse(
                f"Provider '{self.config.name}' returned no 'output' in its response"
            )
        return cast(ResponsesResponse, payload)

    def stream_respond(
        self, request: ResponsesRequest, ctx: CallContext
    ) -> AsyncIterator[ResponsesResponse]:
        body = {**self.responses_body(request, ctx), "stream": True}
        return self._stream(self.responses_url, body, ctx, RESPONSES_TERMINAL)

    def _decode_chunk(self, event: bytes, started: bool) -> ChatChunk:
        chunk = decode_object(
            event,
            f"A stream event from provider '{self.config.name}'",
            error=StreamInterrupted if started else ProviderBadResponse,
        )
        if chunk.get("error"):
            message, code, _ = _error_message(chunk, "upstream reported an error")
            raise (StreamInterrupted if started else ProviderError)(
                f"Provider '{self.config.name}' error: {message}",
                code=code.upper() if code else None,
            )
        return chunk

    async def list_models(self) -> list[ModelInfo]:
        timeout = aiohttp.ClientTimeout(total=10, sock_connect=self.config.timeouts.connect)
        raw = await self._exchange(
            "GET", self.models_url, headers=self.request_headers(), limits=timeout
        )
        try:
            payload = orjson.loads(raw)
            entries = payload["data"]
            return [
                ModelInfo(
                    id=str(m["id"]),
                    owned_by=m.get("owned_by"),
                    created=m.get("created") if isinstance(m.get("created"), int) else None,
                )
                for m in entries
            ]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise ProviderBadResponse(
                f"Provider '{self.config.name}' returned an unreadable model list"
            ) from exc

    async def health(self) -> HealthStatus:
        started = time.monotonic()
        try:
            await self.list_models()
        except GatewayError as exc:
            return HealthStatus(False, exc.message)
        return HealthStatus(True, f"models listed in {1000 * (time.monotonic() - started):.0f} ms")
