"""Prometheus metrics: what the gateway did, per route, model, deployment and outcome.

Design choices, and why:

* **One record per request.** The pipeline fills :class:`~inference_server.context.RequestContext`
  and calls :meth:`Metrics.request_finished` once; everything about the request (count, duration,
  overhead, TTFT, time per output token, tokens, A/B variant) is derived from that record here, so
  the request path has a single metrics call site and the numbers cannot disagree.
* **Cheap on the hot path.** ``labels()`` costs ~1.5 µs (tuple building, validation, a lock), so
  the label children a request needs are resolved once per distinct label combination and kept in
  a small "bundle" (one dict lookup per request); observations then go straight to the children.
  Series that only some requests need (TTFT, tokens) are created on first use, so a JSON-only
  deployment does not export empty stream histograms.
* **Bounded labels.** Label values come from configuration (routes, deployments, experiments)
  or from a closed set (status class, error code), never from user ids or raw paths.  The one
  value a client chooses, ``model``, is only used once routing accepted it, and every label kind
  is capped at ``max_label_values`` distinct values per process (then ``"other"``), so a client
  spraying model names cannot grow the series count.
* **Multiprocess.** With ``--workers N`` each worker writes its values to mmap'd files in one
  directory (prometheus-client's multiprocess mode) and any worker's ``/metrics`` merges them, so a
  scrape sees the whole server whichever worker answers.  The parent prepares the directory
  before forking (:func:`prepare_multiprocess`), each worker's live gauges are dropped when it
  exits (:func:`worker_exit`).  A single process keeps values in memory (about half the cost).
* **Never raises.** A metrics bug must not fail a request: every public method catches and logs
  (rate-limited) instead.

Names follow Prometheus conventions (base units, ``_total`` counters, ``_seconds``) and use the
OpenTelemetry GenAI metric names, translated to Prometheus (dots → ``_``, unit suffix), where the
spec defines one: ``gen_ai_server_time_to_first_token_seconds``,
``gen_ai_server_time_per_output_token_seconds``, ``gen_ai_client_operation_duration_seconds``
and ``gen_ai_client_token_usage``.  docs/observability.md lists every metric.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from loguru import logger
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from inference_server import __version__

if TYPE_CHECKING:
    from inference_server.context import RequestContext

#: The classic text format (what ``generate_latest`` writes with legacy metric names); newer
#: prometheus-client labels it ``version=1.0.0``, which Prometheus 2.x servers do not know.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: The environment variable prometheus-client reads in every process to find its files.
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

#: Whole requests and upstream calls: a cache hit or a fast error (1 ms) up to a ten-minute
#: generation.  Roughly ×2–2.5 per step keeps quantile error under ~25% with 21 buckets.
DURATION_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0,
)  # fmt: skip
#: Gateway overhead (request time minus upstream time): tens of µs when healthy, seconds only
#: when retries back off, so the resolution is at the bottom.
OVERHEAD_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Time to first token: OTel's advisory buckets extended to slow cold starts (JIT model loads).
TTFT_BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
#: Time per output token: OTel's advisory buckets plus the sub-10 ms decode of fast local models.
TPOT_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
#: Tokens per request (OTel's advisory ×4 buckets, cut at 4M).
TOKEN_BUCKETS: Final = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)

BREAKER_STATES: Final = ("closed", "open", "half_open")
#: A label value for "no such thing" (no route resolved, no error): Prometheus treats an empty
#: label as an absent one, so ``error_code=""`` selects successes.
NONE: Final = ""
#: What a label value becomes once its kind has ``max_label_values`` distinct values.
OTHER: Final = "other"
_MAX_LABEL_CHARS: Final = 100
_MAX_BUNDLES: Final = 10_000
_STATUS_CLASS: Final = ("unknown", "1xx", "2xx", "3xx", "4xx", "5xx")


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """``metrics.*`` settings (built by settings.py)."""

    #: Record and serve ``GET /metrics``.
    enabled: bool = True
    #: Where workers write their mmap'd values. ``None``: a fresh temporary directory when
    #: ``--workers`` > 1 (made by :func:`prepare_multiprocess`), in-memory values otherwise.
    multiprocess_dir: str | None = None
    #: Distinct values per label kind (model, route, deployment, …) before ``"other"``.
    max_label_values: int = 200


# --- multiprocess lifecycle (called by cli.py) -------------------------------------------------


def prepare_multiprocess(settings: MetricsSettings, workers: int) -> Callable[[], None]:
    """In the parent, before forking workers: give them one clean directory for their values.

    Sets ``PROMETHEUS_MULTIPROC_DIR`` (inherited by the forked workers, where :class:`Metrics`
    switches to multiprocess mode when it sees it) and removes ``*.db`` files left by an earlier
    run, which would otherwise be summed into this run's counters.  Returns the cleanup to call in
    the parent after every worker exited (it removes the directory only if it made it).  A no-op
    for a single worker without a configured directory, or with metrics disabled.
    """
    if not settings.enabled:
        return _noop
    path = settings.multiprocess_dir or os.environ.get(MULTIPROC_ENV)
    created = False
    if not path:
        if workers <= 1:
            return _noop
        path = tempfile.mkdtemp(prefix="inference-server-metrics-")
        created = True
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)
    os.environ[MULTIPROC_ENV] = path

    def cleanup() -> None:
        if created:
            shutil.rmtree(path, ignore_errors=True)

    return cleanup


def worker_exit(pid: int | None = None) -> None:
    """When a worker exits (in the worker, or in the parent after ``join`` with its pid).

    Drops the worker's live gauges (in-flight, breaker state) from the merged view; its
    counters and histograms stay, as they must for ``rate()``.  Safe to call twice, and a
    no-op outside multiprocess mode.
    """
    path = os.environ.get(MULTIPROC_ENV)
    if path and os.path.isdir(path):
        with contextlib.suppress(OSError):
            mark_process_dead(os.getpid() if pid is None else pid, path)  # type: ignore[no-untyped-call]


def _noop() -> None:
    return None


@functools.cache
def _multiprocess_value_class(directory: str) -> type:
    """This process's mmap-backed value class for ``directory`` (files are named by pid, so
    there must be one writer per process and directory: a second would map the same file and
    overwrite its entries).

    prometheus-client's own ``MmapedValue`` takes a lock and calls ``os.getpid()`` (a syscall)
    on every increment so that it survives a fork; together that is ~0.6 of its ~1 µs.  Here
    values are only ever created after the fork (``create_app`` runs in each worker) and touched
    from the event loop's thread, so this class writes the same files in the same format through
    the same ``MmapedDict`` without either (~0.35 µs), and ``MultiProcessCollector`` reads them
    as usual.  A fork clears this cache, so a child process gets its own class and files.
    """
    pid = os.getpid()
    files: dict[str, Any] = {}  # MmapedDict is untyped

    class MmapedValue:
        _multiprocess = True
        __slots__ = ("_file", "_key", "_value")

        def __init__(
            self,
            typ: str,
            metric_name: str,
            name: str,
            labelnames: Sequence[str],
            labelvalues: Sequence[str],
            help_text: str,
            multiprocess_mode: str = "",
            **_kwargs: Any,
        ) -> None:
            prefix = f"{typ}_{multiprocess_mode}" if typ == "gauge" else typ
            file: Any = files.get(prefix)
            if file is None:
                path = os.path.join(directory, f"{prefix}_{pid}.db")
                file = files[prefix] = MmapedDict(path)  # type: ignore[no-untyped-call]
            self._file = file
            self._key = mmap_key(metric_name, name, list(labelnames), list(labelvalues), help_text)
            self._value: float = file.read_value(self._key)[0]

        def inc(self, amount: float) -> None:
            self._value += amount
            self._file.write_value(self._key, self._value, 0.0)

        def set(self, value: float, timestamp: float | None = None) -> None:
            self._value = value
            self._file.write_value(self._key, value, timestamp or 0.0)

        def set_exemplar(self, _exemplar: Any) -> None:
            return None  # prometheus-client has no exemplars in multiprocess mode either

        def get(self) -> float:
            return self._value

        def get_exemplar(self) -> None:
            return None

    return MmapedValue


os.register_at_fork(after_in_child=_multiprocess_value_class.cache_clear)


@contextlib.contextmanager
def _value_class(cls: Any) -> Iterator[None]:
    """Make prometheus-client build values of ``cls`` for the duration of the block.

    The library picks in-memory or mmap'd values from a module global chosen at import time; this
    lets each :class:`Metrics` choose its own mode (tests build both in one process).  Children are
    only created on a cache miss, on the event loop's thread, so the swap is never observed.
    """
    saved = values.ValueClass
    values.ValueClass = cls
    try:
        yield
    finally:
        values.ValueClass = saved


# --- the recorder ------------------------------------------------------------------------------


class _LoopValue:
    """prometheus-client's in-memory ``MutexValue`` without the mutex.

    Every write and every read (``render``) happens on the event loop's thread, so the lock
    protects nothing here and costs ~0.2 µs per write, a dozen times per request.
    """

    _multiprocess = False
    __slots__ = ("_exemplar", "_value")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._value = 0.0
        self._exemplar: Any = None

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def set_exemplar(self, exemplar: Any) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> Any:
        return self._exemplar


class _Writer:
    """The writes the gateway makes on one metric child, straight to its values.

    The library's ``inc``/``observe`` re-check observability and exemplars and walk histogram
    bounds in Python on every call (~1.5 µs); the gateway's children are always concrete and
    never take exemplars, so this goes to the values (a bisect for the bucket) and writes the
    same numbers.  Histograms keep their buckets non-cumulative, as the library does.
    """

    __slots__ = ("_bounds", "_buckets", "_sum", "_value")

    def __init__(self, child: Any) -> None:
        if isinstance(child, Histogram):
            self._sum = child._sum
            self._bounds: list[float] = child._upper_bounds
            self._buckets: list[Any] = child._buckets
        else:
            self._value = child._value

    def inc(self, amount: float = 1.0) -> None:
        self._value.inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._value.inc(-amount)

    def set(self, value: float) -> None:
        self._value.set(float(value))

    def observe(self, amount: float) -> None:
        self._sum.inc(amount)
        self._buckets[bisect.bisect_left(self._bounds, amount)].inc(1)


class _Bundle:
    """The label children one kind of request uses, resolved once (see the module docstring)."""

    __slots__ = (
        "duration",
        "inflight",
        "input_hist",
        "input_tokens",
        "labels",
        "output_hist",
        "output_tokens",
        "overhead",
        "requests",
        "tpot",
        "ttft",
    )

    def __init__(self, labels: tuple[str, ...]) -> None:
        #: (endpoint, model, route, provider, deployment, stream, status_class, error_code)
        self.labels = labels
        self.requests: Any = None
        self.duration: Any = None
        self.inflight: Any = None
        self.overhead: Any = None
        self.ttft: Any = None
        self.tpot: Any = None
        self.input_tokens: Any = None
        self.output_tokens: Any = None
        self.input_hist: Any = None
        self.output_hist: Any = None


class Metrics:
    """The gateway's metrics; one per app (i.e. per worker process)."""

    def __init__(self, settings: MetricsSettings) -> None:
        self.enabled = settings.enabled
        self._max_values = settings.max_label_values
        self._errors = 0
        path = settings.multiprocess_dir or os.environ.get(MULTIPROC_ENV) or None
        #: The multiprocess directory, or None for in-memory values.
        self.multiprocess_dir = os.path.abspath(path) if path and self.enabled else None
        if self.multiprocess_dir:
            os.makedirs(self.multiprocess_dir, exist_ok=True)
            self._values_cls: Any = _multiprocess_value_class(self.multiprocess_dir)
            registry: CollectorRegistry | None = None  # rendering reads the files instead
        else:
            self._values_cls = _LoopValue
            registry = CollectorRegistry(auto_describe=True)
            if self.enabled:
                # ``*_created`` series would double the exposition for no dashboard use.
                disable_created_metrics()  # type: ignore[no-untyped-call]
                from prometheus_client import gc_collector, platform_collector, process_collector

                process_collector.ProcessCollector(registry=registry)
                platform_collector.PlatformCollector(registry=registry)
                gc_collector.GCCollector(registry=registry)
        self._registry = registry
        self._bundles: dict[tuple[Any, ...], _Bundle] = {}
        self._children: dict[tuple[Any, ...], Any] = {}
        self._inflight_by_endpoint: dict[str, Any] = {}
        self._variants: dict[tuple[Any, ...], tuple[Any, Any, Any, Any]] = {}
        self._seen: dict[str, dict[str, str]] = {}

        r = registry
        with _value_class(self._values_cls):
            self.requests = Counter(
                "inference_requests",
                "Requests answered, by endpoint, model, route, provider, deployment, "
                "status class and error code.",
                ("endpoint", "model", "route", "provider", "deployment", "status_class",
                 "error_code"),
                registry=r,
            )  # fmt: skip
            self.request_duration = Histogram(
                "inference_request_duration_seconds",
                "Time from request arrival to the last byte of the response (streams included).",
                ("endpoint", "model", "stream", "status_class"),
                buckets=DURATION_BUCKETS,
                registry=r,
            )
            self.in_flight = Gauge(
                "inference_requests_in_flight",
                "Requests being handled now.",
                ("endpoint",),
                multiprocess_mode="livesum",
                registry=r,
            )
            self.overhead = Histogram(
                "inference_gateway_overhead_seconds",
                "Request time not spent waiting on an upstream (or, for streams, relaying it): "
                "validation, routing, serialisation, retry backoff.",
                ("endpoint", "stream"),
                buckets=OVERHEAD_BUCKETS,
                registry=r,
            )
            self.ttft = Histogram(
                "gen_ai_server_time_to_first_token_seconds",
                "Streams: time from request arrival to the first chunk sent to the client.",
                ("model", "deployment"),
                buckets=TTFT_BUCKETS,
                registry=r,
            )
            self.tpot = Histogram(
                "gen_ai_server_time_per_output_token_seconds",
                "Streams: time per output token after the first "
                "((end - first token) / (output tokens - 1)).",
                ("model", "deployment"),
                buckets=TPOT_BUCKETS,
                registry=r,
            )
            self.tokens = Counter(
                "inference_tokens",
                "Tokens of answered requests (token_type input = prompt, output = completion).",
                ("model", "deployment", "token_type"),
                registry=r,
            )
            self.token_usage = Histogram(
                "gen_ai_client_token_usage",
                "Tokens per request (token_type input or output).",
                ("model", "token_type"),
                buckets=TOKEN_BUCKETS,
                registry=r,
            )
            self.usage_estimated = Counter(
                "inference_usage_estimated",
                "Requests whose token usage the gateway estimated (the upstream reported none).",
                ("model", "deployment"),
                registry=r,
            )
            self.upstream_duration = Histogram(
                "gen_ai_client_operation_duration_seconds",
                "Each upstream attempt, by outcome (ok or the error code); for a stream, until "
                "its first chunk.",
                ("provider", "deployment", "outcome"),
                buckets=DURATION_BUCKETS,
                registry=r,
            )
            self.retries = Counter(
                "inference_upstream_retries",
                "Attempts repeated on the same deployment.",
                ("deployment",),
                registry=r,
            )
            self.fallbacks = Counter(
                "inference_fallbacks",
                "Moves from one route to another after a failure.",
                ("from_route", "to_route"),
                registry=r,
            )
            self.breaker_states = Gauge(
                "inference_circuit_breaker_state",
                "Worker processes whose breaker for the deployment is in this state "
                "(0 or 1 with a single worker).",
                ("deployment", "state"),
                multiprocess_mode="livesum",
                registry=r,
            )
            self.breaker_transitions = Counter(
                "inference_circuit_breaker_transitions",
                "Circuit breaker state changes.",
                ("deployment", "from_state", "to_state"),
                registry=r,
            )
            self.variant_requests = Counter(
                "inference_experiment_requests",
                "Requests assigned to an A/B experiment variant, by status class.",
                ("experiment", "variant", "status_class"),
                registry=r,
            )
            self.variant_duration = Histogram(
                "inference_experiment_request_duration_seconds",
                "Duration of requests assigned to an A/B experiment variant.",
                ("experiment", "variant"),
                buckets=DURATION_BUCKETS,
                registry=r,
            )
            self.variant_tokens = Counter(
                "inference_experiment_tokens",
                "Tokens of requests assigned to an A/B experiment variant.",
                ("experiment", "variant", "token_type"),
                registry=r,
            )
            self.shadow_requests = Counter(
                "inference_shadow_requests",
                "Shadow (mirrored) requests, by outcome (ok or the error code).",
                ("experiment", "outcome"),
                registry=r,
            )
            self.shadow_duration = Histogram(
                "inference_shadow_duration_seconds",
                "Duration of shadow (mirrored) requests.",
                ("experiment",),
                buckets=DURATION_BUCKETS,
                registry=r,
            )
            self.build_info = Gauge(
                "inference_build_info",
                "Always 1; the version label says what runs (with --workers, one series per "
                "live worker, labelled pid).",
                ("version",),
                multiprocess_mode="liveall",
                registry=r,
            )
        if self.enabled:
            self._child(self.build_info, (__version__,)).set(1)

    # --- label handling ---------------------------------------------------------------------

    def _child(self, metric: Any, labels: tuple[str, ...]) -> _Writer:
        """A metric's child for ``labels``, created once (values of this instance's mode)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            with _value_class(self._values_cls):
                child = _Writer(metric.labels(*labels))
            self._children[key] = child
        return child

    def _label(self, kind: str, value: str | None) -> str:
        """A bounded label value: the first ``max_label_values`` distinct values, then "other"."""
        if value is None:
            return NONE
        seen = self._seen.get(kind)
        if seen is None:
            seen = self._seen[kind] = {}
        label = seen.get(value)
        if label is None:
            if len(seen) >= self._max_values:
                return OTHER
            label = seen[value] = str(value)[:_MAX_LABEL_CHARS]
        return label

    def _failed(self, what: str) -> None:
        """Log a recording failure (the first, then every 1000th: never a log flood)."""
        self._errors += 1
        if self._errors == 1 or self._errors % 1000 == 0:
            logger.opt(exception=True).error("metrics: {} failed ({} so far)", what, self._errors)

    # --- the request ------------------------------------------------------------------------

    def request_started(self, endpoint: str) -> None:
        """In-flight +1 (middleware, on arrival). ``endpoint`` must equal ``ctx.endpoint``."""
        if not self.enabled:
            return
        try:
            child = self._inflight_by_endpoint.get(endpoint)
            if child is None:
                child = self._inflight_by_endpoint[endpoint] = self._child(
                    self.in_flight, (self._label("endpoint", endpoint),)
                )
            child.inc()
        except Exception:  # noqa: BLE001 (never fail a request over metrics)
            self._failed("request_started")

    def request_finished(self, ctx: RequestContext, duration_secs: float) -> None:
        """In-flight -1 and everything recorded about a finished request, from its context."""
        if not self.enabled:
            return
        try:
            self._request_finished(ctx, duration_secs)
        except Exception:  # noqa: BLE001
            self._failed("request_finished")

    def _request_finished(self, ctx: RequestContext, duration: float) -> None:
        status = ctx.status
        status_class = _STATUS_CLASS[status // 100] if status and 100 <= status < 600 else "unknown"
        key = (
            ctx.endpoint,
            ctx.model if (ctx.route is not None or ctx.deployment is not None) else None,
            ctx.route,
            ctx.provider,
            ctx.deployment,
            ctx.stream,
            status_class,
            ctx.error_code,
        )
        bundle = self._bundles.get(key)
        if bundle is None:
            bundle = self._bundle(key)
        bundle.inflight.dec()
        bundle.requests.inc()
        bundle.duration.observe(duration)
        stream_secs = ctx.stream_secs
        if ctx.attempts:
            overhead = duration - ctx.upstream_secs - (stream_secs or 0.0)
            bundle.overhead.observe(overhead if overhead > 0.0 else 0.0)
        ttft = ctx.first_token_secs
        if ctx.stream and ttft is not None:
            if bundle.ttft is None:
                bundle.ttft = self._child(self.ttft, (bundle.labels[1], bundle.labels[4]))
            bundle.ttft.observe(ttft)
        usage = ctx.usage
        output = 0
        if usage:
            prompt = usage.get("prompt_tokens")
            completion = usage.get("completion_tokens")
            if bundle.input_tokens is None:
                self._token_children(bundle)
            if isinstance(prompt, int) and prompt > 0:
                bundle.input_tokens.inc(prompt)
                bundle.input_hist.observe(prompt)
            if isinstance(completion, int) and completion > 0:
                output = completion
                bundle.output_tokens.inc(completion)
                bundle.output_hist.observe(completion)
            if ctx.usage_estimated:
                self._child(self.usage_estimated, (bundle.labels[1], bundle.labels[4])).inc()
        if ctx.stream and ttft is not None and output > 1:
            decode = stream_secs if stream_secs is not None else duration - ttft
            if decode > 0.0:
                if bundle.tpot is None:
                    bundle.tpot = self._child(self.tpot, (bundle.labels[1], bundle.labels[4]))
                bundle.tpot.observe(decode / (output - 1))
        if ctx.variant is not None:
            self._variant(ctx, status_class, duration)

    def _bundle(self, key: tuple[Any, ...]) -> _Bundle:
        endpoint, model, route, provider, deployment, stream, status_class, error_code = key
        labels = (
            self._label("endpoint", endpoint),
            self._label("model", model),
            self._label("route", route),
            self._label("provider", provider),
            self._label("deployment", deployment),
            "true" if stream else "false",
            status_class,
            self._label("error_code", error_code),
        )
        bundle = _Bundle(labels)
        ep, mdl, rte, prv, dep, strm, sc, err = labels
        bundle.requests = self._child(self.requests, (ep, mdl, rte, prv, dep, sc, err))
        bundle.duration = self._child(self.request_duration, (ep, mdl, strm, sc))
        bundle.overhead = self._child(self.overhead, (ep, strm))
        bundle.inflight = self._inflight_by_endpoint.get(endpoint)
        if bundle.inflight is None:
            bundle.inflight = self._inflight_by_endpoint[endpoint] = self._child(
                self.in_flight, (ep,)
            )
        if len(self._bundles) >= _MAX_BUNDLES:
            self._bundles.clear()  # bounded memory; children stay cached in _children
        self._bundles[key] = bundle
        return bundle

    def _token_children(self, bundle: _Bundle) -> None:
        model, deployment = bundle.labels[1], bundle.labels[4]
        bundle.input_tokens = self._child(self.tokens, (model, deployment, "input"))
        bundle.output_tokens = self._child(self.tokens, (model, deployment, "output"))
        bundle.input_hist = self._child(self.token_usage, (model, "input"))
        bundle.output_hist = self._child(self.token_usage, (model, "output"))

    def _variant(self, ctx: RequestContext, status_class: str, duration: float) -> None:
        key = (ctx.experiment, ctx.variant, status_class)
        children = self._variants.get(key)
        if children is None:
            experiment = self._label("experiment", ctx.experiment)
            variant = self._label("variant", ctx.variant)
            children = (
                self._child(self.variant_requests, (experiment, variant, status_class)),
                self._child(self.variant_duration, (experiment, variant)),
                self._child(self.variant_tokens, (experiment, variant, "input")),
                self._child(self.variant_tokens, (experiment, variant, "output")),
            )
            if len(self._variants) >= _MAX_BUNDLES:
                self._variants.clear()
            self._variants[key] = children
        requests, durations, input_tokens, output_tokens = children
        requests.inc()
        durations.observe(duration)
        usage = ctx.usage
        if usage:
            prompt = usage.get("prompt_tokens")
            if isinstance(prompt, int) and prompt > 0:
                input_tokens.inc(prompt)
            completion = usage.get("completion_tokens")
            if isinstance(completion, int) and completion > 0:
                output_tokens.inc(completion)

    # --- upstream and resilience events ----------------------------------------------------

    def attempt_finished(
        self, provider: str, deployment: str, outcome: str, duration_secs: float
    ) -> None:
        """One upstream attempt ended (``outcome``: "ok" or the error code)."""
        if not self.enabled:
            return
        try:
            labels = (
                self._label("provider", provider),
                self._label("deployment", deployment),
                self._label("error_code", outcome),
            )
            self._child(self.upstream_duration, labels).observe(duration_secs)
        except Exception:  # noqa: BLE001
            self._failed("attempt_finished")

    def retry(self, deployment: str) -> None:
        """An attempt is about to be repeated on the same deployment."""
        if not self.enabled:
            return
        try:
            self._child(self.retries, (self._label("deployment", deployment),)).inc()
        except Exception:  # noqa: BLE001
            self._failed("retry")

    def fallback(self, from_route: str, to_route: str) -> None:
        """The request moves from one route to another."""
        if not self.enabled:
            return
        try:
            labels = (self._label("route", from_route), self._label("route", to_route))
            self._child(self.fallbacks, labels).inc()
        except Exception:  # noqa: BLE001
            self._failed("fallback")

    def breaker_transition(self, deployment: str, old: str, new: str) -> None:
        """A circuit breaker changed state; also updates the state gauge."""
        if not self.enabled:
            return
        try:
            labels = (
                self._label("deployment", deployment),
                self._label("breaker_state", old),
                self._label("breaker_state", new),
            )
            self._child(self.breaker_transitions, labels).inc()
        except Exception:  # noqa: BLE001
            self._failed("breaker_transition")
        self.breaker_state(deployment, new)

    def breaker_state(self, deployment: str, state: str) -> None:
        """Set a breaker's current state (one-hot over closed/open/half_open)."""
        if not self.enabled:
            return
        try:
            dep = self._label("deployment", deployment)
            for known in BREAKER_STATES:
                self._child(self.breaker_states, (dep, known)).set(1 if known == state else 0)
            if state not in BREAKER_STATES:
                self._child(self.breaker_states, (dep, self._label("breaker_state", state))).set(1)
        except Exception:  # noqa: BLE001
            self._failed("breaker_state")

    def shadow_finished(self, experiment: str, outcome: str, duration_secs: float) -> None:
        """A shadow (mirrored) request ended (``outcome``: "ok" or the error code)."""
        if not self.enabled:
            return
        try:
            exp = self._label("experiment", experiment)
            self._child(self.shadow_requests, (exp, self._label("error_code", outcome))).inc()
            self._child(self.shadow_duration, (exp,)).observe(duration_secs)
        except Exception:  # noqa: BLE001
            self._failed("shadow_finished")

    # --- exposition -------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The body and Content-Type of ``GET /metrics`` (Prometheus text format 0.0.4).

        In multiprocess mode this merges every worker's files (a few ms for a few workers);
        it runs per scrape, not per request.
        """
        try:
            if self.multiprocess_dir:
                registry = CollectorRegistry(auto_describe=False)
                MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
                return generate_latest(registry), CONTENT_TYPE
            if self._registry is not None and self.enabled:
                return generate_latest(self._registry), CONTENT_TYPE
            return b"", CONTENT_TYPE
        except Exception:  # noqa: BLE001 (a broken scrape must not take the process down)
            self._failed("render")
            return b"# metrics rendering failed; see the server log\n", CONTENT_TYPE
