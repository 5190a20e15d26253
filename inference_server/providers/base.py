"""The provider plugin interface: the one contract between the gateway and a model server.

A plugin is a distribution that exposes a :class:`ProviderPlugin` under the entry-point group
``inference_server.providers``.  The gateway builds one :class:`Provider` per configured provider
instance by calling ``plugin.factory(session, config)`` with the app's single shared
``aiohttp.ClientSession`` and that instance's validated settings.  Each plugin owns its wire
format: it receives OpenAI-shaped requests and returns OpenAI-shaped responses and chunks.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from inference_server.errors import GatewayError, InvalidRequest
from inference_server.scrub import REDACTED, SECRET_NAME, mask_url

#: Bumped when the interface changes incompatibly; the loader rejects other versions.
PROVIDER_API_VERSION = 1

#: An OpenAI chat.completions request body after validation (unknown fields ride along).
ChatRequest = dict[str, Any]
#: An OpenAI ``chat.completion`` object.
ChatResponse = dict[str, Any]
#: An OpenAI ``chat.completion.chunk`` object.
ChatChunk = dict[str, Any]
#: An OpenAI embeddings request / its ``list`` of ``embedding`` objects (optional capability).
EmbeddingRequest = dict[str, Any]
EmbeddingResponse = dict[str, Any]
#: An OpenAI Responses API request / ``response`` object or stream event (optional, native).
ResponsesRequest = dict[str, Any]
ResponsesResponse = dict[str, Any]
#: An OpenAI (legacy) completions request / ``text_completion`` object or chunk (optional).
CompletionRequest = dict[str, Any]
CompletionResponse = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Setting:
    """Declares one settings key: its type, default, bounds and whether it is a secret.

    The core turns these into dynaconf ``Validator`` objects and into the known-key tree used to
    report misspelled keys, so a plugin declares its keys once and gets both.
    """

    types: tuple[type, ...]
    default: Any = None
    gte: float | None = None
    lte: float | None = None
    choices: tuple[Any, ...] | None = None
    secret: bool = False
    nullable: bool = False
    description: str = ""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-attempt time limits, in seconds.

    Non-streaming calls use ``connect`` and ``total``; streams use ``connect``, ``first_byte``
    (until the first chunk) and ``idle`` (between chunks) instead of a total, because a
    generation may legitimately run for minutes while still making progress.
    """

    connect: float
    total: float
    first_byte: float
    idle: float
    #: The aiohttp limits for a call and for a stream, built once (one per request costs ~3 µs).
    call_limits: aiohttp.ClientTimeout = field(init=False, repr=False, compare=False)
    stream_limits: aiohttp.ClientTimeout = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        call = aiohttp.ClientTimeout(total=self.total, sock_connect=self.connect)
        # No total for streams: connect, then an idle limit per read (sock_read).
        stream = aiohttp.ClientTimeout(total=None, sock_connect=self.connect, sock_read=self.idle)
        object.__setattr__(self, "call_limits", call)
        object.__setattr__(self, "stream_limits", stream)


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One provider instance's settings, as handed to the plugin's factory."""

    name: str
    plugin: str
    #: May hold credentials (``http://user:KEY@host``): printed only through ``scrub.mask_url``.
    base_url: str
    #: Never in ``repr()``: a traceback or a debug line printing the config must not show it.
    api_key: str | None = field(repr=False)
    timeouts: Timeouts
    max_retries: int
    options: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        """Secrets masked: the key, credentials in the URL, options named like a secret (a
        traceback, a debug line or an error message that prints the config shows none)."""
        options = {
            k: REDACTED if isinstance(v, str) and v and SECRET_NAME.search(str(k)) else v
            for k, v in self.options.items()
        }
        return (
            f"ProviderConfig(name={self.name!r}, plugin={self.plugin!r}, "
            f"base_url={mask_url(self.base_url)!r}, "
            f"api_key={REDACTED if self.api_key else self.api_key!r}, timeouts={self.timeouts!r}, "
            f"max_retries={self.max_retries!r}, options={options!r})"
        )


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a provider needs to know about one upstream attempt besides the request body."""

    request_id: str
    upstream_model: str
    timeouts: Timeouts
    #: Headers to add to the upstream request (e.g. W3C ``traceparent``).
    headers: Mapping[str, str] = field(default_factory=dict)
    #: The client asked for a final usage chunk (``stream_options.include_usage``).
    include_usage: bool = False


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One model as the upstream lists it."""

    id: str
    owned_by: str | None = None
    created: int | None = None


@dataclass(frozen=True, slots=True)
class HealthStatus:
    """Result of one health probe."""

    healthy: bool
    detail: str = ""


class Provider(abc.ABC):
    """One configured upstream.  Owns its wire format; never owns (or closes) the session."""

    def __init__(self, session: aiohttp.ClientSession, config: ProviderConfig) -> None:
        self.session = session
        self.config = config

    def http_headers(
        self, ctx: CallContext | None = None, *, accept: str = "application/json"
    ) -> dict[str, str]:
        """Headers for an HTTP upstream: JSON body, ``accept``, the bearer key when configured,
        and for a call the request id and trace context.

        The request id goes as ``X-Client-Request-Id``, not ``x-request-id``: llama-cpp-python
        (starlette-context) answers an empty 400 to any x-request-id that is not a UUID.
        """
        headers = {"Content-Type": "application/json", "Accept": accept}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        if ctx is not None:
            headers["X-Client-Request-Id"] = ctx.request_id
            headers.update(ctx.headers)
        return headers

    @abc.abstractmethod
    async def chat(self, request: ChatRequest, ctx: CallContext) -> ChatResponse:
        """Return a complete ``chat.completion``; raise a ``GatewayError`` subclass on failure."""

    @abc.abstractmethod
    def stream_chat(self, request: ChatRequest, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        """Yield ``chat.completion.chunk`` objects as they arrive (implement as ``async def``).

        Raise a ``GatewayError`` before the first yield for failures that may still be retried
        or fall back; after it, raise :class:`~inference_server.errors.StreamInterrupted` (or any
        ``GatewayError``) and the gateway ends the client's stream with an error event.  Do not
        yield a usage-only chunk unless the upstream sent one: the gateway synthesises it.
        """

    @abc.abstractmethod
    async def list_models(self) -> list[ModelInfo]:
        """The models the upstream serves now."""

    @abc.abstractmethod
    async def health(self) -> HealthStatus:
        """A cheap liveness probe of the upstream (must not raise for an unreachable upstream)."""

    async def aclose(self) -> None:
        """Release plugin resources.  Must not close the shared session."""
        return None

    # --- optional capabilities (API version 1 stays compatible: defaults say "not supported")

    async def embed(self, request: EmbeddingRequest, ctx: CallContext) -> EmbeddingResponse:
        """Return an OpenAI embeddings ``list`` (one flat float vector per input, in order).

        ``request["input"]`` is always a list here (the gateway wraps a single input), of strings
        or of token-id lists; ``encoding_format`` is always ``float`` (the gateway encodes base64
        itself).  Optional: the default refuses with 400 ``OPERATION_NOT_SUPPORTED``.
        """
        raise operation_not_supported(self.config.name, "embeddings")

    async def complete(self, request: CompletionRequest, ctx: CallContext) -> CompletionResponse:
        """Return a ``text_completion`` for a legacy ``/v1/completions`` request (optional)."""
        raise operation_not_supported(self.config.name, "completions")

    def stream_complete(
        self, request: CompletionRequest, ctx: CallContext
    ) -> AsyncIterator[CompletionResponse]:
        """Yield ``text_completion`` chunks (optional; the same rules as :meth:`stream_chat`)."""
        raise operation_not_supported(self.config.name, "completions")

    #: True when :meth:`respond` / :meth:`stream_respond` reach a native ``/v1/responses``;
    #: otherwise the gateway translates the Responses API onto :meth:`chat` itself.
    native_responses: bool = False

    async def respond(self, request: ResponsesRequest, ctx: CallContext) -> ResponsesResponse:
        """A ``response`` object from the upstream's own Responses API (only called when
        ``native_responses``)."""
        raise operation_not_supported(self.config.name, "the native Responses API")

    def stream_respond(
        self, request: ResponsesRequest, ctx: CallContext
    ) -> AsyncIterator[ResponsesResponse]:
        """The upstream's Responses stream events, ending with ``response.completed`` (or
        ``incomplete`` / ``failed``) (only called when ``native_responses``)."""
        raise operation_not_supported(self.config.name, "the native Responses API")

    def responses_unavailable(self, exc: GatewayError) -> bool:
        """Whether ``exc`` from the native Responses path means the upstream has no Responses
        API after all; True: the gateway translates this request (and the plugin decides about
        later ones, e.g. by clearing ``native_responses``).  Default: never."""
        return False

    def supports(self, operation: Operation) -> bool:
        """Whether this provider serves ``operation`` ("chat", "embeddings", "completions",
        "responses").  Chat always; the others when the plugin overrides their method
        (``embed``, ``complete``), or a plugin may override this (e.g. per model).  The
        Responses API is translated onto chat for every provider, so it is always served."""
        if operation == "embeddings":
            return type(self).embed is not Provider.embed
        if operation == "completions":
            return type(self).complete is not Provider.complete
        return True


ProviderFactory = Callable[[aiohttp.ClientSession, ProviderConfig], Provider]
Capability = Literal["chat", "stream"]
#: What a client can ask a provider to do (``Provider.supports``).
Operation = Literal["chat", "embeddings", "completions", "responses"]
OPERATIONS: tuple[Operation, ...] = ("chat", "completions", "embeddings", "responses")


def operation_not_supported(provider: str, operation: str) -> InvalidRequest:
    """The 400 for a route whose provider lacks an optional capability (never a fault)."""
    return InvalidRequest(
        f"Provider '{provider}' does not serve {operation}",
        code="OPERATION_NOT_SUPPORTED",
        param="model",
    )


def _no_settings() -> Mapping[str, Setting]:
    return {}


@dataclass(frozen=True, slots=True)
class ProviderPlugin:
    """What an entry point in ``inference_server.providers`` must resolve to."""

    name: str
    factory: ProviderFactory
    #: Plugin-specific keys allowed beside ``plugin``/``base_url``/``api_key`` in its section.
    settings: Mapping[str, Setting] = field(default_factory=_no_settings)
    #: Used when the provider section gives no ``base_url``.
    default_base_url: str = ""
    #: Deeper checks of the plugin's options (e.g. per-model tables), run by settings
    #: validation and ``--check-config``: ``(provider name, options) -> problems``, each problem
    #: naming the offending key's full path (``providers.<name>.<key>...``).
    validate_options: Callable[[str, Mapping[str, Any]], list[str]] | None = None
    api_version: int = PROVIDER_API_VERSION
