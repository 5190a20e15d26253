"""OpenTelemetry tracing: a server span per request, a client span per upstream attempt.

With ``telemetry.traces.exporter: none`` (the default) no tracer provider is built and the
request path skips span work entirely, so tracing costs nothing unless it is turned on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from inference_server.settings import TraceSettings


class Telemetry:
    """Owns the tracer provider (if any) for the app's lifetime."""

    def __init__(self, settings: TraceSettings) -> None:
        self.enabled = settings.exporter != "none"
        #: The SDK provider when tracing is on (tests attach an in-memory exporter to it).
        self.provider: TracerProvider | None = None
        if not self.enabled:
            self.tracer: trace.Tracer = trace.NoOpTracer()
            return
        provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        )
        exporter: SpanExporter
        if settings.exporter == "console":
            exporter = ConsoleSpanExporter()
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )

            exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint)
            provider.add_span_processor(BatchSpanProcessor(exporter))
        self.provider = provider
        self.tracer = provider.get_tracer("inference_server")

    @contextmanager
    def server_span(
        self, name: str, headers: Mapping[str, str], attributes: dict[str, Any]
    ) -> Iterator[Span | None]:
        """The request's span, continuing a client's W3C ``traceparent`` when present."""
        if not self.enabled:
            yield None
            return
        parent = propagate.extract(headers)
        with self.tracer.start_as_current_span(
            name, context=parent, kind=SpanKind.SERVER, attributes=attributes
        ) as span:
            yield span

    def client_span(self, name: str, attributes: dict[str, Any]) -> Any:
        """A span for one upstream attempt (a no-op context when tracing is off)."""
        if not self.enabled:
            return nullcontext(None)
        return self.tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes)

    def inject(self, carrier: dict[str, str]) -> None:
        """Add ``traceparent`` for the current span to upstream request headers."""
        if self.enabled:
            propagate.inject(carrier)

    @staticmethod
    def record_error(span: Span | None, code: str, message: str) -> None:
        if span is not None:
            span.set_attribute("error.type", code)
            span.set_status(Status(StatusCode.ERROR, message))

    def shutdown(self) -> None:
        """Flush and stop exporters (at app cleanup)."""
        if self.provider is not None:
            self.provider.shutdown()
