"""Minimal OTLP trace receivers for tests: HTTP/protobuf (aiohttp) and gRPC (grpc.aio).

Why our own: a real collector is another binary to install and configure; the wire format is
what matters, and ``opentelemetry-proto`` has the message types.  Both receivers decode every
``ExportTraceServiceRequest`` into flat :class:`ReceivedSpan` records that tests can query by
name, and wake waiters as spans arrive (the exporters send from a background thread, in batches).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import zlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1 import trace_pb2

_KINDS = {
    trace_pb2.Span.SPAN_KIND_INTERNAL: "internal",
    trace_pb2.Span.SPAN_KIND_SERVER: "server",
    trace_pb2.Span.SPAN_KIND_CLIENT: "client",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "producer",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "consumer",
}


@dataclass
class ReceivedSpan:
    name: str
    kind: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    attributes: dict[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error
    resource: dict[str, Any] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def decode(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans: list[ReceivedSpan] = []
    for rs in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append(
                    ReceivedSpan(
                        name=s.name,
                        kind=_KINDS.get(s.kind, "unspecified"),
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        attributes={kv.key: _value(kv.value) for kv in s.attributes},
                        status_code=s.status.code,
                        resource=resource,
                        events=[e.name for e in s.events],
                    )
                )
    return spans


class _Store:
    """Spans received so far, the raw requests' headers, and a condition to wait on."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.headers: list[dict[str, str]] = []
        self._changed = asyncio.Event()

    def add(self, spans: list[ReceivedSpan], headers: dict[str, str]) -> None:
        self.spans.extend(spans)
        self.headers.append(headers)
        self._changed.set()

    async def wait_for(self, predicate: Any, timeout: float = 15.0) -> list[ReceivedSpan]:
        """Wait (bounded) until ``predicate(spans)`` is true; return the spans."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self.spans):
            remaining = deadline - loop.time()
            if remaining <= 0:
                names = [s.name for s in self.spans]
                raise AssertionError(f"spans not received within {timeout}s; got {names}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.5))
        return self.spans

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.name == name]


class HttpReceiver(_Store):
    """``POST /v1/traces`` with an ``application/x-protobuf`` ExportTraceServiceRequest."""

    def __init__(self) -> None:
        super().__init__()
        self.app = web.Application()
        self.app.router.add_post("/v1/traces", self._traces)
        self.url = ""  # set once listening: http://127.0.0.1:<port>/v1/traces

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415, text="protobuf only")
        message = trace_service_pb2.ExportTraceServiceRequest()
        message.ParseFromString(body)
        self.add(decode(message), {k.lower(): v for k, v in request.headers.items()})
        reply = trace_service_pb2.ExportTraceServiceResponse()
        return web.Response(body=reply.SerializeToString(), content_type="application/x-protobuf")


class GrpcReceiver(_Store):
    """The OTLP ``TraceService/Export`` gRPC method on 127.0.0.1 (grpc.aio, this event loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.port = 0
        self._server: Any = None

    async def start(self) -> str:
        import grpc  # type: ignore[import-untyped]
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        store = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            async def Export(  # the gRPC method's name
                self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
            ) -> trace_service_pb2.ExportTraceServiceResponse:
                metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ())}
                store.add(decode(request), metadata)
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            Service(), self._server
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
