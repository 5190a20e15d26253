"""Per-request state: one typed object, created by middleware and filled in by the pipeline.

It is also the record the access log, metrics and spans read at the end of a request, so every
field here has one writer (named in its comment) and is final once the response is complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loguru import Logger


@dataclass(slots=True)
class RequestContext:
    """Everything the pipeline, the access log, metrics and traces know about one request."""

    request_id: str
    log: Logger
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
    #: A/B experiment and variant assigned to this request, if any.
    experiment: str | None = None
    variant: str | None = None
    stream: bool = False
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

    def routing_headers(self) -> dict[str, str]:
        """Which deployment answered (or was tried last), after how many attempts, which variant."""
        headers: dict[str, str] = {}
        if self.provider and self.upstream_model:
            headers["x-inference-deployment"] = f"{self.provider}/{self.upstream_model}"
        if self.attempts:
            headers["x-inference-attempts"] = str(self.attempts)
        if self.variant:
            headers["x-inference-variant"] = f"{self.experiment}/{self.variant}"
        return headers
