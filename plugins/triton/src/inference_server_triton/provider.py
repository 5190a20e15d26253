"""The Triton provider: OpenAI chat in, KServe v2 generate extension out.

Wire facts this module is built on (checked against a real tritonserver 2.51 via PyTriton):

- Health and readiness answer with status codes and empty bodies: ``GET /v2/health/ready`` and
  ``GET /v2/models/{m}/ready`` (400 when not ready, also for unknown models).
- There is no usable model list: PyTriton's repository index is empty and token-protected, so
  models come from settings and are checked with ``GET /v2/models/{m}`` (404 "is not found" for
  an unknown model, 404 "has no available versions" for one that is configured but unloaded).
- ``/generate`` answers one JSON object, and may report an error as ``{"error": "..."}`` even
  under HTTP 200 (e.g. a decoupled model that produced several responses), so every body is
  checked.  A decoupled model is therefore always called through ``/generate_stream``, also for
  non-streaming requests, whose events are then collected into one completion.
- ``/generate_stream`` is SSE without ``[DONE]``: the stream ends at EOF.  A failure before the
  first response is HTTP 400 with one ``data: {"error": "<traceback>"}`` event; a failure after it
  is such an event under HTTP 200.
- Errors are ``{"error": "<string>"}``, often with ``Content-Type: text/plain``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from inference_server.providers import (
    CallContext,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    GatewayError,
    HealthStatus,
    InvalidRequest,
    ModelInfo,
    Provider,
    ProviderBadResponse,
    ProviderConfig,
    ProviderError,
    ProviderRejected,
    SSEDecoder,
    StreamInterrupted,
    Timeouts,
    decode_object,
    map_client_exception,
    map_upstream_status,
    sse_events,
    stream_failure,
)
from inference_server_triton.convert import (
    Generation,
    ModelMetadata,
    StopScanner,
    TensorSpec,
    build_body,
    embedding_tensors,
    parse_metadata,
    requested_max_tokens,
    split_vectors,
    stop_strings,
)
from inference_server_triton.options import ModelOptions, TritonConfigError, parse_models
from inference_server_triton.templates import ChatTemplate, prepare_messages

#: Time limit of one health or model-list probe (the health monitor adds its own, shorter one).
_PROBE_SECS = 10.0
#: Triton's answer when ``/generate`` meets a decoupled model that sent several responses.
_DECOUPLED_HINT = "use generate stream"
_TRACEBACK = "Traceback (most recent call last)"


def _message_of(body: bytes) -> str:
    """The error text of a Triton error body: JSON, an SSE ``data:`` event, or plain text."""
    data = body.strip()
    if data.startswith(b"data:"):
        events = SSEDecoder().feed(data + b"\n\n")
        data = events[0] if events else b""
    try:
        payload: Any = orjson.loads(data) if data else None
    except orjson.JSONDecodeError:
        return data.decode("utf-8", "replace")[:500]
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, str) and err:
            return err
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return ""


def concise(message: str) -> str:
    """A Python traceback (what PyTriton and the Python backend send) cut to its last line."""
    if _TRACEBACK in message:
        lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return message[:500]


def compile_options(
    provider: str, options: Mapping[str, Any]
) -> tuple[dict[str, ModelOptions], ModelOptions, dict[str, ChatTemplate]]:
    """Parse the per-model options and compile every chat template, or raise
    :class:`TritonConfigError` listing every problem (with its settings path).

    Returns (settings key → options, options of unlisted models, templates by key; '' for the
    unlisted-model template).
    """
    where = f"providers.{provider}"
    models, fallback = parse_models(options.get("models"), options.get("model_defaults"), where)
    problems: list[str] = []
    templates: dict[str, ChatTemplate] = {}
    for name, model_options in [*models.items(), ("", fallback)]:
        key = f"{where}.models.{name}" if name else f"{where}.model_defaults"
        try:
            templates[name] = ChatTemplate(model_options.chat_template, model_options.template_vars)
        except ValueError as exc:
            problems.append(f"{key}.chat_template: {exc}")
    if problems:
        raise TritonConfigError(problems)
    return models, fallback, templates


def validate_options(provider: str, options: Mapping[str, Any]) -> list[str]:
    """Every problem in one triton provider section's options; [] when they are valid.

    For a start-up check (``--check-config``) that reports them with the other settings
    problems; the provider's constructor raises the same problems as :class:`TritonConfigError`.
    """
    try:
        compile_options(provider, options)
    except TritonConfigError as exc:
        return list(exc.problems)
    return []


class TritonProvider(Provider):
    """One Triton server: chat templates, parameter mapping and error mapping per model."""

    def __init__(self, session: aiohttp.ClientSession, config: ProviderConfig) -> None:
        super().__init__(session, config)
        opts = config.options
        self.models, self.fallback, self._templates = compile_options(config.name, opts)
        self.metadata_ttl = float(opts.get("metadata_cache_secs") or 0)
        base = config.base_url.rstrip("/")
        self.base_url = base[: -len("/v2")] if base.endswith("/v2") else base
        self._metadata: dict[str, tuple[float, ModelMetadata]] = {}
        #: One lock per model whose metadata is being fetched now, with its number of users:
        #: an entry lives only while someone holds or waits for it, so model names a client
        #: sprays cannot grow the table (issue 11).
        self._metadata_locks: dict[str, tuple[asyncio.Lock, int]] = {}

    # --- per-model settings ------------------------------------------------------------------

    def _key(self, model: str) -> str:
        """The settings entry for ``model`` ('' when none): by key or ``name``, ignoring case."""
        if model in self.models:
            return model
        lowered = model.lower()
        return next(
            (
                k
                for k, o in self.models.items()
                if k.lower() == lowered or (o.name or "").lower() == lowered
            ),
            "",
        )

    def triton_names(self) -> dict[str, ModelOptions]:
        """Configured models by their name in Triton (``name`` when set, else the key)."""
        return {options.name or key: options for key, options in self.models.items()}

    def options_for(self, model: str) -> ModelOptions:
        """The model's options (``model_defaults`` for a model that is not listed)."""
        key = self._key(model)
        return self.models[key] if key else self.fallback

    def _model_url(self, model: str, options: ModelOptions) -> str:
        # Quoted: the model name comes from the client when no model table is configured.
        url = f"{self.base_url}/v2/models/{quote(model, safe='')}"
        if options.version:
            url += f"/versions/{quote(options.version, safe='')}"
        return url

    def _headers(self, ctx: CallContext | None, *, stream: bool = False) -> dict[str, str]:
        # The bearer key is for a proxy in front of Triton; Triton itself has no auth.
        return self.http_headers(ctx, accept="text/event-stream" if stream else "application/json")

    # --- errors -----------------------------------------------------------------------------

    def error_for(
        self, model: str, status: int, body: bytes, headers: Mapping[str, str] | None = None
    ) -> GatewayError:
        """Map one Triton error (status plus ``{"error": "..."}`` body) to a gateway error.

        The message decides where the status cannot: Triton answers 404 both for a model it has
        never heard of ("is not found": the client's mistake, not retryable) and for a configured
        model that is currently unloaded ("has no available versions": may come back, retryable).
        A Python traceback is the model's own deterministic failure: a retry would fail again.
        """
        name = self.config.name
        message = _message_of(body) or (f"HTTP {status}" if status >= 400 else "unknown error")
        lower = message.lower()
        if "unknown model" in lower and "is not found" in lower:
            return ProviderRejected(
                f"Model '{model}' is not served by Triton provider '{name}' ({message})",
                code="MODEL_NOT_FOUND",
                param="model",
                status=404,
            )
        if _TRACEBACK in message:
            return ProviderRejected(
                f"Model '{model}' on Triton provider '{name}' failed: {concise(message)}",
                code="MODEL_ERROR",
            )
        if "no available versions" in lower or "not ready" in lower or "ready state" in lower:
            return ProviderError(
                f"Model '{model}' on Triton provider '{name}' is not ready ({message})",
                code="MODEL_NOT_READY",
            )
        if status == 501:  # UNSUPPORTED: deterministic, a retry cannot help
            return ProviderRejected(
                f"Triton provider '{name}' cannot serve this request for '{model}': {message}",
                code="UNSUPPORTED",
            )
        if status < 400:  # an error object under 200
            return ProviderError(
                f"Model '{model}' on Triton provider '{name}' failed: {concise(message)}"
            )
        return map_upstream_status(name, status, orjson.dumps({"error": message}), headers or {})

    def _invalidate(self, model: str, err: GatewayError) -> None:
        """Forget cached metadata when the model vanished or changed under us."""
        if err.code in ("MODEL_NOT_FOUND", "MODEL_NOT_READY"):
            self._metadata.pop(model, None)

    # --- metadata ---------------------------------------------------------------------------

    async def metadata(
        self, model: str, options: ModelOptions, timeouts: Timeouts
    ) -> ModelMetadata:
        """``GET /v2/models/{m}`` (and its ``/config`` for the decoupled flag and the largest
        batch), cached.

        Inputs and their datatypes decide how request fields are sent, so the metadata is read
        before the first request to a model and reused for ``metadata_cache_secs``.
        """
        now = time.monotonic()
        cached = self._metadata.get(model)
        if cached is not None and now < cached[0]:
            return cached[1]
        async with self._metadata_lock(model):
            cached = self._metadata.get(model)
            if cached is not None and time.monotonic() < cached[0]:
                return cached[1]
            timeout = aiohttp.ClientTimeout(
                total=min(timeouts.total, _PROBE_SECS), sock_connect=timeouts.connect
            )
            url = self._model_url(model, options)
            try:
                status, raw, headers = await self._get(url, timeout)
                if status != 200:
                    raise self.error_for(model, status, raw, headers)
                try:
                    meta = parse_metadata(orjson.loads(raw))
                except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
                    raise ProviderBadResponse(
                        f"Triton provider '{self.config.name}' returned unreadable metadata "
                        f"for model '{model}': {exc}"
                    ) from exc
                decoupled, max_batch_size = await self._config(url, timeout)
                if options.decoupled is not None:
                    decoupled = options.decoupled
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise map_client_exception(self.config.name, exc) from exc
            meta = dataclasses.replace(meta, decoupled=decoupled, max_batch_size=max_batch_size)
            if self.metadata_ttl > 0:
                self._metadata[model] = (time.monotonic() + self.metadata_ttl, meta)
            return meta

    @contextlib.asynccontextmanager
    async def _metadata_lock(self, model: str) -> AsyncIterator[None]:
        """Hold ``model``'s metadata lock (one fetch per model at a time); the entry goes when
        its last user leaves."""
        lock, users = self._metadata_locks.get(model) or (asyncio.Lock(), 0)
        self._metadata_locks[model] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._metadata_locks[model]
            if users <= 1:
                del self._metadata_locks[model]
            else:
                self._metadata_locks[model] = (lock, users - 1)

    async def _config(self, model_url: str, limits: aiohttp.ClientTimeout) -> tuple[bool, int]:
        """(decoupled, max_batch_size) from the model config; (False, 0) when it is not
        readable (e.g. a proxy restricting it), as for a model that neither streams nor batches.
        """
        status, raw, _ = await self._get(f"{model_url}/config", limits)
        if status != 200:
            return False, 0
        with contextlib.suppress(orjson.JSONDecodeError):
            payload = orjson.loads(raw)
            if isinstance(payload, dict):
                policy = payload.get("model_transaction_policy")
                decoupled = isinstance(policy, dict) and policy.get("decoupled") is True
                size = payload.get("max_batch_size")
                batch = size if isinstance(size, int) and not isinstance(size, bool) else 0
                return decoupled, max(batch, 0)
        return False, 0

    async def _get(
        self, url: str, limits: aiohttp.ClientTimeout
    ) -> tuple[int, bytes, Mapping[str, str]]:
        async with self.session.get(url, headers=self._headers(None), timeout=limits) as resp:
            return resp.status, await resp.read(), resp.headers

    # --- chat -------------------------------------------------------------------------------

    def _prepare(
        self, request: ChatRequest, ctx: CallContext, raw_prompt: str | None = None
    ) -> tuple[ModelOptions, str, list[str]]:
        """(options, prompt, stop strings) for a request; 400s for what the model cannot take.

        ``raw_prompt``: a legacy completion's prompt, sent as it is (no chat template)."""
        model = ctx.upstream_model
        n = request.get("n")
        if isinstance(n, int) and n > 1:
            raise InvalidRequest(
                f"Model '{model}' on a Triton provider generates one choice per request (n=1)",
                code="UNSUPPORTED_PARAMETER",
                param="n",
            )
        if request.get("logprobs"):
            raise InvalidRequest(
                f"Model '{model}' on a Triton provider does not return logprobs",
                code="UNSUPPORTED_PARAMETER",
                param="logprobs",
            )
        key = self._key(model)
        options = self.models[key] if key else self.fallback
        if raw_prompt is not None:
            return options, raw_prompt, stop_strings(request, options)
        messages, tools = prepare_messages(
            request,
            model=model,
            supports_tools=options.supports_tools,
            supports_images=options.supports_images,
        )
        prompt = self._templates[key].render(messages, tools)
        return options, prompt, stop_strings(request, options)

    def _check_generates(self, model: str, options: ModelOptions, meta: ModelMetadata) -> None:
        """400 before calling Triton when the model has no output to read text from.

        Triton's ``/generate`` runs any model: an embedding model would answer a chat with its
        vectors and no text, which the client would get as an empty 200 completion.
        """
        name = options.output_name("text") or "text_output"
        if not meta.outputs or name in meta.outputs:
            return
        raise InvalidRequest(
            f"Model '{model}' on Triton provider '{self.config.name}' has no text output "
            f"'{name}' to generate with (outputs: {', '.join(meta.outputs)}); an embedding "
            "model serves /v1/embeddings only (else set outputs.text)",
            code="UNSUPPORTED",
            param="model",
        )

    def _generation(
        self, request: ChatRequest, options: ModelOptions, stops: list[str]
    ) -> Generation:
        return Generation(
            options=options,
            scanner=StopScanner(stops),
            max_tokens=requested_max_tokens(request, options),
            mode=options.stream_output,
        )

    async def chat(
        self, request: ChatRequest, ctx: CallContext, raw_prompt: str | None = None
    ) -> ChatResponse:
        model = ctx.upstream_model
        options, prompt, stops = self._prepare(request, ctx, raw_prompt)
        meta = await self.metadata(model, options, ctx.timeouts)
        self._check_generates(model, options, meta)
        gen = self._generation(request, options, stops)
        timeout = ctx.timeouts.call_limits
        try:
            if meta.decoupled:
                await self._collect(request, ctx, options, meta, prompt, gen, timeout)
            else:
                payload = await self._generate(request, ctx, options, meta, prompt, timeout)
                if payload is None:  # decoupled after all: remember, and stream it
                    self._metadata.pop(model, None)
                    meta = dataclasses.replace(meta, decoupled=True)
                    if self.metadata_ttl > 0:
                        self._metadata[model] = (time.monotonic() + self.metadata_ttl, meta)
                    await self._collect(request, ctx, options, meta, prompt, gen, timeout)
                else:
                    gen.add(payload)
                    gen.finish()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise map_client_exception(self.config.name, exc) from exc
        except GatewayError as exc:
            self._invalidate(model, exc)
            raise
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": gen.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": gen.finish_reason,
                }
            ],
            "usage": gen.usage(prompt),
        }

    async def _generate(
        self,
        request: ChatRequest,
        ctx: CallContext,
        options: ModelOptions,
        meta: ModelMetadata,
        prompt: str,
        limits: aiohttp.ClientTimeout,
    ) -> dict[str, Any] | None:
        """One ``/generate`` call; None when Triton says the model must be streamed."""
        model = ctx.upstream_model
        body = build_body(
            prompt=prompt,
            request=request,
            options=options,
            metadata=meta,
            stream=False,
            request_id=ctx.request_id,
        )
        async with self.session.post(
            f"{self._model_url(model, options)}/generate",
            data=orjson.dumps(body),
            headers=self._headers(ctx),
            timeout=limits,
        ) as resp:
            raw = await resp.read()
            if resp.status >= 400:
                raise self.error_for(model, resp.status, raw, resp.headers)
        payload = decode_object(raw, f"Triton provider '{self.config.name}''s answer for '{model}'")
        if payload.get("error"):
            if _DECOUPLED_HINT in str(payload["error"]):
                return None
            raise self.error_for(model, resp.status, raw)
        return payload

    async def _open_stream(
        self,
        request: ChatRequest,
        ctx: CallContext,
        options: ModelOptions,
        meta: ModelMetadata,
        prompt: str,
        limits: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        """POST ``/generate_stream``; the response once its status says the stream started."""
        model = ctx.upstream_model
        body = build_body(
            prompt=prompt,
            request=request,
            options=options,
            metadata=meta,
            stream=True,
            request_id=ctx.request_id,
        )
        resp = await self.session.post(
            f"{self._model_url(model, options)}/generate_stream",
            data=orjson.dumps(body),
            headers=self._headers(ctx, stream=True),
            timeout=limits,
        )
        if resp.status >= 400:
            try:
                raw = await resp.read()
            finally:
                resp.release()
            raise self.error_for(model, resp.status, raw, resp.headers)
        return resp

    async def _events(
        self, resp: aiohttp.ClientResponse, model: str
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The JSON objects of a ``/generate_stream`` body, until EOF (there is no [DONE])."""
        async with contextlib.aclosing(sse_events(resp.content.iter_any())) as events:
            async for event in events:
                yield self._decode_event(event, model)

    def _decode_event(self, event: bytes, model: str) -> dict[str, Any]:
        return decode_object(
            event, f"A stream event from Triton provider '{self.config.name}' for '{model}'"
        )

    def _check_event(self, payload: dict[str, Any], model: str, *, started: bool) -> None:
        """Raise for Triton's in-band ``{"error": "..."}`` (checked on every event).

        Once the client has a chunk, only :class:`StreamInterrupted` can report it.
        """
        if not payload.get("error"):
            return
        raw = orjson.dumps(payload)
        if started:
            raise StreamInterrupted(
                f"Model '{model}' on Triton provider '{self.config.name}' failed mid-stream: "
                f"{concise(_message_of(raw))}"
            )
        raise self.error_for(model, 200, raw)

    async def _collect(
        self,
        request: ChatRequest,
        ctx: CallContext,
        options: ModelOptions,
        meta: ModelMetadata,
        prompt: str,
        gen: Generation,
        limits: aiohttp.ClientTimeout,
    ) -> None:
        """A non-streaming answer from a decoupled model: read its whole stream into ``gen``."""
        resp = await self._open_stream(request, ctx, options, meta, prompt, limits)
        try:
            async with contextlib.aclosing(self._events(resp, ctx.upstream_model)) as events:
                async for payload in events:
                    self._check_event(payload, ctx.upstream_model, started=False)
                    gen.add(payload)
                    if gen.scanner.stopped:
                        break
            gen.finish()
        finally:
            # Stopped early or failed: close, so Triton stops generating for nobody.
            resp.close()

    async def stream_chat(
        self, request: ChatRequest, ctx: CallContext, raw_prompt: str | None = None
    ) -> AsyncGenerator[ChatChunk, None]:
        model = ctx.upstream_model
        name = self.config.name
        options, prompt, stops = self._prepare(request, ctx, raw_prompt)
        meta = await self.metadata(model, options, ctx.timeouts)
        self._check_generates(model, options, meta)
        gen = self._generation(request, options, stops)
        timeout = ctx.timeouts.stream_limits  # no total: connect, then idle per read
        try:
            resp = await self._open_stream(request, ctx, options, meta, prompt, timeout)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise map_client_exception(name, exc) from exc
        except GatewayError as exc:
            self._invalidate(model, exc)
            raise
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> ChatChunk:
            return {
                **base,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                ],
            }

        started = False
        at_eof = False
        received = 0  # events read from Triton (what a broken stream's message reports)
        try:
            async with contextlib.aclosing(self._events(resp, model)) as events:
                async for payload in events:
                    received += 1
                    self._check_event(payload, model, started=started)
                    piece = gen.add(payload)
                    if not started:
                        started = True
                        yield chunk({"role": "assistant", "content": ""})
                    if piece:
                        yield chunk({"content": piece})
                    if gen.scanner.stopped:
                        break
                else:
                    at_eof = True
            tail = gen.finish()
            if not started:  # an empty generation is still a completion
                started = True
                yield chunk({"role": "assistant", "content": ""})
            if tail:
                yield chunk({"content": tail})
            yield chunk({}, gen.finish_reason)
            # Always report usage here (the model's counts, else estimates from characters),
            # so streaming and non-streaming answers count the same way.
            yield {**base, "choices": [], "usage": gen.usage(prompt)}
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise stream_failure(name, exc, started=started, chunks=received) from exc
        except GatewayError as exc:
            if started and not isinstance(exc, StreamInterrupted):
                raise StreamInterrupted(
                    f"Stream from Triton provider '{name}' broke: {exc.message}"
                ) from exc
            self._invalidate(model, exc)
            raise
        finally:
            if at_eof:
                resp.release()
            else:
                # Stopped at a stop string, failed, or the client went away: drop the
                # connection so Triton stops generating at once.
                resp.close()

    # --- legacy completions: generate / generate_stream without a chat template ------------

    def _raw_prompt(self, request: CompletionRequest, ctx: CallContext) -> str:
        """The one prompt string Triton generates from (400 for what a text model cannot take)."""
        prompt = request.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InvalidRequest(
                f"Model '{ctx.upstream_model}' on a Triton provider completes one text prompt "
                "per request (not a list, nor token ids)",
                code="UNSUPPORTED_PARAMETER",
                param="prompt",
            )
        for key in ("suffix", "best_of"):
            value = request.get(key)
            if value is not None and not (key == "best_of" and value == 1):
                raise InvalidRequest(
                    f"Model '{ctx.upstream_model}' on a Triton provider does not take {key}",
                    code="UNSUPPORTED_PARAMETER",
                    param=key,
                )
        return prompt

    async def complete(self, request: CompletionRequest, ctx: CallContext) -> CompletionResponse:
        prompt = self._raw_prompt(request, ctx)
        chat = await self.chat(request, ctx, prompt)
        choice = chat["choices"][0]
        text = choice["message"]["content"] or ""
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": chat["created"],
            "model": chat["model"],
            "choices": [
                {
                    "index": 0,
                    "text": (prompt + text) if request.get("echo") else text,
                    "logprobs": None,
                    "finish_reason": choice["finish_reason"],
                }
            ],
            "usage": chat["usage"],
        }

    async def stream_complete(
        self, request: CompletionRequest, ctx: CallContext
    ) -> AsyncIterator[CompletionResponse]:
        prompt = self._raw_prompt(request, ctx)
        ident = f"cmpl-{uuid.uuid4().hex}"
        echo = bool(request.get("echo"))
        async with contextlib.aclosing(self.stream_chat(request, ctx, prompt)) as chunks:
            async for chunk in chunks:
                out: CompletionResponse = {
                    "id": ident,
                    "object": "text_completion",
                    "created": chunk["created"],
                    "model": chunk["model"],
                    "choices": [],
                }
                for c in chunk["choices"]:
                    text = c["delta"].get("content") or ""
                    if echo and c["delta"].get("role"):
                        text = prompt + text
                    out["choices"].append(
                        {
                            "index": 0,
                            "text": text,
                            "logprobs": None,
                            "finish_reason": c["finish_reason"],
                        }
                    )
                if "usage" in chunk:
                    out["usage"] = chunk["usage"]
                yield out

    # --- embeddings: KServe v2 infer -------------------------------------------------------

    async def embed(self, request: EmbeddingRequest, ctx: CallContext) -> EmbeddingResponse:
        """``POST /v2/models/{m}/infer`` with the texts as BYTES batches of at most the model's
        ``max_batch_size`` (one call per text for a model without a batch dimension); the vectors
        from the embedding output, in the inputs' order."""
        model = ctx.upstream_model
        texts = request.get("input") or []
        if not all(isinstance(t, str) for t in texts):
            raise InvalidRequest(
                f"Model '{model}' on a Triton provider embeds text (not token ids)",
                code="UNSUPPORTED_PARAMETER",
                param="input",
            )
        options = self.options_for(model)
        meta = await self.metadata(model, options, ctx.timeouts)
        source, target = embedding_tensors(meta, options)
        batched = bool(source.shape) and source.shape[0] == -1
        # Triton rejects a request batching more than the model's max_batch_size.
        size = (meta.max_batch_size or max(len(texts), 1)) if batched else 1
        batches = [texts[i : i + size] for i in range(0, len(texts), size)]
        try:
            parts = await asyncio.gather(
                *(self._infer(model, options, ctx, source, target, b) for b in batches)
            )
            vectors = [v for part in parts for v in part]
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise map_client_exception(self.config.name, exc) from exc
        except GatewayError as exc:
            self._invalidate(model, exc)
            raise
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
            ],
            "model": model,
        }

    async def _infer(
        self,
        model: str,
        options: ModelOptions,
        ctx: CallContext,
        source: TensorSpec,
        target: TensorSpec,
        texts: list[str],
    ) -> list[list[float]]:
        batched = bool(source.shape) and source.shape[0] == -1
        shape = [len(texts), 1] if batched else [1]
        body = {
            "id": ctx.request_id,
            "inputs": [{"name": source.name, "shape": shape, "datatype": "BYTES", "data": texts}],
            "outputs": [{"name": target.name}],
        }
        async with self.session.post(
            f"{self._model_url(model, options)}/infer",
            data=orjson.dumps(body),
            headers=self._headers(ctx),
            timeout=ctx.timeouts.call_limits,
        ) as resp:
            raw = await resp.read()
            if resp.status >= 400:
                raise self.error_for(model, resp.status, raw, resp.headers)
        payload = decode_object(raw, f"Triton provider '{self.config.name}''s infer for '{model}'")
        if payload.get("error"):
            raise self.error_for(model, resp.status, raw)
        return split_vectors(self.config.name, model, payload, target.name, len(texts))

    # --- models and health ------------------------------------------------------------------

    async def list_models(self) -> list[ModelInfo]:
        """The configured models that Triton knows (metadata answers); others are left out.

        With no models configured, Triton's repository index is asked instead (plain Triton
        answers it; PyTriton >= 0.7 answers 403 or an empty list, giving no models).
        """
        timeouts = self.config.timeouts
        if not self.models:
            return await self._index()
        models = self.triton_names()

        async def probe(model: str) -> ModelInfo | None:
            try:
                await self.metadata(model, models[model], timeouts)
            except (ProviderRejected, ProviderError) as exc:
                if exc.code in ("MODEL_NOT_FOUND", "MODEL_NOT_READY"):
                    return None
                raise
            return ModelInfo(id=model, owned_by="triton")

        found = await asyncio.gather(*(probe(m) for m in models))
        return [info for info in found if info is not None]

    async def _index(self) -> list[ModelInfo]:
        timeout = aiohttp.ClientTimeout(
            total=_PROBE_SECS, sock_connect=self.config.timeouts.connect
        )
        try:
            async with self.session.post(
                f"{self.base_url}/v2/repository/index",
                data=b'{"ready": true}',
                headers=self._headers(None),
                timeout=timeout,
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    return []
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise map_client_exception(self.config.name, exc) from exc
        try:
            entries = orjson.loads(raw)
            return [
                ModelInfo(id=str(e["name"]), owned_by="triton")
                for e in entries
                if isinstance(e, dict) and e.get("name")
            ]
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise ProviderBadResponse(
                f"Triton provider '{self.config.name}' returned an unreadable repository index"
            ) from exc

    async def health(self) -> HealthStatus:
        """Server readiness, then every configured model's readiness (status codes only)."""
        timeout = aiohttp.ClientTimeout(
            total=_PROBE_SECS, sock_connect=self.config.timeouts.connect
        )
        started = time.monotonic()
        try:
            status, _, _ = await self._get(f"{self.base_url}/v2/health/ready", timeout)
            if status != 200:
                return HealthStatus(
                    False, f"Triton is not ready (GET /v2/health/ready answered {status})"
                )
            configured = self.triton_names()
            models = list(configured)
            answers = await asyncio.gather(
                *(self._get(f"{self._model_url(m, configured[m])}/ready", timeout) for m in models)
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            return HealthStatus(False, map_client_exception(self.config.name, exc).message)
        not_ready = [m for m, (code, _, _) in zip(models, answers, strict=True) if code != 200]
        if not_ready:
            return HealthStatus(False, f"Triton is up; model(s) not ready: {', '.join(not_ready)}")
        elapsed = 1000 * (time.monotonic() - started)
        return HealthStatus(True, f"Triton and {len(models)} model(s) ready in {elapsed:.0f} ms")
