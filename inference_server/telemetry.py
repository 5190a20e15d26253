"""OpenTelemetry tracing: a server span per request, internal spans for its steps, a client span
per upstream attempt, W3C ``traceparent`` in from clients and out to upstreams.

Why it looks like this:

* **Nothing when off.** With no exporter (the default) no tracer provider is built and every
  span helper returns one shared no-op context yielding ``None``, so the request path pays a
  method call and no allocation.
* **The standard ``OTEL_*`` variables work and win over settings.yaml**, because that is what
  operators expect from any OTel-instrumented service (a Helm chart or an operator injects them):
  ``OTEL_SDK_DISABLED``, ``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL``,
  ``OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT`` / ``_HEADERS`` (read by the exporter itself, per the
  spec: a generic HTTP endpoint gets ``/v1/traces`` appended), ``OTEL_SERVICE_NAME`` /
  ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` / ``_ARG``; the other exporter and batch
  variables (timeouts, TLS, compression, ``OTEL_BSP_*``) are read by the SDK as usual.  An invalid
  value is logged and ignored, never fatal.  :func:`resolve` is the whole precedence table.
* **GenAI semantic conventions** for attribute names (``gen_ai.request.model``,
  ``gen_ai.response.model``, ``gen_ai.usage.input_tokens``, …) so GenAI-aware backends understand
  the spans; gateway-only facts (route, deployment, variant, attempts) use ``inference.*``.
* **Cheap when on, and only the SDK's public API.** An unsampled request makes one
  non-recording server span and no children (its context is still propagated upstream).  A
  sampled request's spans are the SDK's own (``Tracer.start_span`` + ``trace.use_span``), so
  span limits (``OTEL_SPAN_*_LIMIT``), processors' ``on_start`` and every exporter behave as the
  SDK documents; export uses the SDK's ``OTLPSpanExporter``.  A plain-data span class and a
  hand-written OTLP encoder used to save ~10 µs per span, but they read the SDK's private state
  and skipped its semantics (issue 11): they are gone.
* **No content by default.** Prompts and completions may be personal data; they are recorded
  (``gen_ai.input.messages`` / ``gen_ai.output.messages``, truncated) only with
  ``telemetry.traces.record_content: true``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import orjson
from loguru import logger
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    Span,
    SpanKind,
    Status,
    StatusCode,
    get_current_span,
    set_span_in_context,
    use_span,
)

from inference_server import __version__

if TYPE_CHECKING:
    from inference_server.context import RequestContext
    from inference_server.settings import TraceSettings

HTTP_PROTOBUF: Final = "http/protobuf"
GRPC: Final = "grpc"
DEFAULT_HTTP_ENDPOINT: Final = "http://127.0.0.1:4318/v1/traces"
DEFAULT_GRPC_ENDPOINT: Final = "http://127.0.0.1:4317"
DEFAULT_CONTENT_MAX_CHARS: Final = 4096
_EXPORTERS: Final = ("otlp", "console", "none")
_SAMPLERS: Final = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
#: One shared "no span" context: reusable, so disabled tracing allocates nothing per request.
#: The shared do-nothing span context (tracing off): no allocation per request.
NO_SPAN: Final[AbstractContextManager[None]] = nullcontext(None)
_NO_SPAN = NO_SPAN


@dataclass(frozen=True, slots=True)
class TraceConfig:
    """The effective tracing configuration: settings with the ``OTEL_*`` environment applied."""

    #: Exporters to run ("otlp", "console"); empty: tracing is off.
    exporters: tuple[str, ...]
    protocol: str
    #: None: the exporter reads ``OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT`` itself.
    endpoint: str | None
    #: None: the exporter reads ``OTEL_EXPORTER_OTLP[_TRACES]_HEADERS`` itself.
    headers: Mapping[str, str] | None
    service_name: str
    sampler: Sampler
    record_content: bool
    content_max_chars: int
    #: Human-readable notes on ignored or invalid environment values (logged at startup).
    warnings: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        """One line for the startup log."""
        if not self.exporters:
            return "tracing off"
        endpoint = self.endpoint or "from OTEL_EXPORTER_OTLP_*"
        target = f" {self.protocol} → {endpoint}" if "otlp" in self.exporters else ""
        return (
            f"tracing: {'+'.join(self.exporters)}{target}, service {self.service_name}, "
            f"sampler {self.sampler.get_description()}"
        )


def _env(environ: Mapping[str, str], *names: str) -> str | None:
    """The first of ``names`` set to a non-blank value (signal-specific names come first)."""
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def _resource_service_name(environ: Mapping[str, str]) -> str | None:
    """``service.name`` from ``OTEL_RESOURCE_ATTRIBUTES`` (``k=v,k=v``, values URL-encoded)."""
    from urllib.parse import unquote

    for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip() == "service.name" and value.strip():
            return unquote(value.strip())
    return None


def _sampler(
    name: str, arg: str | None, default_ratio: float, warnings: list[str]
) -> Sampler | None:
    """A sampler from its ``OTEL_TRACES_SAMPLER`` name (None when the name is unknown)."""
    if name not in _SAMPLERS:
        warnings.append(f"OTEL_TRACES_SAMPLER={name!r} is not supported; using settings")
        return None
    ratio = default_ratio
    if name.endswith("traceidratio"):
        ratio = 1.0  # the spec's default for a missing or invalid argument
        if arg is not None:
            try:
                ratio = float(arg)
                if not 0.0 <= ratio <= 1.0:
                    raise ValueError(arg)
            except ValueError:
                warnings.append(f"OTEL_TRACES_SAMPLER_ARG={arg!r} is not a ratio in [0, 1]; 1.0")
                ratio = 1.0
    root: Sampler
    if name.endswith("always_on"):
        root = ALWAYS_ON
    elif name.endswith("always_off"):
        root = ALWAYS_OFF
    else:
        root = TraceIdRatioBased(ratio)
    return ParentBased(root) if name.startswith("parentbased_") else root


def resolve(settings: TraceSettings, environ: Mapping[str, str] | None = None) -> TraceConfig:
    """Apply the ``OTEL_*`` environment over ``telemetry.traces.*`` (environment wins)."""
    env = os.environ if environ is None else environ
    warnings: list[str] = []
    # Settings (getattr: these keys arrived with the observability issue).
    exporter = str(settings.exporter).lower()
    protocol = str(getattr(settings, "protocol", HTTP_PROTOBUF) or HTTP_PROTOBUF).lower()
    endpoint: str | None = getattr(settings, "otlp_endpoint", None) or None
    headers: Mapping[str, str] | None = dict(getattr(settings, "headers", None) or {})
    record_content = bool(getattr(settings, "record_content", False))
    max_chars = int(getattr(settings, "content_max_chars", DEFAULT_CONTENT_MAX_CHARS))
    ratio = float(settings.sample_ratio)

    exporters: tuple[str, ...] = () if exporter == "none" else (exporter,)
    if (env.get("OTEL_SDK_DISABLED") or "").strip().lower() == "true":
        exporters = ()
    elif (value := _env(env, "OTEL_TRACES_EXPORTER")) is not None:
        names = [n.strip().lower() for n in value.split(",") if n.strip()]
        for unknown in (n for n in names if n not in _EXPORTERS):
            warnings.append(f"OTEL_TRACES_EXPORTER: exporter {unknown!r} is not supported")
        exporters = tuple(dict.fromkeys(n for n in names if n in ("otlp", "console")))

    env_protocol = _env(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
    if env_protocol is not None:
        if env_protocol.lower() in (GRPC, HTTP_PROTOBUF):
            protocol = env_protocol.lower()
        else:
            warnings.append(
                f"OTLP protocol {env_protocol!r} is not supported (grpc, http/protobuf); "
                f"using {protocol}"
            )
    if protocol not in (GRPC, HTTP_PROTOBUF):
        protocol = HTTP_PROTOBUF

    if _env(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        endpoint = None  # the exporter applies the spec's rules (signal path for HTTP)
    elif endpoint is None or (protocol == GRPC and endpoint == DEFAULT_HTTP_ENDPOINT):
        endpoint = DEFAULT_GRPC_ENDPOINT if protocol == GRPC else DEFAULT_HTTP_ENDPOINT
    if _env(env, "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"):
        headers = None

    service_name = (
        _env(env, "OTEL_SERVICE_NAME") or _resource_service_name(env) or settings.service_name
    )

    sampler: Sampler | None = None
    if (name := _env(env, "OTEL_TRACES_SAMPLER")) is not None:
        sampler = _sampler(name.lower(), _env(env, "OTEL_TRACES_SAMPLER_ARG"), ratio, warnings)
    if sampler is None:
        # A client's sampled traceparent is honoured, so a caller can trace one request.
        sampler = ParentBased(TraceIdRatioBased(ratio))

    return TraceConfig(
        exporters=exporters,
        protocol=protocol,
        endpoint=endpoint,
        headers=headers,
        service_name=service_name,
        sampler=sampler,
        record_content=record_content,
        content_max_chars=max_chars,
        warnings=tuple(warnings),
    )


def _otlp_exporter(config: TraceConfig) -> SpanExporter:
    """The OTLP exporter for the configured protocol (gRPC is imported only when used)."""
    headers = dict(config.headers) if config.headers is not None else None
    if config.protocol == GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter(endpoint=config.endpoint, headers=headers)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter(endpoint=config.endpoint, headers=headers)


class Telemetry:
    """Owns the tracer provider (if any) for the app's lifetime; span helpers for the pipeline."""

    def __init__(self, settings: TraceSettings, environ: Mapping[str, str] | None = None) -> None:
        self.config = resolve(settings, environ)
        for warning in self.config.warnings:
            logger.warning("telemetry: {}", warning)
        self.enabled = bool(self.config.exporters)
        #: Whether prompts and completions may be put on spans (only when tracing is on).
        self.record_content = self.enabled and self.config.record_content
        #: The SDK provider when tracing is on (tests attach an in-memory exporter to it).
        self.provider: TracerProvider | None = None
        if not self.enabled:
            self.tracer: trace.Tracer = trace.NoOpTracer()
            return
        provider = TracerProvider(
            resource=Resource.create(
                {"service.name": self.config.service_name, "service.version": __version__}
            ),
            sampler=self.config.sampler,
        )
        for name in self.config.exporters:
            if name == "console":
                provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
            else:
                provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(self.config)))
        self.provider = provider
        self.tracer = provider.get_tracer("inference_server", __version__)
        #: Header names the configured propagators read (traceparent, tracestate, baggage, …).
        self._fields = frozenset(propagate.get_global_textmap().fields)
        logger.info("{}", self.config.describe())

    # --- spans ---------------------------------------------------------------------------------

    def server_span(
        self, name: str, headers: Mapping[str, str], attributes: dict[str, Any]
    ) -> AbstractContextManager[Span | None]:
        """The request's span, continuing a client's W3C ``traceparent`` when present.

        A sampled span becomes current (its steps and attempts nest under it).  An unsampled one
        is returned without being made current, so the step helpers below see no recording span
        and create nothing: an unsampled request costs one ``start_span`` and no children.
        """
        if not self.enabled:
            return _NO_SPAN
        parent = propagate.extract(headers) if self._carries_context(headers) else None
        span = self.tracer.start_span(name, parent, SpanKind.SERVER, attributes)
        if not span.is_recording():
            return nullcontext(span)
        return use_span(span, end_on_exit=True)

    def _carries_context(self, headers: Mapping[str, str]) -> bool:
        """Whether ``headers`` hold any field of the configured propagators (skip extract())."""
        return any(name in headers for name in self._fields)

    def client_span(
        self, name: str, attributes: dict[str, Any]
    ) -> AbstractContextManager[Span | None]:
        """A span for one upstream attempt (name: ``"chat <upstream model>"`` per GenAI)."""
        if not self.recording():
            return _NO_SPAN
        return use_span(self.tracer.start_span(name, None, SpanKind.CLIENT, attributes), True)

    def span(
        self, name: str, attributes: dict[str, Any] | None = None
    ) -> AbstractContextManager[Span | None]:
        """An internal span for a step of the request (``inference.validate``, ``…route``,
        ``…stream``) when the request is sampled; the current span becomes its parent and it
        becomes current."""
        if not self.recording():
            return _NO_SPAN
        return use_span(self.tracer.start_span(name, None, SpanKind.INTERNAL, attributes), True)

    def recording(self) -> bool:
        """Whether the current request is traced and sampled (its spans are recorded)."""
        return self.enabled and get_current_span().is_recording()

    def inject(self, carrier: dict[str, str], span: Span | None = None) -> None:
        """Add ``traceparent`` (and the other propagators' fields) for ``span``, or for the
        current span, to upstream request headers."""
        if self.enabled:
            propagate.inject(carrier, context=None if span is None else set_span_in_context(span))

    @staticmethod
    def record_error(span: Span | None, code: str, message: str) -> None:
        """Mark ``span`` failed with the gateway's error code as ``error.type``."""
        if span is not None:
            span.set_attribute("error.type", code)
            span.set_status(Status(StatusCode.ERROR, message))

    # --- attributes from the request's record --------------------------------------------------

    def finish_request(self, span: Span | None, ctx: RequestContext, status: int) -> None:
        """Put what the request became on its server span (GenAI + ``inference.*`` names).

        Called once at the end, from the context, so spans and metrics cannot disagree.
        """
        if span is None or not span.is_recording():
            return
        attrs: dict[str, Any] = {"http.response.status_code": status}
        if ctx.endpoint != "unmatched":
            attrs["http.route"] = ctx.endpoint
        if ctx.model is not None:
            attrs["gen_ai.operation.name"] = ctx.operation
            attrs["gen_ai.request.model"] = ctx.model
            attrs["gen_ai.request.stream"] = ctx.stream
        if ctx.upstream_model is not None:
            attrs.setdefault("gen_ai.response.model", ctx.upstream_model)
        for key, value in (
            ("inference.route", ctx.route),
            ("inference.provider", ctx.provider),
            ("inference.deployment", ctx.deployment),
            ("inference.experiment", ctx.experiment),
            ("inference.variant", ctx.variant),
            ("inference.cache", ctx.cache),
            ("inference.key", ctx.key_name),  # the API key's name, never the key
        ):
            if value is not None:
                attrs[key] = value
        if ctx.attempts:
            attrs["inference.attempts"] = ctx.attempts
            attrs["inference.retries"] = ctx.retries
            attrs["inference.fallbacks"] = ctx.fallbacks
            attrs["inference.upstream_secs"] = round(ctx.upstream_secs, 6)
        if ctx.first_token_secs is not None:
            attrs["gen_ai.response.time_to_first_chunk"] = round(ctx.first_token_secs, 6)
        usage = ctx.usage
        if usage:
            _usage_attributes(attrs, usage)
            if ctx.usage_estimated:
                attrs["inference.usage_estimated"] = True
        span.set_attributes(attrs)
        if ctx.error_code is not None:
            self.record_error(span, ctx.error_code, ctx.error_code)

    def record_response(self, span: Span | None, response: Mapping[str, Any]) -> None:
        """Response facts on an attempt's client span: model, id, finish reasons, usage (and,
        with ``record_content``, the output messages).  ``response``: a chat completion, or the
        first chunk of a stream (then only model and id are known)."""
        if span is None or not span.is_recording():
            return
        attrs: dict[str, Any] = {}
        model = response.get("model")
        if isinstance(model, str):
            attrs["gen_ai.response.model"] = model
        rid = response.get("id")
        if isinstance(rid, str):
            attrs["gen_ai.response.id"] = rid
        choices = response.get("choices")
        if isinstance(choices, list):
            reasons = [
                c["finish_reason"]
                for c in choices
                if isinstance(c, dict) and isinstance(c.get("finish_reason"), str)
            ]
            if reasons:
                attrs["gen_ai.response.finish_reasons"] = reasons
        usage = response.get("usage")
        if isinstance(usage, Mapping):
            _usage_attributes(attrs, usage)
        span.set_attributes(attrs)
        if self.record_content and isinstance(choices, list):
            outputs = [c["message"] for c in choices if isinstance(c, dict) and "message" in c]
            if outputs:  # a stream's chunk has deltas: see record_output_text
                self._content(span, "gen_ai.output.messages", outputs)

    def record_input(self, span: Span | None, messages: Sequence[Any]) -> None:
        """The request's messages as ``gen_ai.input.messages`` (only with ``record_content``)."""
        if self.record_content and span is not None:
            self._content(span, "gen_ai.input.messages", messages)

    def record_output_text(self, span: Span | None, text: str) -> None:
        """A stream's assembled completion as ``gen_ai.output.messages`` (only with
        ``record_content``; the caller gathers the text only when that is true)."""
        if self.record_content and span is not None:
            self._content(span, "gen_ai.output.messages", [{"role": "assistant", "content": text}])

    def _content(self, span: Span, key: str, value: Any) -> None:
        try:
            text = orjson.dumps(value, default=str).decode()
        except TypeError:
            text = str(value)
        limit = self.config.content_max_chars
        if len(text) > limit:
            text = text[:limit] + "…"
        span.set_attribute(key, text)

    def shutdown(self) -> None:
        """Flush and stop exporters (at app cleanup)."""
        if self.provider is not None:
            self.provider.shutdown()


def _usage_attributes(attrs: dict[str, Any], usage: Mapping[str, Any]) -> None:
    """OpenAI usage → ``gen_ai.usage.input_tokens`` / ``output_tokens``."""
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    if isinstance(prompt, int):
        attrs["gen_ai.usage.input_tokens"] = prompt
    if isinstance(completion, int):
        attrs["gen_ai.usage.output_tokens"] = completion
