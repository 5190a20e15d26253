"""Spans of real streamed requests, exported over OTLP/HTTP to a receiver in the test: a retry and
a fallback each get their own client span; names, parentage, GenAI attributes and the trace id
propagated to the upstream that answered are checked on what arrived on the wire."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.observability.otlp_receiver import HttpReceiver, ReceivedSpan
from tests.support.fake_upstream import Action, FakeUpstream

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "a secret prompt"}]
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
STREAM = {"stream": True, "stream_options": {"include_usage": True}}


def lm(url: str) -> dict[str, Any]:
    return {"plugin": "lmstudio", "base_url": url}


def traces(receiver: HttpReceiver) -> dict[str, Any]:
    return {
        "logging": {"level": "error"},
        "telemetry": {"traces": {"exporter": "otlp", "otlp_endpoint": receiver.url}},
    }


async def flush(client: Any) -> None:
    """Export now (the batch processor's thread blocks on the receiver, which runs on this loop)."""
    from inference_server.keys import TELEMETRY

    provider = client.app[TELEMETRY].provider
    assert provider is not None
    await asyncio.get_running_loop().run_in_executor(None, provider.force_flush)


def one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def check_request_tree(spans: list[ReceivedSpan]) -> tuple[ReceivedSpan, list[ReceivedSpan]]:
    """The shape every chat request has: server span continuing the client's trace, with the
    validation, routing and stream steps and the attempts as its children."""
    assert {s.trace_id for s in spans} == {CLIENT_TRACE}
    server = one(spans, "POST /v1/chat/completions")
    assert server.kind == "server"
    assert server.parent_span_id == CLIENT_SPAN
    for name in ("inference.validate", "inference.route", "inference.stream"):
        step = one(spans, name)
        assert step.kind == "internal"
        assert step.parent_span_id == server.span_id
    attempts = [s for s in spans if s.kind == "client"]
    assert attempts
    assert all(s.parent_span_id == server.span_id for s in attempts)
    assert server.resource["service.name"] == "inference-server"
    # Prompts and completions are not recorded by default.
    assert not any("secret" in str(v) for s in spans for v in s.attributes.values())
    return server, attempts


async def test_stream_with_a_retry(
    make_settings, make_gateway, fake_upstream: FakeUpstream, otlp_http: HttpReceiver
) -> None:
    settings = make_settings(
        {**traces(otlp_http), "inference": {"base_url": fake_upstream.base_url, "max_retries": 1}}
    )
    client = await make_gateway(settings)
    fake_upstream.script(Action("status", 500, {"error": "once"}), Action(chunks=4))
    resp = await client.post(
        CHAT,
        json={"model": "gpt-oss-20b", "messages": USER, **STREAM},
        headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
    )
    assert resp.status == 200
    await resp.read()
    await flush(client)
    spans = await otlp_http.wait_for(lambda s: any(x.kind == "server" for x in s))
    server, attempts = check_request_tree(spans)
    assert [s.name for s in attempts] == ["chat gpt-oss-20b"] * 2
    failed, answered = sorted(attempts, key=lambda s: s.attributes["inference.attempt"])
    assert failed.status_code == 2  # ERROR
    assert failed.attributes["error.type"] == "PROVIDER_ERROR"
    assert answered.status_code != 2
    assert answered.attributes["gen_ai.request.model"] == "gpt-oss-20b"
    assert answered.attributes["gen_ai.provider.name"] == "lmstudio"
    assert answered.attributes["gen_ai.operation.name"] == "chat"
    a = server.attributes
    assert a["gen_ai.request.model"] == "gpt-oss-20b"
    assert a["gen_ai.request.stream"] is True
    assert a["gen_ai.usage.input_tokens"] == 5
    assert a["gen_ai.usage.output_tokens"] == 4
    assert a["inference.attempts"] == 2
    assert a["inference.retries"] == 1
    assert a["http.response.status_code"] == 200
    assert a["gen_ai.response.time_to_first_chunk"] > 0
    # The upstream saw the same trace, with the answering attempt's span as parent.
    _, trace_id, parent_id, _ = fake_upstream.headers[-1]["traceparent"].split("-")
    assert (trace_id, parent_id) == (CLIENT_TRACE, answered.span_id)


async def test_stream_with_a_fallback(
    make_settings, make_gateway, make_fake_upstream, otlp_http: HttpReceiver
) -> None:
    a, b = await make_fake_upstream(), await make_fake_upstream()
    settings = make_settings(
        {
            **traces(otlp_http),
            "inference": {"max_retries": 0},
            "providers": {"a": lm(a.base_url), "b": lm(b.base_url)},
            "models": {
                "chat": {"provider": "a", "upstream_model": "small", "fallbacks": ["backup"]},
                "backup": {"provider": "b", "upstream_model": "other"},
            },
        }
    )
    client = await make_gateway(settings)
    a.script(Action("status", 503, "busy"))
    resp = await client.post(
        CHAT,
        json={"model": "chat", "messages": USER, **STREAM},
        headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
    )
    assert resp.status == 200
    await resp.read()
    await flush(client)
    spans = await otlp_http.wait_for(lambda s: any(x.kind == "server" for x in s))
    server, attempts = check_request_tree(spans)
    primary = one(attempts, "chat small")
    backup = one(attempts, "chat other")
    assert primary.status_code == 2
    assert primary.attributes["inference.deployment"] == "a/small"
    assert primary.attributes["inference.route"] == "chat"
    assert backup.attributes["inference.deployment"] == "b/other"
    assert backup.attributes["inference.route"] == "backup"
    assert backup.attributes["gen_ai.response.model"] == "other"
    assert server.attributes["gen_ai.request.model"] == "chat"
    assert server.attributes["gen_ai.response.model"] == "other"
    assert server.attributes["inference.route"] == "chat"
    assert server.attributes["inference.deployment"] == "b/other"
    assert server.attributes["inference.fallbacks"] == 1
    assert one(spans, "inference.route").attributes["inference.route"] == "chat"
    assert "traceparent" in a.headers[-1]
    _, trace_id, parent_id, _ = b.headers[-1]["traceparent"].split("-")
    assert (trace_id, parent_id) == (CLIENT_TRACE, backup.span_id)


async def test_each_endpoint_names_its_operation(
    make_settings, make_gateway, fake_upstream: FakeUpstream, otlp_http: HttpReceiver
) -> None:
    """Spans and the attempt metric carry gen_ai.operation.name per endpoint (issue 14)."""
    settings = make_settings(
        {**traces(otlp_http), "inference": {"base_url": fake_upstream.base_url}}
    )
    client = await make_gateway(settings)
    calls = [
        ("/v1/embeddings", {"model": "gpt-oss-20b", "input": "hi"}, "embeddings"),
        ("/v1/completions", {"model": "gpt-oss-20b", "prompt": "hi"}, "text_completion"),
        ("/v1/responses", {"model": "gpt-oss-20b", "input": "hi"}, "responses"),
        (CHAT, {"model": "gpt-oss-20b", "messages": USER}, "chat"),
    ]
    for path, body, _ in calls:
        assert (await client.post(path, json=body)).status == 200
    await flush(client)
    spans = await otlp_http.wait_for(lambda s: sum(x.kind == "server" for x in s) >= 4)
    for path, _, operation in calls:
        server = one(spans, f"POST {path}")
        assert server.attributes["gen_ai.operation.name"] == operation
        attempt = one(spans, f"{operation} gpt-oss-20b")
        assert attempt.kind == "client"
        assert attempt.parent_span_id == server.span_id
        assert attempt.attributes["gen_ai.operation.name"] == operation
    metrics = await (await client.get("/metrics")).text()
    counted = {
        line.split('operation="')[1].split('"')[0]
        for line in metrics.splitlines()
        if line.startswith("gen_ai_client_operation_duration_seconds_count{")
    }
    assert counted == {"embeddings", "text_completion", "responses", "chat"}
