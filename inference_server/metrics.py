"""Prometheus metrics: what the gateway did, per route, model, deployment and outcome.

Design choices, and why:

* **One record per request.** The pipeline fills :class:`~inference_server.context.RequestContext`
  and calls :meth:`Metrics.request_finished` once; everything about the request (count, duration,
  overhead, TTFT, time per output token, tokens, A/B variant) is derived from that record here, so
  the request path has a single metrics call site and the numbers cannot disagree.
* **Public API only.** Values are never written by reaching into prometheus-client's value
  objects or swapping its value class (issue 11: those fast paths broke on any release).  With
  ``--workers N`` they go through the library's own metric classes (its multiprocess files).  A
  single process keeps them in plain numbers (:mod:`inference_server.localmetrics`) exported
  through the library's custom-collector interface: the library's classes lock and check on
  every call, ~10 % of the gateway's CPU per request; a differential test holds both
  expositions equal.  ``labels()`` costs ~1.5 µs (tuple building, validation, a lock), so the label
  children a request needs are resolved once per distinct label combination and kept in a small
  "bundle" (one dict lookup per request).  Series that only some requests need (TTFT, tokens)
  are created on first use, so a JSON-only deployment does not export empty stream histograms.
* **Bounded labels, from names the gateway knows.** A label value for a model, route, provider,
  deployment, experiment or variant is one the configuration declares (:meth:`Metrics.know`:
  routes, aliases, allowed models, the default model, deployments' ids, experiments) or one of
  at most ``max_label_values`` names the shorthand's provider listed
  (:meth:`Metrics.listed_models`); anything else counts as ``"other"``.  Error codes come from
  a closed set (every ``errors.py`` class's code, the gateway's and plugins' explicit codes,
  OpenAI's codes; matched ignoring case); endpoints are the app's route patterns.  No table is
  keyed by a string a client chose: a client spraying 1 MB model names leaves nothing behind.
* **Multiprocess.** With ``--workers N`` each worker writes its values to mmap'd files in one
  directory (prometheus-client's multiprocess mode) and any worker's ``/metrics`` merges them, so a
  scrape sees the whole server whichever worker answers.  The parent prepares the directory
  before forking (:func:`prepare_multiprocess`), each worker's live gauges are dropped when it
  exits (:func:`worker_exit`).  A single process keeps values in memory.  prometheus-client
  decides between the two when it is first imported (from ``PROMETHEUS_MULTIPROC_DIR``), so
  this module imports it only inside :class:`Metrics` and :func:`worker_exit`, after
  :func:`prepare_multiprocess` has set the variable; :class:`Metrics` checks that its values
  really reach the directory and refuses to start otherwise.
* **Never raises.** A metrics bug must not fail a request: every public method catches and logs
  (rate-limited) instead.

Names follow Prometheus conventions (base units, ``_total`` counters, ``_seconds``) and use the
OpenTelemetry GenAI metric names, translated to Prometheus (dots → ``_``, unit suffix), where the
spec defines one: ``gen_ai_server_time_to_first_token_seconds``,
``gen_ai_server_time_per_output_token_seconds``, ``gen_ai_client_operation_duration_seconds``
and ``gen_ai_client_token_usage``.  docs/observability.md lists every metric.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from loguru import logger

from inference_server import __version__
from inference_server.errors import GatewayError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

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
#: What a label value becomes when the gateway does not know the name (see the docstring).
OTHER: Final = "other"
#: ``gen_ai.operation.name`` values (the endpoints' operations): the ``operation`` label.
OPERATION_NAMES: Final = frozenset({"chat", "text_completion", "embeddings", "responses"})
#: The outcome label of a successful upstream attempt or shadow request.
OK: Final = "ok"
_MAX_LABEL_CHARS: Final = 100
_MAX_CODE_CHARS: Final = 64
#: Caches of resolved label children (keyed by label values, so bounded by the known names):
#: cleared when this large, which costs only re-resolving through ``labels()``.
_MAX_BUNDLES: Final = 10_000
#: Error codes that may be label values besides every ``errors.py`` class's default code:
#: codes the gateway and the bundled plugins raise explicitly, and OpenAI's documented codes
#: (upstream errors keep theirs, upper-cased).  Matched ignoring case, emitted as written here.
KNOWN_ERROR_CODES: Final = (
    # the gateway's and the bundled plugins' explicit codes
    "CLIENT_DISCONNECTED", "EMPTY_MESSAGES", "INVALID_JSON", "INVALID_PARAMETER",
    "MISSING_PARAMETER", "MODEL_NOT_ALLOWED", "UNKNOWN_VARIANT", "UNSUPPORTED_PARAMETER",
    "MODEL_ERROR", "MODEL_MISCONFIGURED", "MODEL_NOT_READY", "TEMPLATE_ERROR", "UNSUPPORTED",
    # OpenAI's
    "RATE_LIMIT_EXCEEDED", "INSUFFICIENT_QUOTA", "CONTEXT_LENGTH_EXCEEDED", "MODEL_NOT_FOUND",
    "INVALID_API_KEY", "INVALID_REQUEST_ERROR", "SERVER_ERROR", "CONTENT_POLICY_VIOLATION",
    "CONTENT_FILTER", "INVALID_VALUE", "INVALID_TYPE", "UNSUPPORTED_VALUE",
    "UNSUPPORTED_COUNTRY_REGION_TERRITORY", "STRING_ABOVE_MAX_LENGTH", "ARRAY_ABOVE_MAX_LENGTH",
    "INVALID_IMAGE_URL", "INVALID_ORGANIZATION", "INVALID_PROJECT", "ACCOUNT_DEACTIVATED",
    "BILLING_HARD_LIMIT_REACHED", "ENGINE_OVERLOADED", "MODEL_OVERLOADED", "UNKNOWN_URL",
    "INVALID_PROMPT", "TOKENS_EXCEEDED", "PERMISSION_DENIED", "INTERNAL_ERROR",
)  # fmt: skip
_STATUS_CLASS: Final = ("unknown", "1xx", "2xx", "3xx", "4xx", "5xx")
#: Label kinds whose values are names the gateway knows (see :meth:`Metrics.know`).
_NAME_KINDS: Final = (
    "endpoint", "model", "route", "provider", "deployment", "experiment", "variant",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """``metrics.*`` settings (built by settings.py)."""

    #: Record and serve ``GET /metrics``.
    enabled: bool = True
    #: Where workers write their mmap'd values. ``None``: a fresh temporary directory when
    #: ``--workers`` > 1 (made by :func:`prepare_multiprocess`), in-memory values otherwise.
    multiprocess_dir: str | None = None
    #: Model names a provider lists (the shorthand without ``allowed_models``) that may become
    #: label values; configured names always do, anything else is ``"other"``.
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
        from prometheus_client.multiprocess import mark_process_dead

        with contextlib.suppress(OSError):
            mark_process_dead(os.getpid() if pid is None else pid, path)  # type: ignore[no-untyped-call]


def _noop() -> None:
    return None


def error_codes() -> dict[str, str]:
    """Every error code that may be a label value, keyed by its upper-case form: the default
    code of every :class:`~inference_server.errors.GatewayError` subclass imported so far (the
    gateway's and any plugin's) and :data:`KNOWN_ERROR_CODES`."""
    codes: dict[str, str] = {c.upper(): c for c in KNOWN_ERROR_CODES}
    todo: list[type[GatewayError]] = [GatewayError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        code = cls.default_code
        if isinstance(code, str) and code and len(code) <= _MAX_CODE_CHARS:
            codes.setdefault(code.upper(), code)
    return codes


def render_directory(directory: str) -> bytes:
    """The merged exposition of every worker's files in ``directory`` (any process can read it,
    whatever mode its own prometheus-client runs in)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


# --- the recorder ------------------------------------------------------------------------------


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

    def __init__(self, settings: MetricsSettings, *, library_values: bool = False) -> None:
        """``library_values``: record through prometheus-client's own metric classes even in a
        single process (what multiprocess mode always does; the differential test compares)."""
        self.enabled = settings.enabled
        self._max_listed = settings.max_label_values
        self._errors = 0
        path = settings.multiprocess_dir or os.environ.get(MULTIPROC_ENV) or None
        #: The multiprocess directory, or None for in-memory values.
        self.multiprocess_dir = os.path.abspath(path) if path and self.enabled else None
        if self.multiprocess_dir:
            os.makedirs(self.multiprocess_dir, exist_ok=True)
            # prometheus-client names the directory of every value it creates from this
            # variable (and picks multiprocess values at its import from it: see the docstring).
            os.environ[MULTIPROC_ENV] = self.multiprocess_dir
        from prometheus_client import CollectorRegistry

        if self.multiprocess_dir or library_values:
            from prometheus_client import Counter, Gauge, Histogram
        else:  # one process: plain numbers, exported by a custom collector (localmetrics.py)
            from inference_server.localmetrics import LocalCounter as Counter  # type: ignore[assignment]
            from inference_server.localmetrics import LocalGauge as Gauge  # type: ignore[assignment]
            from inference_server.localmetrics import LocalHistogram as Histogram  # type: ignore[assignment]
        #: The metric classes this process records with (other modules' metrics use them too).
        self.classes: tuple[Any, Any, Any] = (Counter, Gauge, Histogram)
        registry: CollectorRegistry | None = None  # multiprocess: rendering reads the files
        if not self.multiprocess_dir:
            registry = CollectorRegistry(auto_describe=True)
            if self.enabled:
                from prometheus_client import (
                    disable_created_metrics,
                    gc_collector,
                    platform_collector,
                    process_collector,
                )

                # ``*_created`` series would double the exposition for no dashboard use.
                disable_created_metrics()  # type: ignore[no-untyped-call]
                process_collector.ProcessCollector(registry=registry)
                platform_collector.PlatformCollector(registry=registry)
                gc_collector.GCCollector(registry=registry)
        self._registry = registry
        #: Label children per label values (bounded: values come from the known names).
        self._bundles: dict[tuple[str, ...], _Bundle] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._variants: dict[tuple[str, ...], tuple[Any, Any, Any, Any]] = {}
        #: The in-flight gauge's child per endpoint (request_started's one lookup).
        self._in_flight: dict[str, Any] = {}
        #: Known names per label kind: name → label value (see :meth:`know`).
        self._configured: dict[str, dict[str, str]] = {kind: {} for kind in _NAME_KINDS}
        self._names: dict[str, dict[str, str]] = {kind: {} for kind in _NAME_KINDS}
        self._listed: dict[str, str] = {}
        self._listed_deployments: dict[str, str] = {}
        self._codes = error_codes()
        self._codes_exact: dict[str, str] = {**{c: c for c in self._codes.values()}, OK: OK}

        r = registry
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
            "Each upstream attempt, by operation (chat, text_completion, embeddings, "
            "responses) and outcome (ok or the error code); for a stream, until its first chunk.",
            ("operation", "provider", "deployment", "outcome"),
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
        # The response cache (cache.py).  Results are counted from the request's context.
        self.cache_requests = Counter(
            "inference_cache_requests",
            "Chat requests by what the response cache did: hit, miss (asked the upstream) "
            "or bypass (cache off for the model, no-store, logprobs).",
            ("model", "result"),
            registry=r,
        )
        self.cache_coalesced = Counter(
            "inference_cache_coalesced",
            "Requests that waited for an identical request already asking the upstream.",
            ("model",),
            registry=r,
        )
        self.cache_stored_bytes = Counter(
            "inference_cache_stored_bytes",
            "Bytes of answers stored in the response cache (before compression).",
            registry=r,
        )
        self.cache_bytes = Gauge(
            "inference_cache_bytes",
            "Bytes held by the in-memory response cache (summed over workers).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.cache_entries = Gauge(
            "inference_cache_entries",
            "Entries held by the in-memory response cache (summed over workers).",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.cache_evictions = Counter(
            "inference_cache_evictions",
            "Entries dropped from the in-memory cache: size (cache.max_bytes), count "
            "(cache.max_entries) or expired.",
            ("reason",),
            registry=r,
        )
        self.cache_errors = Counter(
            "inference_cache_errors",
            "Redis failures of the response cache (get, set, lock); the request was served "
            "from the upstream.",
            ("operation",),
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
            if self.multiprocess_dir:
                self._check_multiprocess()

    @property
    def registry(self) -> Any:
        """Where other modules' metrics register (None in multiprocess mode: files)."""
        return self._registry

    def _check_multiprocess(self) -> None:
        """Refuse to run with values that never reach the workers' directory.

        prometheus-client picked in-memory values if it was imported before
        ``PROMETHEUS_MULTIPROC_DIR`` was set; then this process's counts would silently be
        missing from every scrape.  The build-info gauge was just set: this process's own files
        (the library names them ``<kind>_<pid>.db``; other workers' files may be half-written
        right now, so they are not read) must hold it.
        """
        from prometheus_client.multiprocess import MultiProcessCollector

        assert self.multiprocess_dir is not None
        pid = os.getpid()
        own = glob.glob(os.path.join(glob.escape(self.multiprocess_dir), f"*_{pid}.db"))
        for family in MultiProcessCollector.merge(own, accumulate=False):  # type: ignore[no-untyped-call]
            if family.name == "inference_build_info" and any(
                s.labels.get("pid") == str(pid) for s in family.samples
            ):
                return
        raise RuntimeError(
            f"metrics: prometheus-client was imported before {MULTIPROC_ENV} was set, so this "
            f"process cannot write to {self.multiprocess_dir}; set the variable before the "
            "process starts (the gateway's CLI does)"
        )

    # --- label handling ---------------------------------------------------------------------

    def know(self, **names: Iterable[str]) -> None:
        """Declare configured names that may be label values, per kind (``models``,
        ``routes``, ``providers``, ``deployments``, ``experiments``, ``variants``,
        ``endpoints``); added to what is known.  Configuration is finite, so these are
        not capped (a label value is cut to 100 characters)."""
        for plural, values in names.items():
            kind = plural.removesuffix("s")
            if kind not in self._configured:
                raise ValueError(f"unknown label kind {plural!r}")
            table = self._configured[kind]
            for value in values:
                table[value] = value[:_MAX_LABEL_CHARS]
            self._merge(kind)
        self._in_flight.clear()  # an endpoint's label may have changed from "other"

    def listed_models(self, names: Iterable[str], provider: str | None = None) -> None:
        """The model names the shorthand's provider lists now (replacing the previous list):
        at most ``max_label_values`` of them become label values, in the order given; with
        ``provider``, so do the shorthand's per-model deployments ``<provider>/<model>``."""
        listed: dict[str, str] = {}
        for name in names:
            if len(listed) >= self._max_listed:
                break
            if isinstance(name, str) and name:
                listed[name] = name[:_MAX_LABEL_CHARS]
        self._listed = listed
        self._listed_deployments = (
            {f"{provider}/{k}": f"{provider}/{v}"[:_MAX_LABEL_CHARS] for k, v in listed.items()}
            if provider
            else {}
        )
        self._merge("model")
        self._merge("deployment")

    def _merge(self, kind: str) -> None:
        table = self._configured[kind]
        if kind == "model":
            self._names[kind] = {**table, **self._listed}
        elif kind == "deployment":
            self._names[kind] = {**table, **self._listed_deployments}
        else:
            self._names[kind] = dict(table)

    def _label(self, kind: str, value: str | None) -> str:
        """The label value for a name: itself when known, ``""`` for none, else "other"."""
        if value is None:
            return NONE
        return self._names[kind].get(value, OTHER)

    def _code(self, code: str | None) -> str:
        """An error code's label value: one of the known codes (ignoring case), else "other"."""
        if code is None:
            return NONE
        label = self._codes_exact.get(code)
        if label is not None:
            return label
        if len(code) > _MAX_CODE_CHARS:
            return OTHER
        return self._codes.get(code.upper(), OTHER)

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """A metric's child for ``labels`` through the library's ``labels()``, cached (the
        cache is keyed by label values, which are bounded)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            if len(self._children) >= _MAX_BUNDLES:
                self._children.clear()
            self._children[key] = child
        return child

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
            gauge = self._in_flight.get(endpoint)
            if gauge is None:
                gauge = self._child(self.in_flight, (self._label("endpoint", endpoint),))
                if len(self._in_flight) < _MAX_BUNDLES:  # endpoints: the app's route patterns
                    self._in_flight[endpoint] = gauge
            gauge.inc()
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
        names = self._names
        model = ctx.model if (ctx.route is not None or ctx.deployment is not None) else None
        route, provider, deployment = ctx.route, ctx.provider, ctx.deployment
        key = (
            names["endpoint"].get(ctx.endpoint, OTHER),
            NONE if model is None else names["model"].get(model, OTHER),
            NONE if route is None else names["route"].get(route, OTHER),
            NONE if provider is None else names["provider"].get(provider, OTHER),
            NONE if deployment is None else names["deployment"].get(deployment, OTHER),
            "true" if ctx.stream else "false",
            status_class,
            self._code(ctx.error_code),
        )
        bundle = self._bundles.get(key)
        if bundle is None:
            bundle = self._bundle(key)
        bundle.inflight.dec()
        bundle.requests.inc()
        if status_class == "1xx":
            # A WebSocket upgrade (101): its "duration" is the socket's life, not a request's
            # (each request on the socket is recorded on its own, websocket.run_request).
            return
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
        if ctx.cache is not None:
            self._child(self.cache_requests, (bundle.labels[1], ctx.cache)).inc()

    def _bundle(self, labels: tuple[str, ...]) -> _Bundle:
        bundle = _Bundle(labels)
        ep, mdl, rte, prv, dep, strm, sc, err = labels
        bundle.requests = self._child(self.requests, (ep, mdl, rte, prv, dep, sc, err))
        if sc != "1xx":  # an upgrade's socket life is no request duration (_request_finished)
            bundle.duration = self._child(self.request_duration, (ep, mdl, strm, sc))
        bundle.overhead = self._child(self.overhead, (ep, strm))
        bundle.inflight = self._child(self.in_flight, (ep,))
        if len(self._bundles) >= _MAX_BUNDLES:
            self._bundles.clear()
        self._bundles[labels] = bundle
        return bundle

    def _token_children(self, bundle: _Bundle) -> None:
        model, deployment = bundle.labels[1], bundle.labels[4]
        bundle.input_tokens = self._child(self.tokens, (model, deployment, "input"))
        bundle.output_tokens = self._child(self.tokens, (model, deployment, "output"))
        bundle.input_hist = self._child(self.token_usage, (model, "input"))
        bundle.output_hist = self._child(self.token_usage, (model, "output"))

    def _variant(self, ctx: RequestContext, status_class: str, duration: float) -> None:
        experiment = self._label("experiment", ctx.experiment)
        variant = self._label("variant", ctx.variant)
        key = (experiment, variant, status_class)
        children = self._variants.get(key)
        if children is None:
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
        self,
        provider: str,
        deployment: str,
        outcome: str,
        duration_secs: float,
        operation: str = "chat",
    ) -> None:
        """One upstream attempt of ``operation`` (``gen_ai.operation.name``) ended
        (``outcome``: "ok" or the error code)."""
        if not self.enabled:
            return
        try:
            labels = (
                operation if operation in OPERATION_NAMES else OTHER,
                self._label("provider", provider),
                self._label("deployment", deployment),
                self._code(outcome),
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
                old if old in BREAKER_STATES else OTHER,
                new if new in BREAKER_STATES else OTHER,
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
                self._child(self.breaker_states, (dep, OTHER)).set(1)
        except Exception:  # noqa: BLE001
            self._failed("breaker_state")

    def forget_breaker(self, deployment: str) -> None:
        """A deployment a hot reload removed: its breaker-state series go from ``/metrics`` (a
        gauge of a breaker that no longer exists would keep saying "open" for ever)."""
        if not self.enabled:
            return
        try:
            dep = self._label("deployment", deployment)
            if dep == OTHER:
                return  # shared by every unknown name: not this deployment's alone
            for state in (*BREAKER_STATES, OTHER):
                child = self._children.pop((id(self.breaker_states), (dep, state)), None)
                if self.multiprocess_dir:  # the library cannot remove there: zero it
                    if child is not None:
                        child.set(0)
                    continue
                with contextlib.suppress(KeyError):
                    self.breaker_states.remove(dep, state)
        except Exception:  # noqa: BLE001
            self._failed("forget_breaker")

    def shadow_finished(self, experiment: str, outcome: str, duration_secs: float) -> None:
        """A shadow (mirrored) request ended (``outcome``: "ok" or the error code)."""
        if not self.enabled:
            return
        try:
            exp = self._label("experiment", experiment)
            self._child(self.shadow_requests, (exp, self._code(outcome))).inc()
            self._child(self.shadow_duration, (exp,)).observe(duration_secs)
        except Exception:  # noqa: BLE001
            self._failed("shadow_finished")

    # --- the response cache (cache.py) -----------------------------------------------------

    def cache_coalesced_request(self, model: str | None) -> None:
        """A request waits for an identical one already asking the upstream."""
        if not self.enabled:
            return
        try:
            self._child(self.cache_coalesced, (self._label("model", model),)).inc()
        except Exception:  # noqa: BLE001
            self._failed("cache_coalesced")

    def cache_stored(self, nbytes: int) -> None:
        """An answer was stored (its size before compression)."""
        if not self.enabled:
            return
        try:
            self.cache_stored_bytes.inc(nbytes)
        except Exception:  # noqa: BLE001
            self._failed("cache_stored")

    def cache_size(self, nbytes: int, entries: int) -> None:
        """The in-memory cache's size now."""
        if not self.enabled:
            return
        try:
            self.cache_bytes.set(nbytes)
            self.cache_entries.set(entries)
        except Exception:  # noqa: BLE001
            self._failed("cache_size")

    def cache_evicted(self, reason: str) -> None:
        """An entry left the in-memory cache (``reason``: size, count or expired)."""
        if not self.enabled:
            return
        try:
            self._child(self.cache_evictions, (reason,)).inc()
        except Exception:  # noqa: BLE001
            self._failed("cache_evicted")

    def cache_error(self, operation: str) -> None:
        """A Redis command of the cache failed (``operation``: get, set or lock)."""
        if not self.enabled:
            return
        try:
            self._child(self.cache_errors, (operation,)).inc()
        except Exception:  # noqa: BLE001
            self._failed("cache_error")

    # --- exposition -------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The body and Content-Type of ``GET /metrics`` (Prometheus text format 0.0.4).

        In multiprocess mode this merges every worker's files (a few ms for a few workers);
        it runs per scrape, not per request.
        """
        try:
            if self.multiprocess_dir:
                return render_directory(self.multiprocess_dir), CONTENT_TYPE
            if self._registry is not None and self.enabled:
                from prometheus_client import generate_latest

                return generate_latest(self._registry), CONTENT_TYPE
            return b"", CONTENT_TYPE
        except Exception:  # noqa: BLE001 (a broken scrape must not take the process down)
            self._failed("render")
            return b"# metrics rendering failed; see the server log\n", CONTENT_TYPE
