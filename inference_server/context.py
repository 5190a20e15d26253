"""Per-request state: one typed object, created by middleware and filled in by the pipeline."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loguru import Logger


@dataclass(slots=True)
class RequestContext:
    """Everything the pipeline and the access log need to know about one request."""

    request_id: str
    log: Logger
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None
    provider: str | None = None
    upstream_model: str | None = None
    stream: bool = False
    attempts: int = 0
    status: int | None = None
    error_code: str | None = None
    #: Seconds spent waiting on the upstream (for overhead = total - upstream).
    upstream_secs: float = 0.0
    first_token_secs: float | None = None
    usage: dict[str, Any] | None = None
    trace_headers: dict[str, str] = field(default_factory=dict)
