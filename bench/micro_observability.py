"""In-process micro-benchmark of the observability hot path (a measuring tool, not a test).

Prints µs per call of what a request costs in metrics and tracing, so that a fast path can be
weighed against the library's own API (issue 11: a fast path whose gain is a few µs per request
against ~230 µs of CPU per request goes).  Each figure is the minimum over ``--repeat`` runs of
``--number`` calls (the minimum is the least disturbed run on a shared machine).

    .venv/bin/python bench/micro_observability.py [--number 20000] [--repeat 5]

* ``metrics``: ``request_started`` + ``request_finished`` of a routed JSON request with usage,
  and one ``attempt_finished`` (in-memory values, one process).
* ``spans``: one sampled chat request's spans as the middleware and pipeline make them (server,
  validate, route, client with its response, finish_request), with a ``BatchSpanProcessor`` that
  never exports during the run (its queue is made large enough), so only request-path work is
  measured.
* ``encode``: OTLP/protobuf encoding per span with the SDK's encoder (the export thread's work,
  which holds the GIL).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def best(fn: Callable[[], None], number: int, repeat: int) -> float:
    """Minimum µs per call of ``fn`` over ``repeat`` runs of ``number`` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number * 1e6)
    return min(times)


def bench_metrics(number: int, repeat: int) -> dict[str, float]:
    from inference_server.context import RequestContext
    from inference_server.metrics import Metrics, MetricsSettings

    metrics = Metrics(MetricsSettings())
    know = getattr(metrics, "know", None)
    if know is not None:  # bounded labels: the names come from configuration
        know(
            models=["gpt-oss-20b"],
            routes=["gpt-oss-20b"],
            providers=["local"],
            deployments=["local/gpt-oss-20b"],
        )
    ctx = RequestContext(request_id="r1")
    ctx.endpoint = "/v1/chat/completions"
    ctx.model = ctx.route = ctx.upstream_model = "gpt-oss-20b"
    ctx.provider, ctx.deployment = "local", "local/gpt-oss-20b"
    ctx.attempts, ctx.status, ctx.upstream_secs = 1, 200, 0.2
    ctx.usage = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}

    def request() -> None:
        metrics.request_started(ctx.endpoint)
        metrics.request_finished(ctx, 0.2012)

    def attempt() -> None:
        metrics.attempt_finished("local", "local/gpt-oss-20b", "ok", 0.2)

    return {
        "metrics: request_started + request_finished": best(request, number, repeat),
        "metrics: attempt_finished": best(attempt, number, repeat),
    }


def _telemetry(exporter: str) -> object:
    from inference_server.settings import TraceSettings
    from inference_server.telemetry import Telemetry

    settings = TraceSettings(
        exporter=exporter,
        otlp_endpoint="http://127.0.0.1:9/v1/traces",  # never reached: nothing is exported
        service_name="bench",
        sample_ratio=1.0,
    )
    return Telemetry(settings, environ={})


def bench_spans(number: int, repeat: int) -> dict[str, float]:
    # A queue that never fills and a batch that is never due: no export during the run.
    os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = str(number * repeat * 8)
    os.environ["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] = str(number * repeat * 8)
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = str(3_600_000)
    from inference_server.context import RequestContext
    from inference_server.telemetry import Telemetry

    telemetry = _telemetry("otlp")
    assert isinstance(telemetry, Telemetry)
    ctx = RequestContext(request_id="r1")
    ctx.endpoint = "/v1/chat/completions"
    ctx.model = ctx.route = ctx.upstream_model = "gpt-oss-20b"
    ctx.provider, ctx.deployment = "local", "local/gpt-oss-20b"
    ctx.attempts, ctx.status, ctx.upstream_secs = 1, 200, 0.2
    ctx.usage = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}
    response = {
        "id": "chatcmpl-1",
        "model": "gpt-oss-20b",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant"}}],
        "usage": ctx.usage,
    }
    headers: dict[str, str] = {}

    def request() -> None:
        with telemetry.server_span(
            "POST /v1/chat/completions",
            headers,
            {"http.request.method": "POST", "url.path": "/v1/chat/completions"},
        ) as span:
            with telemetry.span("inference.validate"):
                pass
            with telemetry.span("inference.route", {"gen_ai.request.model": "gpt-oss-20b"}) as r:
                if r is not None:
                    r.set_attribute("inference.route", "gpt-oss-20b")
            with telemetry.client_span(
                "chat gpt-oss-20b",
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.request.model": "gpt-oss-20b",
                    "gen_ai.provider.name": "local",
                    "inference.deployment": "local/gpt-oss-20b",
                    "inference.attempt": 1,
                },
            ) as client:
                carrier: dict[str, str] = {}
                telemetry.inject(carrier)
                telemetry.record_response(client, response)
            telemetry.finish_request(span, ctx, 200)

    return {"spans: one sampled chat request (4 spans)": best(request, number, repeat)}


def bench_encode(number: int, repeat: int) -> dict[str, float]:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from inference_server.telemetry import Telemetry

    telemetry = _telemetry("otlp")
    assert isinstance(telemetry, Telemetry)
    assert telemetry.provider is not None
    memory = InMemorySpanExporter()
    telemetry.provider.add_span_processor(SimpleSpanProcessor(memory))
    for _ in range(128):
        with (
            telemetry.server_span("POST /v1/chat/completions", {}, {"url.path": "/x"}),
            telemetry.client_span("chat m", {"gen_ai.request.model": "m"}),
        ):
            pass
    batch = memory.get_finished_spans()
    out: dict[str, float] = {}
    per = max(1, number // (len(batch) * 10))
    sdk = best(lambda: encode_spans(batch).SerializeToString(), per, repeat) / len(batch)
    out["encode: SDK encoder, per span"] = sdk
    try:
        from inference_server.otlp_encode import (  # type: ignore[import-not-found,unused-ignore]
            encode_spans as fast_encode,
        )
    except ImportError:
        return out
    out["encode: hand-written encoder, per span"] = best(
        lambda: fast_encode(batch), per, repeat
    ) / len(batch)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, float] = {}
    results.update(bench_metrics(args.number, args.repeat))
    results.update(bench_encode(args.number, args.repeat))
    results.update(bench_spans(args.number // 4, args.repeat))
    for name, micros in results.items():
        print(f"{name:55s} {micros:8.2f} µs")
    sys.stdout.flush()
    os._exit(0)  # the span queue holds everything; nothing is to be exported


if __name__ == "__main__":
    main()
