"""Per-request state: one typed object, created by middleware and filled in by the pipeline.

It is also the record the access log, metrics and spans read at the end of a request, so every
field here has one writer (named in its comment) and is final once the response is complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from loguru import logger

from inference_server.scrub import header_value

if TYPE_CHECKING:
    from loguru import Logger

    from inference_server.keys import Runtime

#: "None" in log fields and ids (the same marker logs.py writes).
NONE = "-"


@dataclass(slots=True)
class RequestContext:
    """Everything the pipeline, the access log, metrics and traces know about one request."""

    request_id: str
    #: The runtime snapshot (settings, router, health, cache, tenancy) this request took at
    #: admission (middlewares.request_context): a hot reload never changes it under a request
    #: in flight (issue 16).  Unset only in unit tests that build a context by hand.
    runtime: Runtime = field(default=cast("Runtime", None), repr=False)
    #: perf_counter() at arrival (middleware).
    started: float = field(default_factory=time.perf_counter)
    #: Low-cardinality route label for metrics: the matched resource, e.g. "/v1/chat/completions".
    endpoint: str = "unmatched"
    #: The public model name the client asked for (pipeline).
    model: str | None = None
    #: The route the model resolved to after aliases and experiments (pipeline).
    route: str | None = None
    #: Provider instance name and "<provider>/<upstream_model>" that answered, or last tried.
    provider: str | None = None
    deployment: str | None = None
    upstream_model: str | None = None
    #: The name (never the key) of the API key that authenticated the request
    #: (tenancy.access_middleware); None when auth is off.  The response cache partitions by it
    #: (``cache.scope: key``).
    key_name: str | None = None
    #: The authenticated API key (tenancy.access_middleware; a ``tenancy_config.KeySpec``).
    api_key: Any = None
    #: The admission's rate-limit decision (tenancy.admit; a ``limits.Decision``), for the
    #: response's ``x-ratelimit-*`` headers.
    rate: Any = None
    #: What the response cache did: "hit", "miss", "bypass", or None when the cache is off
    #: (cache.py; read by the access line, metrics and the server span).
    cache: str | None = None
    #: A/B experiment and variant assigned to this request, if any.
    experiment: str | None = None
    variant: str | None = None
    stream: bool = False
    #: The GenAI operation (``gen_ai.operation.name``): chat, text_completion, embeddings,
    #: responses (the endpoint's handler).
    operation: str = "chat"
    #: The client asked for a final usage chunk (``stream_options.include_usage``).
    include_usage: bool = False
    #: Upstream attempts made, of which retries (same deployment again) and fallbacks (moves).
    attempts: int = 0
    retries: int = 0
    fallbacks: int = 0
    #: Final HTTP status (pipeline for streams, error middleware for errors, else the response).
    status: int | None = None
    error_code: str | None = None
    #: Seconds spent waiting on the upstream, summed over attempts (overhead = total - this).
    upstream_secs: float = 0.0
    #: Seconds from arrival to the first upstream attempt (validation, routing: "queue").
    queue_secs: float | None = None
    #: Seconds from arrival to the first chunk of a stream (TTFT as the client sees it).
    first_token_secs: float | None = None
    #: Seconds from the first chunk to the end of a stream.
    stream_secs: float | None = None
    #: OpenAI usage object of the answer (upstream's or estimated), if any.
    usage: dict[str, Any] | None = None
    usage_estimated: bool = False
    #: Headers to send upstream for trace propagation (filled per attempt).
    trace_headers: dict[str, str] = field(default_factory=dict)
    #: The server span's ids as hex ("-" when not traced): every line of the request carries them.
    trace_id: str = NONE
    span_id: str = NONE
    #: The request's logger, bound on first use (most requests never log through it: the access
    #: line is written from these fields directly).  Reset when what it binds changes.
    _log: Logger | None = None

    @property
    def log(self) -> Logger:
        """loguru bound to request id, trace and span ids and A/B variant (built lazily)."""
        log = self._log
        if log is None:
            extra = {"request_id": self.request_id}
            if self.trace_id != NONE:
                extra["trace_id"] = self.trace_id
                extra["span_id"] = self.span_id
            if self.variant is not None:
                extra["variant"] = f"{self.experiment}/{self.variant}"
            log = self._log = logger.bind(**extra)
        return log

    def set_trace(self, trace_id: str, span_id: str) -> None:
        """Record the server span's ids (lines logged after the span ends still carry them)."""
        self.trace_id, self.span_id, self._log = trace_id, span_id, None

    def set_variant(self, experiment: str, variant: str) -> None:
        """Record the A/B assignment (every later line of the request names it)."""
        self.experiment, self.variant, self._log = experiment, variant, None

    def routing_headers(self) -> dict[str, str]:
        """Which deployment answered (or was tried last), after how many attempts, which variant.

        Every value goes through ``header_value``: the upstream model may be the client's own
        model name (the one-provider shorthand routes any name), and a CR, LF or NUL in a header
        makes aiohttp drop the connection with nothing sent.  Names are validated before routing
        (schemas.valid_model_name); this is the second line of defence.
        """
        headers: dict[str, str] = {}
        if self.provider and self.upstream_model:
            headers["x-inference-deployment"] = header_value(
                f"{self.provider}/{self.upstream_model}"
            )
        if self.attempts:
            headers["x-inference-attempts"] = str(self.attempts)
        if self.variant:
            headers["x-inference-variant"] = header_value(f"{self.experiment}/{self.variant}")
        if self.cache is not None:
            headers["x-inference-cache"] = self.cache
        return headers
