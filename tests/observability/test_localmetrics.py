"""The single-process metric families (localmetrics.py) against prometheus-client's own
classes: the same recording calls must render the same exposition, byte for byte."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from inference_server.localmetrics import LocalCounter, LocalGauge, LocalHistogram, go_float
from inference_server.metrics import DURATION_BUCKETS, OVERHEAD_BUCKETS, Metrics, MetricsSettings
from tests.observability.metrics_worker import CHAT, NAMES, finished

pytestmark = pytest.mark.differential

#: Lines of the process/platform/GC collectors: they read the process, not our calls.
_RUNTIME = ("process_", "python_", "# HELP process_", "# TYPE process_", "# HELP python_",
            "# TYPE python_")  # fmt: skip


def ours(metrics: Metrics) -> list[str]:
    body, _ = metrics.render()
    return [line for line in body.decode().splitlines() if not line.startswith(_RUNTIME)]


def drive(m: Metrics) -> None:
    """Every recording call the gateway makes, with values on and between bucket bounds."""
    m.know(**{**NAMES, "routes": ["gpt-oss-20b", "chat", "backup"], "experiments": ["exp"],
              "variants": ["b"]})  # fmt: skip
    for duration in (0.0, 0.001, 0.0010001, 0.2012, 5.0, 601.0, 1e-9):
        m.request_started(CHAT)
        m.request_finished(finished(), duration)
    m.request_started(CHAT)
    m.request_finished(
        finished(stream=True, first_token_secs=0.25, stream_secs=1.0, upstream_secs=0.24,
                 usage={"prompt_tokens": 5, "completion_tokens": 11}, usage_estimated=True),
        1.247,
    )  # fmt: skip
    m.request_started(CHAT)
    m.request_finished(finished(status=502, error_code="PROVIDER_ERROR", usage=None), 0.05)
    m.request_started(CHAT)
    m.request_finished(finished(experiment="exp", variant="b"), 0.3)
    m.request_started(CHAT)  # still in flight at the scrape
    m.request_finished(finished(cache="hit"), 0.0004)
    m.request_started(CHAT)
    m.attempt_finished("local", "local/gpt-oss-20b", "ok", 0.1)
    m.attempt_finished("local", "local/gpt-oss-20b", "PROVIDER_ERROR", 0.05, operation="embeddings")
    m.retry("local/gpt-oss-20b")
    m.fallback("chat", "backup")
    m.breaker_state("local/gpt-oss-20b", "closed")
    m.breaker_transition("local/gpt-oss-20b", "closed", "open")
    m.shadow_finished("exp", "ok", 0.4)
    m.cache_coalesced_request("gpt-oss-20b")
    m.cache_stored(1234)
    m.cache_size(4096, 3)
    m.cache_evicted("size")
    m.cache_error("get")


def test_the_gateways_recording_renders_the_same_through_both() -> None:
    local, library = Metrics(MetricsSettings()), Metrics(MetricsSettings(), library_values=True)
    drive(local)
    drive(library)
    assert type(local.requests).__name__ == "LocalCounter"
    assert type(library.requests).__name__ == "Counter"
    assert ours(local) == ours(library)
    assert len(ours(local)) > 300


@pytest.mark.parametrize("amount", [0.0, 1e-5, 5e-05, 0.00025, 0.1, 2.5, 10.0, 11.0, math.inf])
def test_histogram_buckets_and_bounds_match(amount: float) -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    LocalHistogram("h", "help", ("x",), registry=a, buckets=OVERHEAD_BUCKETS).labels("1").observe(
        amount
    )
    Histogram("h", "help", ("x",), registry=b, buckets=OVERHEAD_BUCKETS).labels("1").observe(amount)
    assert generate_latest(a) == generate_latest(b)


def test_unlabelled_families_counters_and_gauges_match() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    for reg, (C, G, H) in ((a, (LocalCounter, LocalGauge, LocalHistogram)),
                           (b, (Counter, Gauge, Histogram))):  # fmt: skip
        c = C("c", "a counter", registry=reg)
        c.inc()
        c.inc(2.5)
        g = G("g", "a gauge", ("k",), registry=reg)
        g.labels("x").inc(3)
        g.labels("x").dec()
        g.labels("y").set(7)
        H("d", "durations", registry=reg, buckets=DURATION_BUCKETS).observe(0.7)
    assert generate_latest(a) == generate_latest(b)


def test_a_counter_refuses_to_go_down_like_the_librarys() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        LocalCounter("c", "h", registry=None).inc(-1)
    with pytest.raises(ValueError, match="non-negative"):
        Counter("c", "h", registry=None).inc(-1)


def test_bounds_are_written_as_go_writes_them() -> None:
    from prometheus_client.utils import floatToGoString

    for bound in (*DURATION_BUCKETS, *OVERHEAD_BUCKETS, 1e-9, 1e21, 123456789.0, math.inf):
        assert go_float(bound) == floatToGoString(bound)  # type: ignore[no-untyped-call]
