"""Metrics recorder on its own: what a finished request records, bounded labels (known names
only, known error codes only), multiprocess merging, never raising, and an exposition promtool
accepts."""

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
    render_directory,
)
from tests.observability import metrics_worker
from tests.observability.conftest import check_metrics, series, value
from tests.observability.metrics_worker import CHAT, NAMES, finished


def Known(settings: MetricsSettings | None = None, **names: list[str]) -> Metrics:
    """A recorder that knows the names ``finished()`` uses, as create_app declares them."""
    m = Metrics(settings or MetricsSettings())
    m.know(**{**NAMES, **names})
    return m


def record(metrics: Metrics, ctx: RequestContext, duration: float) -> None:
    metrics.request_started(ctx.endpoint)
    metrics.request_finished(ctx, duration)


def text(metrics: Metrics) -> str:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return body.decode()


def test_a_json_request_records_count_duration_overhead_and_tokens() -> None:
    m = Known()
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
    m = Known()
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
    m = Known()
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


def test_only_known_names_become_label_values() -> None:
    """Issue 11 (4): a name becomes a label value only when configuration declares it or the
    provider listed it (at most ``max_label_values`` of those); the rest count as "other"."""
    m = Known(MetricsSettings(max_label_values=3), routes=["*"])
    m.listed_models(f"listed-{i}" for i in range(10))  # only the first 3 are taken
    for model in ["gpt-oss-20b", "listed-0", "listed-2", "listed-3", "junk", "x" * 500]:
        record(m, finished(model=model, route="*"), 0.1)
    record(m, finished(route="unknown-route", deployment="p/unknown", provider="p"), 0.1)
    out = text(m)
    models = {s["model"] for s in series(out, "inference_requests_total")}
    assert models == {"gpt-oss-20b", "listed-0", "listed-2", OTHER}
    assert value(out, "inference_requests_total", model=OTHER) == 3
    odd = {"route": OTHER, "deployment": OTHER, "provider": OTHER}
    assert value(out, "inference_requests_total", **odd) == 1
    # A new list replaces the old one.
    m.listed_models(["listed-3"])
    record(m, finished(model="listed-0", route="*"), 0.1)
    record(m, finished(model="listed-3", route="*"), 0.1)
    out = text(m)
    assert value(out, "inference_requests_total", model="listed-3") == 1
    assert value(out, "inference_requests_total", model=OTHER) == 4


def test_tables_stay_small_under_a_spray_of_huge_names() -> None:
    """300 distinct 100 KB names (model, route, deployment, experiment, variant, error code,
    breaker state): no table grows and no stored string is longer than a label."""
    m = Known(routes=["*"])
    for i in range(300):
        huge = f"{i}-" + "m" * 100_000
        record(
            m,
            finished(
                model=huge,
                route=huge if i % 2 else "*",
                deployment=huge,
                experiment=huge,
                variant=huge,
                error_code=huge,
                status=400,
            ),
            0.1,
        )
        m.attempt_finished(huge, huge, huge, 0.1)
        m.retry(huge)
        m.fallback(huge, huge)
        m.breaker_transition(huge, huge, huge)
        m.shadow_finished(huge, huge, 0.1)
    tables: list[Any] = [m._bundles, m._children, m._variants, m._names, m._listed]
    assert len(m._bundles) <= 4
    assert len(m._children) <= 40

    def strings(obj: Any) -> Any:
        if isinstance(obj, str):
            yield obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from strings(k)
                yield from strings(v)
        elif isinstance(obj, tuple | list):
            for v in obj:
                yield from strings(v)

    assert max(len(s) for t in tables for s in strings(t)) <= 100
    body = m.render()[0]
    assert len(body) < 60_000
    assert b"mmmmmmmmmm" not in body


def test_error_codes_come_from_a_known_set() -> None:
    """Issue 11 (5): upstream codes are labels only when known (ignoring case, emitted as the
    known set writes them); the gateway's own codes, from errors.py's classes, always are."""
    m = Known()
    for code in ["rate_limit_exceeded", "Context_Length_Exceeded", "CIRCUIT_OPEN",
                 "PROVIDER_TIMEOUT", "made_up_code", "c" * 10_000, "ok"]:  # fmt: skip
        m.attempt_finished("local", "local/a", code, 0.1)
    out = text(m)
    name = "gen_ai_client_operation_duration_seconds_count"
    outcomes = {s["outcome"]: value(out, name, outcome=s["outcome"]) for s in series(out, name)}
    assert outcomes == {
        "RATE_LIMIT_EXCEEDED": 1,
        "CONTEXT_LENGTH_EXCEEDED": 1,
        "CIRCUIT_OPEN": 1,
        "PROVIDER_TIMEOUT": 1,
        OTHER: 2,
        "ok": 1,
    }


def test_attempts_retries_fallbacks_breakers_variants_and_shadows() -> None:
    m = Known(routes=["gpt-oss-20b", "chat", "backup"], experiments=["exp"], variants=["b"])
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
    m = Known()
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
    m = Known(routes=["gpt-oss-20b", "a", "b"], experiments=["e"], variants=["v"])
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


@pytest.fixture
def clean_multiproc_env() -> Iterator[None]:
    """prepare_multiprocess sets the variable for the process: restore it afterwards."""
    saved = os.environ.pop(MULTIPROC_ENV, None)
    yield
    os.environ.pop(MULTIPROC_ENV, None)
    if saved is not None:
        os.environ[MULTIPROC_ENV] = saved


def spawn(target: Any, *args: Any) -> Any:
    """Run ``target(*args, conn)`` in a new interpreter (see metrics_worker); its message."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child))
    proc.start()
    assert parent.poll(60), "the spawned worker sent nothing"
    message = parent.recv()
    proc.join(timeout=30)
    assert proc.exitcode == 0
    return message


@pytest.mark.usefixtures("clean_multiproc_env")
def test_workers_merge_into_one_view(tmp_path: Path) -> None:
    directory = tmp_path / "mp"
    directory.mkdir()
    (directory / "counter_999999.db").write_bytes(b"stale from an earlier run")
    cleanup = prepare_multiprocess(MetricsSettings(multiprocess_dir=str(directory)), workers=2)
    assert os.environ[MULTIPROC_ENV] == str(directory)
    assert not (directory / "counter_999999.db").exists()
    pids = [spawn(metrics_worker.worker, str(directory), n) for n in (3, 4)]
    # Any process reading the directory sees both workers' counts.
    out = render_directory(str(directory)).decode()
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


@pytest.mark.usefixtures("clean_multiproc_env")
def test_multiprocess_live_gauges_sum_over_workers(tmp_path: Path, promtool: str) -> None:
    os.environ[MULTIPROC_ENV] = str(tmp_path)
    before, after = spawn(metrics_worker.live, str(tmp_path))
    assert value(before, "inference_requests_in_flight", endpoint=CHAT) == 2
    assert value(before, "inference_circuit_breaker_state", state="half_open") == 1
    assert value(after, "gen_ai_server_time_to_first_token_seconds_count") == 1
    check_metrics(promtool, after)


@pytest.mark.usefixtures("clean_multiproc_env")
def test_a_process_that_cannot_write_the_directory_refuses_to_start(tmp_path: Path) -> None:
    """This test process imported prometheus-client without the variable (in-memory values):
    a multiprocess recorder here would lose every count, so it says so instead."""
    with pytest.raises(RuntimeError, match="imported before PROMETHEUS_MULTIPROC_DIR"):
        Metrics(MetricsSettings(multiprocess_dir=str(tmp_path)))


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


def test_a_websocket_upgrade_counts_once_without_a_duration() -> None:
    """A 101 lasts as long as its socket: counted as a request, kept out of the duration and
    overhead histograms (each request on the socket is recorded on its own)."""
    m = Known()
    record(m, finished(status=101, endpoint=CHAT, attempts=0, usage=None), 3600.0)
    record(m, finished(), 0.2)
    out = text(m)
    assert value(out, "inference_requests_total", status_class="1xx") == 1
    assert value(out, "inference_request_duration_seconds_count", status_class="2xx") == 1
    durations = series(out, "inference_request_duration_seconds_count")
    assert [d["status_class"] for d in durations] == ["2xx"]
    assert value(out, "inference_requests_in_flight", endpoint=CHAT) == 0
