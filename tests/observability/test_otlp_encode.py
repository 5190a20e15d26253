"""The hand-rolled OTLP encoder against the SDK's: decoded messages must be equal, span by span and
as batches (grouping by resource and scope included), and the exporter must send what it encodes
and fall back to the SDK encoder for a batch it cannot encode."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator, Sequence
from enum import IntEnum, StrEnum
from typing import cast

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import (
    encode_spans as sdk_encode_spans,
)
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util.types import AnyValue

from inference_server import otlp_encode
from inference_server.otlp_encode import FastOTLPSpanExporter, UnencodableError, encode_spans

REMOTE = SpanContext(
    trace_id=0x0AF7651916CD43DD8448EB211C80319C,
    span_id=0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(TraceFlags.SAMPLED),
    trace_state=TraceState([("vendor", "opaque-1"), ("other@tenant", "v2")]),
)
LINKED_LOCAL = SpanContext(
    trace_id=0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF,
    span_id=0x0000000000000001,
    is_remote=False,
)


class Color(StrEnum):
    RED = "red"


class Level(IntEnum):
    HIGH = 3


#: One value of every attribute type the SDK keeps, with the varint/length edge cases.
ATTRIBUTES: dict[str, AnyValue] = {
    "str": "value",
    "str.empty": "",
    "str.unicode": "ünïcødé ✓ 🚀",
    "str.long": "x" * 200,  # two-byte length varints
    "str.huge": "y" * 20_000,  # past the varint table
    "bool.true": True,
    "bool.false": False,
    "int.zero": 0,
    "int.small": 7,
    "int.two_bytes": 300,
    "int.negative": -1,
    "int.min": -(2**63),
    "int.max": 2**63 - 1,
    "int.large": 2**40 + 12345,
    "float": 1.5,
    "float.zero": 0.0,
    "float.negative_zero": -0.0,
    "float.inf": float("inf"),
    "float.tiny": 5e-324,
    "bytes": b"\x00\xff\x10",
    "bytes.empty": b"",
    "list.str": ["a", "", "ç"],
    "list.bool": [True, False],
    "list.int": [0, -5, 2**62],
    "list.float": [0.0, -2.25],
    "list.empty": [],
    "tuple.mixed": ("a", 1, None),
    "enum.str": Color.RED,
    "enum.int": Level.HIGH,
    "mapping": {"a": 1, "nested": {"b": ["c", 2.5]}, "none": None},
    "ключ": "значение",
}


@pytest.fixture(scope="module")
def spans() -> list[ReadableSpan]:
    """Varied finished spans from two providers (two resources), two scopes each."""
    exporter = InMemorySpanExporter()
    providers = [
        TracerProvider(
            resource=Resource(
                {"service.name": "gateway", "service.version": "1.2.3", "shared": "same"},
                schema_url="https://opentelemetry.io/schemas/1.26.0",
            )
        ),
        TracerProvider(
            resource=Resource({"service.name": "other", "tags": ["a", "b"]}),
            span_limits=SpanLimits(
                max_span_attributes=4,
                max_events=2,
                max_links=1,
                max_event_attributes=1,
                max_link_attributes=1,
                max_attribute_length=5,
            ),
        ),
    ]
    for provider in providers:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracers = [
            provider.get_tracer(
                "inference_server",
                "0.1.0",
                schema_url="https://opentelemetry.io/schemas/1.21.0",
                attributes={"scope.attr": "s", "scope.n": 1},
            ),
            provider.get_tracer("other.lib"),
        ]
        for tracer in tracers:
            _make_spans(tracer)
    finished = list(exporter.get_finished_spans())
    # Interleave the groups, so that grouping has to restore the SDK's order.
    finished = finished[::2] + finished[1::2]
    for provider in providers:
        provider.shutdown()
    assert len({s.resource.attributes["service.name"] for s in finished}) == 2
    assert len({(s.instrumentation_scope or None) for s in finished}) == 2
    return finished


def _make_spans(tracer: trace.Tracer) -> None:
    remote = trace.set_span_in_context(NonRecordingSpan(REMOTE))
    with tracer.start_as_current_span(
        "root ✓ ünïcødé", kind=SpanKind.SERVER, attributes=ATTRIBUTES
    ):
        for kind in SpanKind:
            with tracer.start_as_current_span(f"child {kind.name}", kind=kind) as child:
                child.set_attribute("http.status_code", 200)
        with tracer.start_as_current_span("events") as span:
            span.set_attribute("shared", "same")  # one (key, value) pair under every tag
            span.add_event("plain")
            span.add_event("with attributes", {"a": 1, "b": "two", "c": [1.5], "shared": "same"})
            span.add_event("timed", {"d": True}, timestamp=1_700_000_000_123_456_789)
            span.add_event("")
        with tracer.start_as_current_span(
            "links",
            links=[  # with max_links=1 only the last is kept (its attributes limited to 1)
                Link(LINKED_LOCAL),
                Link(REMOTE, {}),
                Link(REMOTE, {"shared": "same", "link.n": 2}),
            ],
        ):
            pass
        with tracer.start_as_current_span("ok") as span:
            span.set_status(Status(StatusCode.OK))
        with tracer.start_as_current_span("error") as span:
            span.set_status(Status(StatusCode.ERROR, "upstream timed out ⏱"))
        with tracer.start_as_current_span("error without message") as span:
            span.set_status(StatusCode.ERROR)
        with tracer.start_as_current_span("exception", record_exception=False) as span:
            try:
                raise ValueError("boom")
            except ValueError as error:
                span.record_exception(error, {"extra": "context"})
        with tracer.start_as_current_span("many attributes") as span:
            for i in range(200):
                span.set_attribute(f"attr.{i}", i)
    with (
        tracer.start_as_current_span("remote parent", context=remote, kind=SpanKind.CONSUMER),
        tracer.start_as_current_span("under remote"),
    ):
        pass
    tracer.start_span("", kind=SpanKind.PRODUCER).end()


def _decode(data: bytes) -> ExportTraceServiceRequest:
    request: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(data)
    return request


def _sdk(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    return _decode(sdk_encode_spans(spans).SerializePartialToString())


def assert_same(spans: Sequence[ReadableSpan]) -> None:
    """Equal messages, and equal canonical re-serializations (presence of empty fields counts)."""
    ours = _decode(encode_spans(spans))
    theirs = _sdk(spans)
    assert ours == theirs
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(
        deterministic=True
    )


def test_batch_matches_sdk(spans: list[ReadableSpan]) -> None:
    assert_same(spans)
    request = _decode(encode_spans(spans))
    assert len(request.resource_spans) == 2
    assert all(len(rs.scope_spans) == 2 for rs in request.resource_spans)
    assert sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans) == len(
        spans
    )


def test_each_span_matches_sdk(spans: list[ReadableSpan]) -> None:
    for span in spans:
        assert_same([span])


def test_empty_batch() -> None:
    assert encode_spans([]) == b""
    assert_same([])


def test_corners_are_exercised(spans: list[ReadableSpan]) -> None:
    """The fixture really produces what the comparisons are meant to cover."""
    request = _decode(encode_spans(spans))
    encoded = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert {s.kind for s in encoded} == {1, 2, 3, 4, 5}
    assert any(
        s.flags == 0x300 and s.trace_state == "vendor=opaque-1,other@tenant=v2" for s in encoded
    )
    assert any(s.dropped_attributes_count for s in encoded)
    assert any(s.dropped_events_count for s in encoded)
    assert any(s.dropped_links_count for s in encoded)
    assert any(e.dropped_attributes_count for s in encoded for e in s.events)
    assert any(lk.dropped_attributes_count for s in encoded for lk in s.links)
    assert {lk.flags for s in encoded for lk in s.links} == {0x100, 0x300}
    assert {s.status.code for s in encoded} == {0, 1, 2}
    assert any(s.status.message == "upstream timed out ⏱" for s in encoded)
    assert any(e.name == "exception" for s in encoded for e in s.events)
    assert any(kv.value.HasField("kvlist_value") for s in encoded for kv in s.attributes)


def test_unended_span_and_scope_none() -> None:
    """No end time, no scope, a parent without is_remote: fields the SDK leaves unset."""
    provider = TracerProvider()
    open_span = provider.get_tracer("t").start_span("open", context=None)
    assert isinstance(open_span, ReadableSpan)
    bare = ReadableSpan(
        name="bare",
        context=LINKED_LOCAL,
        parent=SpanContext(LINKED_LOCAL.trace_id, 2, is_remote=False),
        resource=Resource({}),
        instrumentation_scope=None,
        events=[Event("e", {"k": "v"}, timestamp=0)],
        start_time=0,
        end_time=5,
        status=Status(StatusCode.UNSET),
    )
    assert_same([open_span])
    assert_same([bare])
    assert_same([open_span, bare, open_span])
    open_span.end()
    provider.shutdown()


def test_equal_resources_and_scopes_are_grouped_like_the_sdk() -> None:
    """Distinct but equal Resource/scope objects share a group, headed by the first of them."""

    def span(name: str, resource: Resource, scope: InstrumentationScope | None) -> ReadableSpan:
        return ReadableSpan(
            name=name,
            context=LINKED_LOCAL,
            resource=resource,
            instrumentation_scope=scope,
            start_time=1,
            end_time=2,
        )

    r1, r2, r3 = Resource({"a": 1, "b": 2}), Resource({"b": 2, "a": 1}), Resource({"a": 2})
    s1, s2 = InstrumentationScope("lib", "1"), InstrumentationScope("lib", "1")
    batch = [
        span("1", r1, s1),
        span("2", r3, None),
        span("3", r2, s2),
        span("4", r1, None),
        span("5", r3, s1),
        span("6", r2, None),
    ]
    assert_same(batch)
    request = _decode(encode_spans(batch))
    assert len(request.resource_spans) == 2
    assert [kv.key for kv in request.resource_spans[0].resource.attributes] == ["a", "b"]


def test_bounded_caches_refill(spans: list[ReadableSpan], monkeypatch: pytest.MonkeyPatch) -> None:
    """Caches cleared when full (high cardinality) must not change the output."""
    for name in ("_KEY_CACHE_MAX", "_PAIR_CACHE_MAX", "_NAME_CACHE_MAX", "_HEADER_CACHE_MAX"):
        monkeypatch.setattr(otlp_encode, name, 1)
    for name in ("_key_cache", "_pair_cache", "_name_cache", "_resource_cache", "_scope_cache"):
        monkeypatch.setattr(otlp_encode, name, {})
    assert_same(spans)
    assert_same(spans[::-1])
    assert len(otlp_encode._pair_cache) == 1
    assert len(otlp_encode._resource_cache) == 1


def test_unencodable_values_raise() -> None:
    """Where the SDK would log and drop an attribute, the fast encoder refuses the batch."""
    for value in (2**63, -(2**63) - 1, [1, 2**64], object(), "\ud800"):
        span = ReadableSpan(
            name="s",
            context=LINKED_LOCAL,
            resource=Resource({}),
            attributes={"k": cast(AnyValue, value)},  # unchecked, as a ReadableSpan's are
        )
        with pytest.raises((UnencodableError, UnicodeEncodeError)):
            encode_spans([span])


# ---------------------------------------------------------------------------------------------
# The exporter, against a local HTTP receiver.


class _Receiver(http.server.ThreadingHTTPServer):
    """Records each POSTed body; answers with ``status``."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bodies: list[bytes] = []
        self.status = 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.bodies.append(body)
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    server = _Receiver()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def exporter(receiver: _Receiver) -> Iterator[FastOTLPSpanExporter]:
    exp = FastOTLPSpanExporter(
        endpoint=receiver.url, timeout=5, compression=Compression.NoCompression, headers={}
    )
    yield exp
    _shutdown(exp)


def _shutdown(exporter: SpanExporter) -> None:
    """``shutdown`` through the typed base (the OTLP exporter's own is unannotated)."""
    exporter.shutdown()


def test_exporter_sends_what_it_encodes(
    spans: list[ReadableSpan], receiver: _Receiver, exporter: FastOTLPSpanExporter
) -> None:
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    assert receiver.bodies == [encode_spans(spans)]
    assert _decode(receiver.bodies[0]) == _sdk(spans)


def test_exporter_falls_back_to_the_sdk_encoder(
    spans: list[ReadableSpan],
    receiver: _Receiver,
    exporter: FastOTLPSpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(_: Sequence[ReadableSpan]) -> bytes:
        raise UnencodableError("unexpected")

    monkeypatch.setattr(otlp_encode, "encode_spans", broken)
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    assert len(receiver.bodies) == 1
    assert _decode(receiver.bodies[0]) == _sdk(spans)


def test_exporter_delivers_a_batch_only_the_sdk_can_encode(
    receiver: _Receiver, exporter: FastOTLPSpanExporter
) -> None:
    """An out-of-range int: the SDK drops that attribute (and logs); the rest arrives."""
    span = ReadableSpan(
        name="s",
        context=LINKED_LOCAL,
        resource=Resource({}),
        attributes={"ok": 1, "too.big": 2**64},
    )
    assert exporter.export([span]) is SpanExportResult.SUCCESS
    received = _decode(receiver.bodies[0]).resource_spans[0].scope_spans[0].spans[0]
    assert [kv.key for kv in received.attributes] == ["ok"]


def test_exporter_fails_a_batch_no_encoder_can_encode(
    receiver: _Receiver, exporter: FastOTLPSpanExporter
) -> None:
    """A span name that is not valid UTF-8 fails both encoders: a failed export, as the parent."""
    span = ReadableSpan(name="\ud800", context=LINKED_LOCAL, resource=Resource({}))
    assert exporter.export([span]) is SpanExportResult.FAILURE
    assert receiver.bodies == []


def test_exporter_failures_follow_the_parent(
    spans: list[ReadableSpan], receiver: _Receiver, exporter: FastOTLPSpanExporter
) -> None:
    receiver.status = 400
    assert exporter.export(spans[:1]) is SpanExportResult.FAILURE
    assert len(receiver.bodies) == 1

    small = FastOTLPSpanExporter(endpoint=receiver.url, max_request_size=10)
    assert small.export(spans[:1]) is SpanExportResult.FAILURE  # too large: never sent
    _shutdown(small)
    assert len(receiver.bodies) == 1

    _shutdown(exporter)
    assert exporter.export(spans[:1]) is SpanExportResult.FAILURE
