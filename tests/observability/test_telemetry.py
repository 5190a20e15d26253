"""Tracing on its own: OTEL_* precedence over settings, both OTLP protocols to a real receiver,
GenAI attributes from the request record, content only when enabled, nothing when off."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from opentelemetry import propagate
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from inference_server import __version__
from inference_server.context import RequestContext
from inference_server.settings import TraceSettings
from inference_server.telemetry import (
    DEFAULT_GRPC_ENDPOINT,
    DEFAULT_HTTP_ENDPOINT,
    Telemetry,
    resolve,
)
from tests.observability.otlp_receiver import GrpcReceiver, HttpReceiver

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


@dataclass(frozen=True)
class _Traces:
    """settings.TraceSettings' fields, including those this issue adds to it."""

    exporter: str = "otlp"
    otlp_endpoint: str | None = None
    service_name: str = "inference-server"
    sample_ratio: float = 1.0
    protocol: str = "http/protobuf"
    headers: dict[str, str] = field(default_factory=dict)
    record_content: bool = False
    content_max_chars: int = 4096


def Traces(**fields: Any) -> TraceSettings:
    return cast("TraceSettings", _Traces(**fields))


# --- precedence ------------------------------------------------------------------------------


def test_settings_alone() -> None:
    cfg = resolve(Traces(headers={"x-key": "k"}, sample_ratio=0.25), environ={})
    assert cfg.exporters == ("otlp",)
    assert cfg.protocol == "http/protobuf"
    assert cfg.endpoint == DEFAULT_HTTP_ENDPOINT
    assert cfg.headers == {"x-key": "k"}
    assert cfg.service_name == "inference-server"
    assert "ParentBased" in cfg.sampler.get_description()
    assert "0.25" in cfg.sampler.get_description()
    assert resolve(Traces(protocol="grpc"), environ={}).endpoint == DEFAULT_GRPC_ENDPOINT
    # The old HTTP default left in a settings file does not send gRPC to the HTTP port.
    grpc = resolve(Traces(protocol="grpc", otlp_endpoint=DEFAULT_HTTP_ENDPOINT), environ={})
    assert grpc.endpoint == DEFAULT_GRPC_ENDPOINT


def test_otel_environment_wins_over_settings() -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "console,otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-key=from-env",
        "OTEL_SERVICE_NAME": "gw-env",
        "OTEL_TRACES_SAMPLER": "traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.5",
    }
    cfg = resolve(Traces(exporter="none", headers={"x-key": "k"}), environ=env)
    assert cfg.exporters == ("console", "otlp")
    assert cfg.protocol == "grpc"
    assert cfg.endpoint is None  # the exporter reads OTEL_EXPORTER_OTLP_* itself
    assert cfg.headers is None
    assert cfg.service_name == "gw-env"
    assert cfg.sampler.get_description() == "TraceIdRatioBased{0.5}"
    # Signal-specific names beat the generic ones.
    cfg = resolve(
        Traces(),
        environ={
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.name=gw-res",
        },
    )
    assert cfg.protocol == "http/protobuf"
    assert cfg.service_name == "gw-res"


def test_otel_environment_can_turn_tracing_off() -> None:
    assert resolve(Traces(), environ={"OTEL_TRACES_EXPORTER": "none"}).exporters == ()
    assert resolve(Traces(), environ={"OTEL_SDK_DISABLED": "true"}).exporters == ()


def test_invalid_environment_values_are_reported_not_fatal() -> None:
    cfg = resolve(
        Traces(sample_ratio=0.3),
        environ={
            "OTEL_TRACES_EXPORTER": "zipkin,otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
            "OTEL_TRACES_SAMPLER": "sometimes",
        },
    )
    assert cfg.exporters == ("otlp",)
    assert cfg.protocol == "http/protobuf"
    assert "0.3" in cfg.sampler.get_description()
    assert len(cfg.warnings) == 3


# --- spans -----------------------------------------------------------------------------------


def memory_telemetry(**traces: Any) -> tuple[Telemetry, InMemorySpanExporter]:
    telemetry = Telemetry(Traces(exporter="console", **traces), environ={})
    assert telemetry.provider is not None  # (console output is captured by pytest)
    memory = InMemorySpanExporter()
    telemetry.provider.add_span_processor(SimpleSpanProcessor(memory))
    return telemetry, memory


def test_off_means_no_provider_and_no_spans() -> None:
    telemetry = Telemetry(Traces(exporter="none"), environ={})
    assert telemetry.provider is None
    with telemetry.server_span("GET /", {}, {}) as s1, telemetry.span("x") as s2:
        assert s1 is None
        assert s2 is None
    with telemetry.client_span("chat m", {}) as s3:
        assert s3 is None
    carrier: dict[str, str] = {}
    telemetry.inject(carrier)
    assert carrier == {}
    telemetry.finish_request(None, RequestContext("r"), 200)


def test_request_record_becomes_genai_attributes() -> None:
    telemetry, memory = memory_telemetry()
    ctx = RequestContext("r")
    ctx.endpoint, ctx.model, ctx.route = "/v1/chat/completions", "chat", "chat"
    ctx.provider, ctx.deployment, ctx.upstream_model = "local", "local/m", "m"
    ctx.experiment, ctx.variant = "exp", "b"
    ctx.stream, ctx.attempts, ctx.retries, ctx.fallbacks = True, 3, 1, 1
    ctx.first_token_secs = 0.12
    ctx.usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    headers = {"traceparent": f"00-{TRACE}-{PARENT}-01"}
    with telemetry.server_span("POST /v1/chat/completions", headers, {}) as server:
        with telemetry.span("inference.route"):
            pass
        with telemetry.client_span("chat m", {"gen_ai.request.model": "m"}) as client:
            telemetry.record_response(
                client,
                {
                    "id": "chatcmpl-1",
                    "model": "m-2024",
                    "choices": [{"message": {"content": "secret"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 9, "completion_tokens": 4},
                },
            )
            telemetry.record_input(client, [{"role": "user", "content": "secret"}])
        telemetry.finish_request(server, ctx, 200)
    spans = {s.name: s for s in memory.get_finished_spans()}
    srv = spans["POST /v1/chat/completions"]
    assert srv.kind == SpanKind.SERVER
    assert f"{srv.context.trace_id:032x}" == TRACE
    assert srv.parent is not None
    assert f"{srv.parent.span_id:016x}" == PARENT
    attrs = dict(srv.attributes or {})
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "chat"
    assert attrs["gen_ai.response.model"] == "m"
    assert attrs["gen_ai.usage.input_tokens"] == 9
    assert attrs["gen_ai.usage.output_tokens"] == 4
    assert attrs["gen_ai.request.stream"] is True
    assert attrs["gen_ai.response.time_to_first_chunk"] == 0.12
    assert attrs["inference.route"] == "chat"
    assert attrs["inference.deployment"] == "local/m"
    assert attrs["inference.variant"] == "b"
    assert attrs["inference.attempts"] == 3
    assert attrs["http.response.status_code"] == 200
    cli = spans["chat m"]
    assert cli.parent is not None
    assert cli.parent.span_id == srv.context.span_id
    assert spans["inference.route"].kind == SpanKind.INTERNAL
    cattrs = dict(cli.attributes or {})
    assert cattrs["gen_ai.response.model"] == "m-2024"
    assert cattrs["gen_ai.response.id"] == "chatcmpl-1"
    assert cattrs["gen_ai.response.finish_reasons"] == ("stop",)
    # Content is not recorded unless enabled.
    assert not any(
        "secret" in str(v) for s in spans.values() for v in (s.attributes or {}).values()
    )


def test_content_recorded_only_when_enabled_and_truncated() -> None:
    telemetry, memory = memory_telemetry(record_content=True, content_max_chars=40)
    with telemetry.server_span("POST /", {}, {}), telemetry.client_span("chat m", {}) as span:
        telemetry.record_input(span, [{"role": "user", "content": "hello " * 20}])
        telemetry.record_response(span, {"choices": [{"message": {"content": "world"}}]})
    attrs = dict(memory.get_finished_spans()[0].attributes or {})
    assert str(attrs["gen_ai.input.messages"]).startswith('[{"role":"user"')
    assert len(str(attrs["gen_ai.input.messages"])) == 41  # 40 + "…"
    assert "world" in str(attrs["gen_ai.output.messages"])


def test_unsampled_request_makes_no_child_spans_but_propagates_its_trace() -> None:
    telemetry, memory = memory_telemetry(sample_ratio=0.0)
    with telemetry.server_span("POST /", {}, {}) as server:
        assert server is not None
        assert not server.is_recording()
        assert not telemetry.recording()
        with telemetry.span("inference.validate") as step, telemetry.client_span("c", {}) as c:
            assert step is None
            assert c is None
        carrier: dict[str, str] = {}
        telemetry.inject(carrier, server)
    trace_id = f"{server.get_span_context().trace_id:032x}"
    assert carrier["traceparent"].startswith(f"00-{trace_id}-")
    assert int(carrier["traceparent"][-2:], 16) & 1 == 0  # not sampled: nor should upstreams be
    assert memory.get_finished_spans() == ()
    # A client's sampled traceparent is honoured (parent-based sampler): that request is traced.
    with telemetry.server_span("POST /", {"traceparent": f"00-{TRACE}-{PARENT}-01"}, {}) as s:
        assert s is not None
        assert s.is_recording()
        with telemetry.span("inference.validate") as step:
            assert step is not None
    assert [sp.name for sp in memory.get_finished_spans()] == ["inference.validate", "POST /"]


def test_an_exception_leaving_a_span_marks_it_failed() -> None:
    telemetry, memory = memory_telemetry()
    with pytest.raises(ValueError, match="boom"), telemetry.server_span("POST /", {}, {}):
        raise ValueError("boom")
    (span,) = memory.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == "ValueError: boom"
    assert [e.name for e in span.events] == ["exception"]


def test_errors_carry_the_gateway_code() -> None:
    telemetry, memory = memory_telemetry()
    ctx = RequestContext("r")
    ctx.error_code, ctx.status = "PROVIDER_TIMEOUT", 504
    with telemetry.server_span("POST /v1/chat/completions", {}, {}) as span:
        telemetry.finish_request(span, ctx, 504)
    span_data = memory.get_finished_spans()[0]
    assert span_data.status.status_code == StatusCode.ERROR
    assert (span_data.attributes or {})["error.type"] == "PROVIDER_TIMEOUT"


# --- OTLP on the wire --------------------------------------------------------------------------


async def _export_one(telemetry: Telemetry) -> None:
    with (
        telemetry.server_span("POST /v1/chat/completions", {}, {}),
        telemetry.client_span("chat m", {"gen_ai.request.model": "m"}),
    ):
        pass
    assert telemetry.provider is not None
    # The batch exporter posts from its thread; flushing blocks, so not on the event loop.
    await asyncio.get_running_loop().run_in_executor(None, telemetry.provider.force_flush)


async def test_otlp_http_protobuf_export(otlp_http: HttpReceiver) -> None:
    telemetry = Telemetry(
        Traces(otlp_endpoint=otlp_http.url, headers={"x-api-key": "k1"}),
        environ={"OTEL_SERVICE_NAME": "gw-test"},
    )
    await _export_one(telemetry)
    spans = await otlp_http.wait_for(lambda s: len(s) >= 2)
    client = next(s for s in spans if s.name == "chat m")
    server = next(s for s in spans if s.kind == "server")
    assert client.parent_span_id == server.span_id
    assert client.attributes["gen_ai.request.model"] == "m"
    assert server.resource["service.name"] == "gw-test"
    assert otlp_http.headers[0]["x-api-key"] == "k1"
    telemetry.shutdown()


async def test_otlp_grpc_export_configured_by_environment(otlp_grpc: GrpcReceiver) -> None:
    endpoint = f"http://127.0.0.1:{otlp_grpc.port}"
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=k2",
    }
    with pytest.MonkeyPatch.context() as mp:  # the exporter reads endpoint and headers itself
        for key, val in env.items():
            mp.setenv(key, val)
        telemetry = Telemetry(Traces(exporter="none"))
    assert telemetry.config.protocol == "grpc"
    await _export_one(telemetry)
    spans = await otlp_grpc.wait_for(lambda s: len(s) >= 2)
    assert {s.name for s in spans} == {"POST /v1/chat/completions", "chat m"}
    assert otlp_grpc.headers[0]["x-api-key"] == "k2"
    await asyncio.get_running_loop().run_in_executor(None, telemetry.shutdown)


@pytest.mark.differential
def test_request_spans_are_what_the_sdk_would_record() -> None:
    """The span helpers (server_span, span, client_span) give processors what the SDK's own
    ``start_as_current_span`` would: ids, parents, flags, attributes, status, events."""
    telemetry, memory = memory_telemetry()
    assert telemetry.provider is not None
    sdk = telemetry.provider.get_tracer("inference_server", __version__)
    headers = {"traceparent": f"00-{TRACE}-{PARENT}-01"}

    def scenario(server: Any, step: Any, client: Any) -> None:
        with server("POST /x", headers, {"url.path": "/x"}) as s:
            s.set_attributes({"http.response.status_code": 504})
            with step("inference.route", {"gen_ai.request.model": "m"}) as r:
                r.set_attribute("reasons", ["stop", "length"])
            with client("chat m", {"gen_ai.request.model": "m"}) as c:
                c.add_event("retry", {"n": 1})
                c.set_status(Status(StatusCode.ERROR, "PROVIDER_TIMEOUT"))
            raise KeyError("gone")

    with pytest.raises(KeyError, match="gone"):
        scenario(telemetry.server_span, telemetry.span, telemetry.client_span)
    ours = memory.get_finished_spans()
    memory.clear()

    def sdk_span(kind: SpanKind) -> Any:
        def start(name: str, *args: Any) -> Any:
            attributes = args[-1]
            context = propagate.extract(args[0]) if len(args) == 2 else None
            return sdk.start_as_current_span(
                name, context=context, kind=kind, attributes=attributes
            )

        return start

    with pytest.raises(KeyError, match="gone"):
        scenario(sdk_span(SpanKind.SERVER), sdk_span(SpanKind.INTERNAL), sdk_span(SpanKind.CLIENT))
    theirs = memory.get_finished_spans()
    assert (
        [s.name for s in ours]
        == [s.name for s in theirs]
        == ["inference.route", "chat m", "POST /x"]
    )

    def shape(spans: Any) -> list[Any]:
        ids = {s.context.span_id: s.name for s in spans}
        return [
            (
                s.name,
                s.kind,
                f"{s.context.trace_id:032x}",
                int(s.context.trace_flags),
                ids.get(s.parent.span_id if s.parent else None, s.parent and s.parent.span_id),
                s.parent.is_remote if s.parent else None,
                dict(s.attributes or {}),
                s.status.status_code,
                s.status.description,
                [(e.name, sorted((e.attributes or {}).keys())) for e in s.events],
                s.resource.attributes,
                s.instrumentation_scope,
                s.start_time is not None and s.end_time is not None and s.start_time <= s.end_time,
            )
            for s in spans
        ]

    for a, b in zip(shape(ours), shape(theirs), strict=True):
        for x, y in zip(a, b, strict=True):
            assert x == y, (a[0], x, y)
    server = ours[-1]
    assert server.status.description == "KeyError: 'gone'"
    assert dict(ours[0].attributes or {})["reasons"] == ("stop", "length")


def test_spans_from_other_tracers_nest_under_the_request_spans() -> None:
    """A plugin tracing with the SDK inside an attempt gets the attempt as its parent."""
    telemetry, memory = memory_telemetry()
    assert telemetry.provider is not None
    plugin = telemetry.provider.get_tracer("some.plugin")
    with telemetry.server_span("POST /", {}, {}), telemetry.client_span("chat m", {}) as attempt:
        with plugin.start_as_current_span("plugin work"):
            pass
        carrier: dict[str, str] = {}
        telemetry.inject(carrier)
    spans = {s.name: s for s in memory.get_finished_spans()}
    assert attempt is not None
    parent = spans["plugin work"].parent
    assert parent is not None
    assert parent.span_id == attempt.get_span_context().span_id
    assert carrier["traceparent"].split("-")[2] == f"{attempt.get_span_context().span_id:016x}"


def test_span_limits_from_the_environment_apply_to_request_spans(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT`` (read by the SDK's ``SpanLimits``) bounds the
    request path's spans like any SDK span (issue 11: the former plain-data spans ignored it)."""
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "2")
    monkeypatch.setenv("OTEL_SPAN_EVENT_COUNT_LIMIT", "1")
    telemetry, memory = memory_telemetry()
    attrs = {"a": 1, "b": 2, "c": 3, "d": 4}
    with telemetry.server_span("POST /", {}, dict(attrs)) as server:
        assert server is not None
        with telemetry.client_span("chat m", dict(attrs)) as client:
            assert client is not None
            client.add_event("one")
            client.add_event("two")
        server.set_attributes({"e": 5, "f": 6})
    spans = {s.name: s for s in memory.get_finished_spans()}
    for span in spans.values():
        assert len(span.attributes or {}) == 2
        assert span.dropped_attributes > 0
    assert len(spans["chat m"].events) == 1
    assert spans["chat m"].dropped_events == 1


def test_processors_see_request_spans_start() -> None:
    """A span processor's ``on_start`` runs for every request span, with its parent context
    (issue 11: the former plain-data spans went to processors only at their end)."""
    from opentelemetry.sdk.trace import SpanProcessor

    started: list[tuple[str, bool]] = []

    class Starts(SpanProcessor):
        def on_start(self, span: Any, parent_context: Any = None) -> None:
            started.append((span.name, span.is_recording()))

    telemetry, memory = memory_telemetry()
    assert telemetry.provider is not None
    telemetry.provider.add_span_processor(Starts())
    with (
        telemetry.server_span("POST /", {}, {}),
        telemetry.span("inference.route"),
        telemetry.client_span("chat m", {}),
    ):
        pass
    assert started == [("POST /", True), ("inference.route", True), ("chat m", True)]
    assert len(memory.get_finished_spans()) == 3
