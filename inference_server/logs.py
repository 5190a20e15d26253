"""loguru setup: pretty or JSON lines, stdout or a rotated file, stdlib logging routed in, every
line of a request correlated with its request id, trace id and span id.

Why it looks like this:

* Logging must not block the event loop: sinks are ``enqueue=True``, so the request path only
  formats the record and puts it on a queue; a loguru thread does the write.
* Correlation happens in one loguru *patcher*, run for every record at the call site (so in the
  request's task and context): ``request_id`` comes from the bound logger (``ctx.log``) or, for
  code that logs through the global ``logger`` (breakers, retries, plugins), from the request scope
  set by the middleware (:func:`request_scope`); ``trace_id`` / ``span_id`` come from the current
  OpenTelemetry span, or from the ids bound by :func:`with_trace` once the server span has ended
  (the access line).  With tracing off the lookup finds no span and costs well under a µs.
* JSON lines are flat objects with stable field names, always present: ``time``, ``level``,
  ``message``, ``request_id``, ``trace_id``, ``span_id``, ``logger``, then the bound extras
  (``event`` names structured lines: ``access``, ``slow_request``).  ``"-"`` marks "none".
"""

from __future__ import annotations

import contextvars
import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

import orjson
from loguru import logger
from opentelemetry.trace import Span, get_current_span

from inference_server.settings import LoggingSettings

if TYPE_CHECKING:
    from loguru import Logger, Record

    from inference_server.context import RequestContext

NONE: Final = "-"
_PRETTY = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <8}</level> | "
    "<cyan>{extra[request_id]}</cyan> | <level>{message}</level>{extra[_kv]}"
)
#: Fields with a fixed place in both formats (not repeated among the extras).
_FIXED: Final = frozenset({"request_id", "trace_id", "span_id", "logger_name", "_kv", "_json"})
#: Extras the pretty format leaves out because the message already says them.
_PRETTY_HIDDEN: Final = frozenset(
    {"event", "method", "path", "status", "duration_ms", "threshold_ms", "queue_ms",
     "upstream_ms", "first_token_ms", "stream_ms", "overhead_ms"}
)  # fmt: skip

#: The request being handled in this task (set by the middleware through :func:`request_scope`).
_REQUEST_ID: Final[contextvars.ContextVar[str]] = contextvars.ContextVar(
    "inference_request_id", default=NONE
)


class InterceptHandler(logging.Handler):
    """Sends stdlib ``logging`` records (aiohttp, asyncio, libraries) into loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).bind(logger_name=record.name).log(
            level, record.getMessage()
        )


def _correlate(extra: dict[str, Any]) -> None:
    """request_id / trace_id / span_id for one record (see the module docstring)."""
    if "request_id" not in extra:
        extra["request_id"] = _REQUEST_ID.get()
    span_context = get_current_span().get_span_context()
    if span_context.is_valid:
        extra["trace_id"] = format(span_context.trace_id, "032x")
        extra["span_id"] = format(span_context.span_id, "016x")
    else:
        extra.setdefault("trace_id", NONE)
        extra.setdefault("span_id", NONE)


def _patch(record: Record) -> None:
    extra = record["extra"]
    _correlate(extra)
    parts = [f" {k}={v}" for k, v in extra.items() if k not in _FIXED and k not in _PRETTY_HIDDEN]
    if extra["trace_id"] != NONE:
        parts.append(f" trace_id={extra['trace_id']} span_id={extra['span_id']}")
    extra["_kv"] = "".join(parts)


def _json_format(record: Record) -> str:
    extra = record["extra"]
    obj: dict[str, Any] = {
        "time": record["time"].isoformat(),
        "level": record["level"].name.lower(),
        "message": record["message"],
        "request_id": extra.get("request_id", NONE),
        "trace_id": extra.get("trace_id", NONE),
        "span_id": extra.get("span_id", NONE),
        "logger": extra.get("logger_name", record["name"]),
    }
    for key, value in extra.items():
        if key not in _FIXED:
            obj[key] = value
    exc = record["exception"]
    if exc is not None:
        obj["exception"] = "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))
    extra["_json"] = orjson.dumps(obj, default=str).decode()
    return "{extra[_json]}\n"


def setup_logging(settings: LoggingSettings) -> None:
    """Replace every loguru sink with the configured one and route stdlib logging into it."""
    logger.remove()
    logger.configure(patcher=_patch)
    level = settings.level.upper()
    fmt: Any = _json_format if settings.format == "json" else _PRETTY
    if settings.output == "file":
        logger.add(
            settings.file.path,
            level=level,
            format=fmt,
            rotation=settings.file.rotation,
            retention=settings.file.retention,
            enqueue=True,
            colorize=False,
        )
    else:
        logger.add(
            sys.stdout,
            level=level,
            format=fmt,
            enqueue=True,
            colorize=settings.format == "pretty" and sys.stdout.isatty(),
        )
    logging.basicConfig(handlers=[InterceptHandler()], level=0, force=True)
    # aiohttp's own access log would duplicate ours (which carries model and provider).
    logging.getLogger("aiohttp.access").disabled = True


async def complete() -> None:
    """Wait until queued log lines are written (at shutdown)."""
    await logger.complete()


# --- request correlation -------------------------------------------------------------------


@contextmanager
def request_scope(request_id: str) -> Iterator[None]:
    """Within the block, lines logged through the global ``logger`` carry ``request_id``."""
    token = _REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        _REQUEST_ID.reset(token)


def with_trace(log: Logger, span: Span | None) -> Logger:
    """``log`` bound to ``span``'s trace and span ids (for lines logged after it ends)."""
    if span is None:
        return log
    span_context = span.get_span_context()
    if not span_context.is_valid:
        return log
    return log.bind(
        trace_id=format(span_context.trace_id, "032x"),
        span_id=format(span_context.span_id, "016x"),
    )


def _ms(secs: float | None) -> float | None:
    return None if secs is None else round(secs * 1000, 3)


def access(ctx: RequestContext, method: str, path: str, status: int, duration_secs: float) -> None:
    """The request's access line: the text for people, every fact as a field for machines."""
    fields: dict[str, Any] = {
        "event": "access",
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": _ms(duration_secs),
        "model": ctx.model or NONE,
        "provider": ctx.provider or NONE,
        "attempts": ctx.attempts,
    }
    if ctx.deployment:
        fields["deployment"] = ctx.deployment
    if ctx.retries or ctx.fallbacks:
        fields["retries"] = ctx.retries
        fields["fallbacks"] = ctx.fallbacks
    if ctx.variant:
        fields["variant"] = f"{ctx.experiment}/{ctx.variant}"
    if ctx.error_code:
        fields["error"] = ctx.error_code
    ctx.log.bind(**fields).info("{} {} {} {:.1f}ms", method, path, status, duration_secs * 1000)


def slow_request(ctx: RequestContext, duration_secs: float, threshold_secs: float) -> bool:
    """Log the time breakdown of a request whose answer took ``threshold_secs`` or more to start.

    "To start" is the whole response for JSON and the first token for a stream: a long
    generation is not slow, a late first token is.  The breakdown: queue = arrival → first
    upstream attempt (validation, routing); upstream = time waiting on upstreams over all attempts
    (a stream's: until its first chunk); first_token = arrival → first chunk sent; stream = first
    chunk → end; overhead = the rest (the gateway's own time, retry backoff included).  Returns
    whether it logged; costs one comparison otherwise.  ``threshold_secs`` 0 turns it off.
    """
    waited = ctx.first_token_secs if ctx.stream and ctx.first_token_secs is not None else None
    if threshold_secs <= 0 or (waited if waited is not None else duration_secs) < threshold_secs:
        return False
    stream = ctx.stream_secs or 0.0
    overhead = max(0.0, duration_secs - ctx.upstream_secs - stream)
    fields: dict[str, Any] = {
        "event": "slow_request",
        "duration_ms": _ms(duration_secs),
        "threshold_ms": _ms(threshold_secs),
        "queue_ms": _ms(ctx.queue_secs),
        "upstream_ms": _ms(ctx.upstream_secs),
        "first_token_ms": _ms(ctx.first_token_secs),
        "stream_ms": _ms(ctx.stream_secs),
        "overhead_ms": _ms(overhead),
        "model": ctx.model or NONE,
        "deployment": ctx.deployment or NONE,
        "attempts": ctx.attempts,
        "retries": ctx.retries,
        "fallbacks": ctx.fallbacks,
    }
    if ctx.usage and isinstance(ctx.usage.get("completion_tokens"), int):
        fields["output_tokens"] = ctx.usage["completion_tokens"]
    ctx.log.bind(**fields).warning(
        "slow request: {:.0f}ms (queue {}, upstream {}, first token {}, stream {}, overhead {:.1f}ms)",
        duration_secs * 1000,
        _fmt_ms(ctx.queue_secs),
        _fmt_ms(ctx.upstream_secs),
        _fmt_ms(ctx.first_token_secs),
        _fmt_ms(ctx.stream_secs),
        overhead * 1000,
    )
    return True


def _fmt_ms(secs: float | None) -> str:
    return "-" if secs is None else f"{secs * 1000:.1f}ms"
