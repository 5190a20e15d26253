"""Metrics recorder on its own: what a finished request records, bounded labels, multiprocess
merging, never raising, and an exposition promtool accepts."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inference_server.context import RequestContext
from inference_server.metrics import (
    MULTIPROC_ENV,
    OTHER,
    Metrics,
    MetricsSettings,
    prepare_multiprocess,
    worker_exit,
)
from tests.observability.conftest import check_metrics, series, value

CHAT = "/v1/chat/completions"


def finished(**fields: Any) -> RequestContext:
    """A context as the pipeline leaves it after a successful routed request."""
    ctx = RequestContext(request_id="r1")
    defaults: dict[str, Any] = {
        "endpoint": CHAT,
        "model": "gpt-oss-20b",
        "route": "gpt-oss-20b",
        "provider": "local",
        "deployment": "local/gpt-oss-20b",
        "upstream_model": "gpt-oss-20b",
        "attempts": 1,
        "status": 200,
        "upstream_secs": 0.2,
        "queue_secs": 0.0005,
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    }
    for key, val in {**defaults, **fields}.items():
        setattr(ctx, key, val)
    return ctx


def record(metrics: Metrics, ctx: RequestContext, duration: float) -> None:
    metrics.request_started(ctx.endpoint)
    metrics.request_finished(ctx, duration)


def text(metrics: Metrics) -> str:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return body.decode()


def test_a_json_request_records_count_duration_overhead_and_tokens() -> None:
    m = Metrics(MetricsSettings())
    m.request_started(CHAT)
    assert value(text(m), "inference_requests_in_flight", endpoint=CHAT) == 1
    m.request_finished(finished(), 0.2012)
    out = text(m)
    labels = {
        "endpoint": CHAT,
        "model": "gpt-oss-20b",
        "route": "gpt-oss-20b",
        "provider": "local",
        "deployment": "local/gpt-oss-20b",
        "status_class": "2xx",
        "error_code": "",
    }
    assert value(out, "inference_requests_total", **labels) == 1
    assert value(out, "inference_requests_in_flight", endpoint=CHAT) == 0
    assert value(out, "inference_request_duration_seconds_count", stream="false") == 1
    assert value(out, "inference_request_duration_seconds_sum") == 0.2012
    # 1.2 ms of overhead lands in the ≤ 2.5 ms bucket, not in the ≤ 1 ms one.
    assert value(out, "inference_gateway_overhead_seconds_bucket", le="0.001") == 0
    assert value(out, "inference_gateway_overhead_seconds_bucket", le="0.0025") == 1
    assert value(out, "inference_tokens_total", token_type="input") == 12
    assert value(out, "inference_tokens_total", token_type="output") == 7
    assert value(out, "gen_ai_client_token_usage_sum", token_type="output") == 7
    # JSON requests export no stream histograms at all.
    assert series(out, "gen_ai_server_time_to_first_token_seconds_count") == []


def test_a_stream_records_ttft_and_time_per_output_token() -> None:
    m = Metrics(MetricsSettings())
    ctx = finished(
        stream=True,
        first_token_secs=0.25,
        stream_secs=1.0,
        upstream_secs=0.24,
        usage={"prompt_tokens": 5, "completion_tokens": 11, "total_tokens": 16},
        usage_estimated=True,
    )
    record(m, ctx, 1.247)
    out = text(m)
    assert value(out, "gen_ai_server_time_to_first_token_seconds_sum") == 0.25
    # (1.0 s after the first token) / (11 - 1 tokens) = 0.1 s per token
    assert abs(value(out, "gen_ai_server_time_per_output_token_seconds_sum") - 0.1) < 1e-9
    assert value(out, "inference_usage_estimated_total", model="gpt-oss-20b") == 1
    # overhead = 1.247 - 0.24 upstream - 1.0 relaying = 7 ms
    assert value(out, "inference_gateway_overhead_seconds_bucket", le="0.005") == 0
    assert value(out, "inference_gateway_overhead_seconds_bucket", le="0.01") == 1


def test_errors_before_routing_do_not_label_the_clients_model() -> None:
    m = Metrics(MetricsSettings())
    for i in range(5):
        ctx = finished(
            model=f"junk-{i}",
            route=None,
            deployment=None,
            provider=None,
            attempts=0,
            status=404,
            error_code="MODEL_NOT_FOUND",
            usage=None,
        )
        record(m, ctx, 0.001)
    out = text(m)
    assert value(out, "inference_requests_total", model="", error_code="MODEL_NOT_FOUND") == 5
    assert {s["model"] for s in series(out, "inference_requests_total")} == {""}
    # No upstream attempt: no overhead observation (it would be all overhead, and misleading).
    assert value(out, "inference_gateway_overhead_seconds_count") == 0


def test_label_values_are_capped_per_kind() -> None:
    m = Metrics(MetricsSettings(max_label_values=3))
    for i in range(10):
        record(m, finished(model=f"m{i}", route=f"m{i}"), 0.1)
    models = {s["model"] for s in series(text(m), "inference_requests_total")}
    assert models == {"m0", "m1", "m2", OTHER}
    assert value(text(m), "inference_requests_total", model=OTHER) == 7


def test_attempts_retries_fallbacks_breakers_variants_and_shadows() -> None:
    m = Metrics(MetricsSettings())
    m.attempt_finished("local", "local/a", "PROVIDER_ERROR", 0.05)
    m.attempt_finished("local", "local/a", "ok", 0.5)
    m.retry("local/a")
    m.fallback("chat", "backup")
    m.breaker_state("local/a", "closed")
    m.breaker_transition("local/a", "closed", "open")
    record(m, finished(experiment="exp", variant="b"), 0.3)
    m.shadow_finished("exp", "ok", 0.4)
    out = text(m)
    assert value(out, "gen_ai_client_operation_duration_seconds_count", outcome="ok") == 1
    assert (
        value(out, "gen_ai_client_operation_duration_seconds_count", outcome="PROVIDER_ERROR") == 1
    )
    assert value(out, "inference_upstream_retries_total", deployment="local/a") == 1
    assert value(out, "inference_fallbacks_total", from_route="chat", to_route="backup") == 1
    assert value(out, "inference_circuit_breaker_state", deployment="local/a", state="open") == 1
    assert value(out, "inference_circuit_breaker_state", deployment="local/a", state="closed") == 0
    assert (
        value(
            out, "inference_circuit_breaker_transitions_total", from_state="closed", to_state="open"
        )
        == 1
    )
    assert value(out, "inference_experiment_requests_total", variant="b", status_class="2xx") == 1
    assert value(out, "inference_experiment_tokens_total", variant="b", token_type="output") == 7
    assert value(out, "inference_shadow_requests_total", experiment="exp", outcome="ok") == 1


def test_recording_never_raises_into_the_request() -> None:
    m = Metrics(MetricsSettings())
    broken = finished(usage={"prompt_tokens": "many"}, status=999)
    broken.upstream_secs = None  # type: ignore[assignment]
    m.request_started(CHAT)
    m.request_finished(broken, 0.1)  # logged, not raised
    m.request_finished(object(), 0.1)  # type: ignore[arg-type]
    m.attempt_finished("p", "d", "ok", "slow")  # type: ignore[arg-type]
    assert "inference_requests_total" in text(m)


def test_disabled_records_nothing() -> None:
    m = Metrics(MetricsSettings(enabled=False))
    record(m, finished(), 0.1)
    m.retry("x")
    assert m.render()[0] == b""


def test_exposition_passes_promtool(promtool: str) -> None:
    m = Metrics(MetricsSettings())
    record(m, finished(), 0.2)
    record(m, finished(stream=True, first_token_secs=0.1, stream_secs=0.5), 0.6)
    record(m, finished(status=502, error_code="PROVIDER_ERROR", usage=None), 0.05)
    m.attempt_finished("local", "local/gpt-oss-20b", "ok", 0.1)
    m.retry("local/gpt-oss-20b")
    m.fallback("a", "b")
    m.breaker_transition("local/gpt-oss-20b", "closed", "open")
    record(m, finished(experiment="e", variant="v"), 0.2)
    m.shadow_finished("e", "ok", 0.1)
    check_metrics(promtool, text(m))


# --- multiprocess ------------------------------------------------------------------------------


def _worker(directory: str, requests: int, conn: Any) -> None:
    """A forked 'worker': its own Metrics on the shared directory, like cli.py's workers."""
    m = Metrics(MetricsSettings(multiprocess_dir=directory))
    m.request_started(CHAT)  # one still in flight when it exits: must vanish with it
    for _ in range(requests):
        record(m, finished(), 0.1)
    m.breaker_state("local/gpt-oss-20b", "open")
    conn.send(os.getpid())
    conn.close()
    worker_exit()


@pytest.fixture
def clean_multiproc_env() -> Iterator[None]:
    """prepare_multiprocess sets the variable for the process: restore it afterwards."""
    saved = os.environ.pop(MULTIPROC_ENV, None)
    yield
    os.environ.pop(MULTIPROC_ENV, None)
    if saved is not None:
        os.environ[MULTIPROC_ENV] = saved


@pytest.mark.usefixtures("clean_multiproc_env")
def test_workers_merge_into_one_view(tmp_path: Path) -> None:
    directory = tmp_path / "mp"
    directory.mkdir()
    (directory / "counter_999999.db").write_bytes(b"stale from an earlier run")
    cleanup = prepare_multiprocess(MetricsSettings(multiprocess_dir=str(directory)), workers=2)
    assert os.environ[MULTIPROC_ENV] == str(directory)
    assert not (directory / "counter_999999.db").exists()
    ctx = multiprocessing.get_context("fork")
    pids = []
    for requests in (3, 4):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(str(directory), requests, child))
        proc.start()
        pids.append(parent.recv())
        proc.join(timeout=30)
        assert proc.exitcode == 0
    # Any process reading the directory sees both workers' counts.
    reader = Metrics(MetricsSettings(multiprocess_dir=str(directory)))
    out = text(reader)
    assert value(out, "inference_requests_total", endpoint=CHAT) == 7
    assert value(out, "inference_request_duration_seconds_count") == 7
    assert value(out, "inference_tokens_total", token_type="output") == 7 * 7
    # Live gauges of exited workers are gone (in-flight would otherwise stay at 2 forever).
    assert value(out, "inference_requests_in_flight") == 0
    assert value(out, "inference_circuit_breaker_state", state="open") == 0
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith("counter_")) == sorted(
        f"counter_{pid}.db" for pid in pids
    )
    cleanup()
    assert directory.exists()  # configured by the user: not ours to delete


def test_multiprocess_live_gauges_sum_over_workers(tmp_path: Path, promtool: str) -> None:
    m = Metrics(MetricsSettings(multiprocess_dir=str(tmp_path)))
    m.request_started(CHAT)
    m.request_started(CHAT)
    m.breaker_state("local/a", "half_open")
    out = text(m)
    assert value(out, "inference_requests_in_flight", endpoint=CHAT) == 2
    assert value(out, "inference_circuit_breaker_state", state="half_open") == 1
    record(m, finished(stream=True, first_token_secs=0.1, stream_secs=0.5), 0.6)
    check_metrics(promtool, text(m))


@pytest.mark.usefixtures("clean_multiproc_env")
def test_single_worker_needs_no_directory() -> None:
    cleanup = prepare_multiprocess(MetricsSettings(), workers=1)
    assert MULTIPROC_ENV not in os.environ
    cleanup()
    cleanup = prepare_multiprocess(MetricsSettings(), workers=2)
    directory = os.environ[MULTIPROC_ENV]
    assert os.path.isdir(directory)
    cleanup()
    assert not os.path.exists(directory)  # a temporary directory we made: removed


@pytest.mark.parametrize("mode", ["memory", "multiprocess"])
def test_direct_writes_equal_the_librarys(mode: str, tmp_path: Path) -> None:
    """The hot path writes values directly (metrics._Writer); the exposition must be what the
    library's own inc/dec/set/observe would give for the same calls."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from inference_server import metrics as m

    amounts = [0.0, 0.00004, 0.001, 0.0010001, 0.3, 7.0, 599.0, 601.0, 10**9]
    reference = CollectorRegistry()
    counter = Counter("c", "c", ("a",), registry=reference).labels("x")
    gauge = Gauge("g", "g", ("a",), multiprocess_mode="livesum", registry=reference).labels("x")
    hist = Histogram("h", "h", ("a",), buckets=m.DURATION_BUCKETS, registry=reference).labels("x")
    for amount in amounts:
        counter.inc(amount)
        gauge.inc(amount)
        hist.observe(amount)
    gauge.dec(2)
    gauge.set(3)
    gauge.inc(0.5)
    expected = generate_latest(reference)

    value_class: Any = m._LoopValue
    if mode == "multiprocess":
        value_class = m._multiprocess_value_class(str(tmp_path))
    ours = CollectorRegistry()
    with m._value_class(value_class):
        writers = (
            m._Writer(Counter("c", "c", ("a",), registry=ours).labels("x")),
            m._Writer(
                Gauge("g", "g", ("a",), multiprocess_mode="livesum", registry=ours).labels("x")
            ),
            m._Writer(
                Histogram("h", "h", ("a",), buckets=m.DURATION_BUCKETS, registry=ours).labels("x")
            ),
        )
    c, g, h = writers
    for amount in amounts:
        c.inc(amount)
        g.inc(amount)
        h.observe(amount)
    g.dec(2)
    g.set(3)
    g.inc(0.5)
    if mode == "memory":
        assert generate_latest(ours) == expected
    else:
        from prometheus_client.multiprocess import MultiProcessCollector

        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=str(tmp_path))  # type: ignore[no-untyped-call]
        got = {
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for f in merged.collect()
            for s in f.samples
        }
        want = {
            (s.name, tuple(sorted(s.labels.items())), s.value)
            for f in reference.collect()
            for s in f.samples
            if not s.name.endswith("_created")
        }
        assert got == want
