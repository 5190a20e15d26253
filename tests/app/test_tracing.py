"""Tracing: a server span per request, a client span per upstream attempt, W3C propagation."""

from __future__ import annotations

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from inference_server.keys import TELEMETRY
from tests.support.fake_upstream import Action, FakeUpstream

CLIENT_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
CLIENT_SPAN = 0xB7AD6B7169203331


async def test_spans_parentage_and_propagation(gateway_for, fake_upstream: FakeUpstream) -> None:
    client = await gateway_for({"max_retries": 1}, telemetry={"traces": {"exporter": "console"}})
    memory = InMemorySpanExporter()
    provider = client.app[TELEMETRY].provider
    assert provider is not None
    provider.add_span_processor(SimpleSpanProcessor(memory))
    fake_upstream.script(Action("status", 500, {"error": "once"}))
    resp = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}]},
        headers={"traceparent": f"00-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-01"},
    )
    assert resp.status == 200
    spans = memory.get_finished_spans()
    server = [s for s in spans if s.kind == SpanKind.SERVER]
    clients = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert len(server) == 1
    assert len(clients) == 2  # the failed attempt and the retry, each its own span
    assert server[0].name == "POST /v1/chat/completions"
    assert server[0].context.trace_id == CLIENT_TRACE
    assert server[0].parent is not None
    assert server[0].parent.span_id == CLIENT_SPAN
    for span in clients:
        assert span.parent is not None
        assert span.parent.span_id == server[0].context.span_id
        assert span.attributes is not None
        assert span.attributes["gen_ai.request.model"] == "gpt-oss-20b"
    assert clients[0].status.status_code == StatusCode.ERROR
    # The upstream saw the trace continued: same trace id, the attempt's span as parent.
    _, trace_id, parent_id, _ = fake_upstream.headers[-1]["traceparent"].split("-")
    assert int(trace_id, 16) == CLIENT_TRACE
    assert int(parent_id, 16) == clients[1].context.span_id


async def test_no_traceparent_when_tracing_is_off(gateway_for, fake_upstream: FakeUpstream) -> None:
    client = await gateway_for()
    assert client.app[TELEMETRY].provider is None
    await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert "traceparent" not in fake_upstream.headers[-1]


async def test_stream_content_recorded_only_when_enabled(
    gateway_for, fake_upstream: FakeUpstream
) -> None:
    client = await gateway_for(
        telemetry={"traces": {"exporter": "console", "record_content": True}}
    )
    memory = InMemorySpanExporter()
    provider = client.app[TELEMETRY].provider
    assert provider is not None
    provider.add_span_processor(SimpleSpanProcessor(memory))
    fake_upstream.script(Action(chunks=3, usage=False))
    resp = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "secret prompt"}], "stream": True},
    )
    await resp.read()
    spans = {s.name: s for s in memory.get_finished_spans()}
    stream_attrs = spans["inference.stream"].attributes or {}
    assert "tok0 tok1 tok2 " in str(stream_attrs["gen_ai.output.messages"])
    attempt_attrs = next(s for n, s in spans.items() if n.startswith("chat ")).attributes or {}
    assert "secret prompt" in str(attempt_attrs["gen_ai.input.messages"])
    server_attrs = spans["POST /v1/chat/completions"].attributes or {}
    assert server_attrs.get("inference.usage_estimated") is True


async def test_content_not_recorded_by_default(gateway_for, fake_upstream: FakeUpstream) -> None:
    client = await gateway_for(telemetry={"traces": {"exporter": "console"}})
    memory = InMemorySpanExporter()
    provider = client.app[TELEMETRY].provider
    assert provider is not None
    provider.add_span_processor(SimpleSpanProcessor(memory))
    resp = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "secret prompt"}], "stream": True},
    )
    await resp.read()
    for span in memory.get_finished_spans():
        assert "secret prompt" not in str(dict(span.attributes or {}))
        assert "gen_ai.output.messages" not in (span.attributes or {})
