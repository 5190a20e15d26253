"""OpenAI provider: api.openai.com by default, or any OpenAI-compatible server at ``base_url``.

The HTTP calls, SSE parsing, timeouts and error mapping come from the core's
:class:`~inference_server.providers.OpenAICompatibleProvider`; this plugin adds only what the real
OpenAI API needs beyond a generic compatible server (vLLM, llama.cpp and Ollama work with the same
plugin by setting ``base_url``):

* ``OpenAI-Organization`` / ``OpenAI-Project`` headers, because a key that belongs to several
  organizations or projects is otherwise billed to its default one.
* ``max_tokens`` → ``max_completion_tokens`` for reasoning models (o-series, gpt-5), which reject
  ``max_tokens`` with 400 ``unsupported_parameter`` while most clients still send it.  A pattern
  list catches the known families before the first call; whatever the list misses (a new family,
  a fine-tune id, another server with the same rule) is caught by the 400 itself: the call is
  retried once with the renamed field and the model is remembered, so the extra round trip (which
  costs no tokens: the 400 comes before any generation) happens once per model per process.
* Streams ask the upstream for usage even when the client did not, so the gateway records real
  token counts instead of estimating them; the core drops the usage chunk for such a client, and
  this plugin removes the ``"usage": null`` fields OpenAI then adds to every chunk.
* The API key (and any credentials in ``base_url``) is scrubbed from every field of an upstream
  error (message, param, code, headers) by the core's ``Scrubber`` before the error leaves this
  provider: some compatible servers echo the bearer token they rejected.  The key itself only
  ever goes into the ``Authorization`` header, which nothing in the gateway logs.

TLS certificates are always verified: the shared session's defaults are never overridden.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import aiohttp

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
    ModelInfo,
    OpenAICompatibleProvider,
    ProviderConfig,
    ProviderPlugin,
    ProviderRejected,
    ResponsesRequest,
    ResponsesResponse,
    Scrubber,
    Setting,
    provider_secrets,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_COMPLETION_TOKENS_MODELS",
    "OpenAIProvider",
    "compile_model_patterns",
    "plugin",
    "validate_options",
]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: OpenAI's reasoning families, which accept only ``max_completion_tokens``: o1/o3/o4 (and any
#: later ``o<digit>``), gpt-5.x and codex-mini.  Regular expressions matched at the start of the
#: upstream model id, so a plain prefix works as it is.
DEFAULT_MAX_COMPLETION_TOKENS_MODELS: tuple[str, ...] = (r"o\d", "gpt-5", "codex-mini")
#: Models learned from a 400 are remembered up to this many (a bound, not a cache policy: a
#: gateway serves far fewer distinct models than this).
LEARNED_MODELS_LIMIT = 1024


def _pattern_problem(pattern: Any) -> str | None:
    """Why one ``max_completion_tokens_models`` entry is unusable, or None."""
    if not isinstance(pattern, str) or not pattern:
        return f"must be a non-empty string, got {pattern!r}"
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"invalid regular expression {pattern!r}: {exc}"
    return None


def validate_options(provider: str, options: Mapping[str, Any]) -> list[str]:
    """Settings-time check of what a ``Setting`` cannot express: each pattern must compile.

    Run by settings validation, so ``--check-config`` reports a bad pattern instead of the
    gateway failing later while it builds providers.
    """
    patterns = options.get("max_completion_tokens_models")
    if not isinstance(patterns, list):
        return []  # a wrong type is already reported by the Setting check
    where = f"providers.{provider}.max_completion_tokens_models"
    return [
        f"{where}[{i}]: {problem}"
        for i, pattern in enumerate(patterns)
        if (problem := _pattern_problem(pattern)) is not None
    ]


def compile_model_patterns(patterns: Iterable[Any], where: str) -> tuple[re.Pattern[str], ...]:
    """Compile the ``max_completion_tokens_models`` entries, naming the bad one on error.

    Settings validation (:func:`validate_options`) normally rejects bad entries first; this
    raise covers a provider built from a hand-made ``ProviderConfig``.
    """
    compiled: list[re.Pattern[str]] = []
    for i, pattern in enumerate(patterns):
        problem = _pattern_problem(pattern)
        if problem is not None:
            raise ValueError(f"{where}[{i}]: {problem}")
        compiled.append(re.compile(pattern))
    return tuple(compiled)


@asynccontextmanager
async def _closing(chunks: AsyncIterator[ChatChunk]) -> AsyncIterator[AsyncIterator[ChatChunk]]:
    """``contextlib.aclosing`` for the ``AsyncIterator`` type the base class declares."""
    try:
        yield chunks
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def _text_option(value: Any) -> str | None:
    """A header value from a setting: blank means not set (an empty header would be sent)."""
    return (value.strip() or None) if isinstance(value, str) else None


class OpenAIProvider(OpenAICompatibleProvider):
    """The OpenAI API (or a compatible server) with OpenAI's headers and parameter rules."""

    def __init__(self, session: aiohttp.ClientSession, config: ProviderConfig) -> None:
        super().__init__(session, config)
        options = config.options
        self.organization = _text_option(options.get("organization"))
        self.project = _text_option(options.get("project"))
        self.stream_usage = bool(options.get("stream_usage", True))
        #: "auto": native until the upstream shows it has no /v1/responses (then translated).
        self.responses_mode = str(options.get("responses") or "auto")
        self.native_responses = self.responses_mode != "translate"
        patterns = options.get("max_completion_tokens_models")
        self.max_completion_tokens_patterns = compile_model_patterns(
            DEFAULT_MAX_COMPLETION_TOKENS_MODELS if patterns is None else patterns,
            f"provider '{config.name}': max_completion_tokens_models",
        )
        self._learned: set[str] = set()
        self.scrubber = Scrubber(provider_secrets(config))
        if not config.api_key and urlsplit(config.base_url).hostname == "api.openai.com":
            # Not an error: /health will say so too, but this is the line an operator reads.
            log.warning(
                "provider %s talks to api.openai.com without an api_key; every call will get "
                '401 (set api_key: "@secret openai_api_key")',
                config.name,
            )

    # --- request shaping -----------------------------------------------------------------------

    def request_headers(self, ctx: CallContext | None = None) -> dict[str, str]:
        """The base headers (JSON, bearer key, request id, trace) plus organization/project."""
        headers = super().request_headers(ctx)
        if self.organization:
            headers["OpenAI-Organization"] = self.organization
        if self.project:
            headers["OpenAI-Project"] = self.project
        return headers

    def uses_max_completion_tokens(self, model: str) -> bool:
        """Whether ``model`` rejects ``max_tokens`` (configured family, or learned from a 400)."""
        if model in self._learned:
            return True
        # Fine-tunes are named "ft:<base model>:<org>::<id>" and follow their base model's rules.
        bare = model.removeprefix("ft:")
        return any(p.match(model) or p.match(bare) for p in self.max_completion_tokens_patterns)

    def build_body(self, request: ChatRequest, ctx: CallContext, *, stream: bool) -> dict[str, Any]:
        """The base body, with ``max_tokens`` renamed where needed and usage asked for on streams."""
        body = super().build_body(request, ctx, stream=stream)
        if "max_tokens" in body and self.uses_max_completion_tokens(ctx.upstream_model):
            value = body.pop("max_tokens")
            # An explicit max_completion_tokens wins: it is the field these models honour.
            body.setdefault("max_completion_tokens", value)
        if stream and self.stream_usage and not ctx.include_usage:
            options = dict(body.get("stream_options") or {})
            options["include_usage"] = True
            body["stream_options"] = options
        return body

    def _renaming_helps(self, exc: GatewayError, request: ChatRequest, ctx: CallContext) -> bool:
        """True for OpenAI's 400 "Unsupported parameter: 'max_tokens' ... use max_completion_tokens"."""
        if not isinstance(exc, ProviderRejected) or exc.http_status != 400:
            return False
        if exc.code.lower() != "unsupported_parameter" or "max_tokens" not in request:
            return False
        if self.uses_max_completion_tokens(ctx.upstream_model):
            return False  # already renamed: retrying would send the same body again
        return exc.param == "max_tokens" or (exc.param is None and "max_tokens" in exc.message)

    def _learn(self, model: str) -> None:
        if len(self._learned) < LEARNED_MODELS_LIMIT:
            self._learned.add(model)
        log.info(
            "provider %s: model %s rejects max_tokens; retrying with max_completion_tokens "
            "(add it to max_completion_tokens_models to skip the failed call)",
            self.config.name,
            model,
        )

    def _scrub(self, exc: GatewayError) -> None:
        """Remove the provider's secrets from every field of an error (it is shown to clients,
        logged, recorded on spans and counted in metrics)."""
        self.scrubber.scrub_error(exc)

    def _for_client(self, chunk: ChatChunk, ctx: CallContext) -> ChatChunk:
        """Drop the ``"usage": null`` that our own include_usage made OpenAI add to each chunk."""
        if not ctx.include_usage and "usage" in chunk and chunk["usage"] is None:
            del chunk["usage"]
        return chunk

    # --- calls ---------------------------------------------------------------------------------

    async def chat(self, request: ChatRequest, ctx: CallContext) -> ChatResponse:
        try:
            return await super().chat(request, ctx)
        except GatewayError as exc:
            if not self._renaming_helps(exc, request, ctx):
                self._scrub(exc)
                raise
            self._learn(ctx.upstream_model)
        try:
            return await super().chat(request, ctx)
        except GatewayError as exc:
            self._scrub(exc)
            raise

    async def stream_chat(self, request: ChatRequest, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        # _closing: when the client goes away mid-stream, the base stream is closed at once
        # (dropping the upstream connection) instead of whenever the garbage collector runs.
        started = False
        try:
            async with _closing(super().stream_chat(request, ctx)) as chunks:
                async for chunk in chunks:
                    started = True
                    yield self._for_client(chunk, ctx)
            return
        except GatewayError as exc:
            if started or not self._renaming_helps(exc, request, ctx):
                self._scrub(exc)
                raise
            self._learn(ctx.upstream_model)
        # The 400 came before any chunk, so the retry is invisible to the client.
        try:
            async with _closing(super().stream_chat(request, ctx)) as chunks:
                async for chunk in chunks:
                    yield self._for_client(chunk, ctx)
        except GatewayError as exc:
            self._scrub(exc)
            raise

    #: OpenAI serves /v1/responses itself: requests pass through (stored upstream).  Many
    #: OpenAI-compatible servers (llama.cpp, older vLLM) do not: see :meth:`responses_unavailable`.
    native_responses = True

    def responses_unavailable(self, exc: GatewayError) -> bool:
        """With ``responses: auto``, a bare 404 from ``/v1/responses`` (no OpenAI error code:
        the server has no such route, e.g. llama.cpp's ``{"detail": "Not Found"}``) switches
        this provider to the gateway's translation onto chat, for this request and every later
        one.  A 404 with a code (``model_not_found``) is a real answer and stays one."""
        if (
            self.responses_mode != "auto"
            or not isinstance(exc, ProviderRejected)
            or exc.http_status != 404
            or exc.upstream_code
        ):
            return False
        if self.native_responses:
            self.native_responses = False
            log.warning(
                "provider %s has no /v1/responses (404): the Responses API is translated onto "
                "chat from now on (set responses: translate to skip the probe)",
                self.config.name,
            )
        return True

    async def respond(self, request: ResponsesRequest, ctx: CallContext) -> ResponsesResponse:
        try:
            return await super().respond(request, ctx)
        except GatewayError as exc:
            self._scrub(exc)
            raise

    async def stream_respond(
        self, request: ResponsesRequest, ctx: CallContext
    ) -> AsyncIterator[ResponsesResponse]:
        try:
            async with _closing(super().stream_respond(request, ctx)) as events:
                async for event in events:
                    yield event
        except GatewayError as exc:
            self._scrub(exc)
            raise

    async def embed(self, request: EmbeddingRequest, ctx: CallContext) -> EmbeddingResponse:
        try:
            return await super().embed(request, ctx)
        except GatewayError as exc:
            self._scrub(exc)
            raise

    async def complete(self, request: CompletionRequest, ctx: CallContext) -> CompletionResponse:
        try:
            return await super().complete(request, ctx)
        except GatewayError as exc:
            self._scrub(exc)
            raise

    async def stream_complete(
        self, request: CompletionRequest, ctx: CallContext
    ) -> AsyncIterator[CompletionResponse]:
        try:
            async with _closing(super().stream_complete(request, ctx)) as chunks:
                async for chunk in chunks:
                    yield self._for_client(chunk, ctx)
        except GatewayError as exc:
            self._scrub(exc)
            raise

    async def list_models(self) -> list[ModelInfo]:
        # health() calls this, so its detail text is scrubbed too.
        try:
            return await super().list_models()
        except GatewayError as exc:
            self._scrub(exc)
            raise


plugin = ProviderPlugin(
    name="openai",
    factory=OpenAIProvider,
    settings={
        "organization": Setting(
            (str,),
            None,
            nullable=True,
            description="sent as the OpenAI-Organization header (org-...); for keys in several orgs",
        ),
        "project": Setting(
            (str,),
            None,
            nullable=True,
            description="sent as the OpenAI-Project header (proj_...)",
        ),
        "max_completion_tokens_models": Setting(
            (list,),
            list(DEFAULT_MAX_COMPLETION_TOKENS_MODELS),
            description=(
                "regular expressions matched at the start of the upstream model id; for those "
                "models max_tokens is sent as max_completion_tokens (others only after a 400 says so)"
            ),
        ),
        "responses": Setting(
            (str,),
            "auto",
            choices=("auto", "native", "translate"),
            description=(
                "the Responses API: native (pass through to the upstream's /v1/responses), "
                "translate (onto chat, stored by the gateway) or auto (native until the upstream "
                "answers 404 without an error code, then translate)"
            ),
        ),
        "stream_usage": Setting(
            (bool,),
            True,
            description=(
                "ask for stream usage even when the client did not, so the gateway records real "
                "token counts (false for servers that reject stream_options)"
            ),
        ),
    },
    default_base_url=DEFAULT_BASE_URL,
    validate_options=validate_options,
)
