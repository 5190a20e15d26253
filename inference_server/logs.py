"""loguru setup: pretty or JSON lines, stdout or a rotated file, stdlib logging routed in, every
line of a request correlated with its request id, trace id and span id.

Why it looks like this:

* Logging must not block the event loop, and must be cheap: on the loop's thread a stdout line
  is formatted and appended to a batch; every 50 ms the batch goes to one writer thread that
  does the (possibly blocking) write (:class:`BatchedSink`).  loguru's own ``enqueue=True``
  pickles every record through a multiprocessing pipe: measured at ~250 µs per request here,
  more than the rest of the gateway.  File output uses loguru's file sink (rotation,
  retention) writing each line synchronously to the page cache (a few µs, never a pipe).
* Correlation happens in one loguru *patcher*, run for every record at the call site (so in the
  request's task and context): ``request_id`` comes from the bound logger (``ctx.log``) or, for
  code that logs through the global ``logger`` (breakers, retries, plugins), from the request scope
  set by the middleware (``REQUEST_ID``; :func:`request_scope` elsewhere); ``trace_id`` / ``span_id`` come from the current
  OpenTelemetry span, or from the ids the middleware recorded on the request context once the
  server span has ended (``ctx.set_trace``).  With tracing off the lookup finds no span and
  costs well under a µs.
* JSON lines are flat objects with stable field names, always present: ``time``, ``level``,
  ``message``, ``request_id``, ``trace_id``, ``span_id``, ``logger``, then the bound extras
  (``event`` names structured lines: ``access``, ``slow_request``).  ``"-"`` marks "none".
* The access line is written once per request, so in the JSON-to-stdout setup (production) it
  skips loguru's record machinery (frame lookup, aware datetime, patcher, formatter: ~50 µs per
  line under load) and is encoded with orjson straight into the same batched sink, with the same
  fields in the same order as loguru would write them (a test compares the two).  In every other
  setup (pretty, file output) it goes through loguru like any other line.
* No secret reaches a line: every configured secret (``LoggingSettings.scrubber``, built by
  settings) is scrubbed from each record's message and fields by the patcher, from tracebacks
  by the format functions and from the direct access line by its writer; loguru runs with
  ``diagnose=False`` (its default prints every frame's local variables, configs included).
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import datetime
import logging
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

import orjson
from loguru import logger
from opentelemetry.trace import Span, get_current_span

from inference_server.context import NONE
from inference_server.scrub import NO_SECRETS, Scrubber, printable
from inference_server.settings import LoggingSettings

if TYPE_CHECKING:
    from loguru import Record

    from inference_server.context import RequestContext

_PRETTY = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <8}</level> | "
    "<cyan>{extra[request_id]}</cyan> | <level>{message}</level>{extra[_kv]}"
)
#: Fields with a fixed place in both formats (not repeated among the extras).
_FIXED: Final = frozenset(
    {"request_id", "trace_id", "span_id", "logger_name", "_kv", "_json", "_exception"}
)
#: Extras the pretty format leaves out because the message already says them.
_PRETTY_HIDDEN: Final = frozenset(
    {"event", "method", "path", "status", "duration_ms", "threshold_ms", "queue_ms",
     "upstream_ms", "first_token_ms", "stream_ms", "overhead_ms"}
)  # fmt: skip

#: The request being handled in this task (the middleware sets and resets it directly, one
#: call each; elsewhere :func:`request_scope`).
REQUEST_ID: Final[contextvars.ContextVar[str]] = contextvars.ContextVar(
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
        extra["request_id"] = REQUEST_ID.get()
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


def _scrubbing_patcher(scrubber: Scrubber) -> Callable[[Record], None]:
    """:func:`_patch`, then every configured secret out of the message and the extras.

    Run for every record before any sink sees it, so every format and output is covered; the
    exception text, rendered later, is scrubbed by the format functions (:func:`_exception`).
    With no secrets configured it is :func:`_patch` itself.
    """
    if not scrubber:
        return _patch
    scrub = scrubber.scrub
    contains = scrubber.contains_secret

    def patch(record: Record) -> None:
        _patch(record)
        extra = record["extra"]
        strings = [v for v in extra.values() if isinstance(v, str)]
        strings.append(record["message"])
        if not contains("\x00".join(strings)):  # one search for the usual clean record
            return
        record["message"] = scrub(record["message"])
        for key, value in extra.items():
            if isinstance(value, str):
                extra[key] = scrub(value)

    return patch


def _exception(record: Record, scrubber: Scrubber) -> str:
    """The record's traceback as text, scrubbed ("" when it has none).

    loguru runs with ``diagnose=False`` (its default prints every local variable of every frame,
    a ``ProviderConfig`` with its key included), so this is code lines and exception messages.
    """
    exc = record["exception"]
    if exc is None:
        return ""
    text = "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))
    return scrubber.scrub(text)


def _pretty_format(scrubber: Scrubber) -> Callable[[Record], str]:
    """The pretty line (``_PRETTY``) with the traceback rendered and scrubbed by us."""
    line = _PRETTY + "\n"
    with_exception = _PRETTY + "\n{extra[_exception]}"

    def fmt(record: Record) -> str:
        if record["exception"] is None:
            return line
        # A value, not part of the template: loguru parses neither braces nor markup in it.
        record["extra"]["_exception"] = _exception(record, scrubber)
        return with_exception

    return fmt


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
    if record["exception"] is not None:
        obj["exception"] = _exception(record, _SCRUBBER)
    extra["_json"] = orjson.dumps(obj, default=str).decode()
    return "{extra[_json]}\n"


class BatchedSink:
    """A loguru sink that never blocks the event loop and costs a list append per line.

    On the thread running the event loop, lines join a batch that is handed to one writer thread
    every ``interval`` seconds (or at ``max_lines``).  Lines from other threads, or before a loop
    runs, go to the writer directly.  One FIFO queue and one writer keep the order.
    """

    def __init__(
        self,
        write: Callable[[str], object],
        flush: Callable[[], object] | None = None,
        *,
        interval: float = 0.05,
        max_lines: int = 512,
    ) -> None:
        self._write = write
        self._flush = flush
        self._interval = interval
        self._max_lines = max_lines
        self._batch: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop_thread: int | None = None
        self._queue: queue.SimpleQueue[str | threading.Event | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def __call__(self, message: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._queue.put(str(message))
            return
        thread = threading.get_ident()
        if self._loop_thread is None:
            self._loop_thread = thread
        elif self._loop_thread != thread:
            self._queue.put(str(message))
            return
        batch = self._batch
        batch.append(message)
        if len(batch) >= self._max_lines:
            self._handoff()
        elif self._timer is None:
            self._timer = loop.call_later(self._interval, self._handoff)

    def _handoff(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._batch:
            data = "".join(self._batch)
            self._batch.clear()
            self._queue.put(data)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self._write(item)
                if self._flush is not None:
                    self._flush()
            except (OSError, ValueError):  # stdout closed under us: nothing left to tell
                continue

    def drain(self, timeout: float = 5.0) -> None:
        """Write everything logged so far (call on the loop's thread, e.g. at shutdown)."""
        if threading.get_ident() in (self._loop_thread, None) or self._loop_thread is None:
            self._handoff()
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def close(self) -> None:
        """Drain and stop the writer thread (at exit)."""
        if self._thread.is_alive():
            self.drain()
            self._queue.put(None)
            self._thread.join(timeout=5)


_SINKS: list[BatchedSink] = []  # the current process's batched sinks, drained by complete()


class _AccessWriter:
    """Writes access lines as JSON straight into the stdout sink (see the module docstring)."""

    def __init__(self, sink: BatchedSink, enabled: bool) -> None:
        self.sink = sink
        #: False when the level is above INFO (loguru would drop the line too).
        self.enabled = enabled
        self._second = -1
        self._prefix = ""
        self._zone = ""

    def timestamp(self) -> str:
        """Local time as loguru writes it (``2026-11-26T05:07:09.897659+00:00``), formatted
        once per second and completed with the microseconds."""
        now = time.time()
        second = int(now)
        if second != self._second:
            local = datetime.datetime.fromtimestamp(second).astimezone()
            stamp = local.isoformat()
            self._second, self._prefix, self._zone = second, stamp[:19], stamp[19:]
        return f"{self._prefix}.{int((now - second) * 1e6):06d}{self._zone}"

    def write(self, ctx: RequestContext, message: str, fields: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line: dict[str, Any] = {
            "time": self.timestamp(),
            "level": "info",
            "message": message,
            "request_id": ctx.request_id,
            "trace_id": ctx.trace_id,
            "span_id": ctx.span_id,
            "logger": __name__,
        }
        if ctx.variant is not None:  # bound on ctx.log, so loguru puts it before the fields
            line["variant"] = fields["variant"]
        line.update(fields)
        text = orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE).decode()
        scrubber = _SCRUBBER
        # What loguru's patcher does for every other line, at the cost of one search of the
        # encoded line (the scrubber knows each secret's JSON-escaped form too).
        if scrubber.contains_secret(text):
            for key, value in line.items():
                if isinstance(value, str):
                    line[key] = scrubber.scrub(value)
            text = orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE).decode()
        self.sink(text)


#: Set by setup_logging for JSON lines to stdout; None: access lines go through loguru.
_ACCESS: _AccessWriter | None = None
#: The configured secrets, scrubbed from every line (part of the sinks' per-process setup).
_SCRUBBER: Scrubber = NO_SECRETS


def setup_logging(settings: LoggingSettings) -> None:
    """Replace every loguru sink with the configured one and route stdlib logging into it."""
    global _ACCESS, _SCRUBBER
    _ACCESS = None
    _SCRUBBER = settings.scrubber
    logger.remove()
    logger.configure(patcher=_scrubbing_patcher(settings.scrubber))
    level = settings.level.upper()
    fmt: Any = _json_format if settings.format == "json" else _pretty_format(settings.scrubber)
    if settings.output == "file":
        logger.add(
            settings.file.path,
            level=level,
            format=fmt,
            rotation=settings.file.rotation,
            retention=settings.file.retention,
            enqueue=False,
            colorize=False,
            diagnose=False,  # never local variables (secrets) in tracebacks
        )
    else:
        for old in _SINKS:
            old.close()
        _SINKS.clear()
        stream = sys.stdout
        sink = BatchedSink(stream.write, stream.flush)
        _SINKS.append(sink)
        logger.add(
            sink,
            level=level,
            format=fmt,
            enqueue=False,
            colorize=settings.format == "pretty" and stream.isatty(),
            diagnose=False,  # never local variables (secrets) in tracebacks
        )
        if settings.format == "json":
            _ACCESS = _AccessWriter(sink, logger.level(level).no <= logger.level("INFO").no)
    logging.basicConfig(handlers=[InterceptHandler()], level=0, force=True)
    # aiohttp's own access log would duplicate ours (which carries model and provider).
    logging.getLogger("aiohttp.access").disabled = True


def reset_logging() -> None:
    """Back to loguru's default (stderr, no patcher) and no direct access-line writer: what a
    process that never called :func:`setup_logging` has (tests call it between tests)."""
    global _ACCESS, _SCRUBBER
    _ACCESS = None
    _SCRUBBER = NO_SECRETS
    for old in _SINKS:
        old.close()
    _SINKS.clear()
    logger.remove()
    logger.configure(patcher=None)
    logger.add(sys.stderr)


async def complete() -> None:
    """Write every line logged so far (at shutdown)."""
    await logger.complete()
    for sink in _SINKS:
        sink.drain()


# --- request correlation -------------------------------------------------------------------


@contextmanager
def request_scope(request_id: str) -> Iterator[None]:
    """Within the block, lines logged through the global ``logger`` carry ``request_id``."""
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


def span_ids(span: Span | None) -> tuple[str, str] | None:
    """``span``'s trace and span ids as hex, or None when there is no valid span."""
    if span is None:
        return None
    span_context = span.get_span_context()
    if not span_context.is_valid:
        return None
    return format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")


def _ms(secs: float | None) -> float | None:
    """Seconds as milliseconds to the µs (``round`` without digits: ~10× cheaper than with)."""
    return None if secs is None else round(secs * 1_000_000) / 1000


def access(ctx: RequestContext, method: str, path: str, status: int, duration_secs: float) -> None:
    """The request's access line: the text for people, every fact as a field for machines.

    The path and the model are the client's: control characters are escaped so a CR/LF (a
    ``%0D%0A`` in the URL decodes to one) cannot forge a line in the pretty log.
    """
    path = printable(path)
    fields: dict[str, Any] = {
        "event": "access",
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": _ms(duration_secs),
        "model": printable(ctx.model) if ctx.model else NONE,
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
    if ctx.key_name:
        fields["key"] = ctx.key_name  # the API key's name, never the key (issue 12)
    if ctx.error_code:
        fields["error"] = ctx.error_code
    if ctx.cache is not None:
        fields["cache"] = ctx.cache
    if _ACCESS is not None:
        _ACCESS.write(ctx, f"{method} {path} {status} {duration_secs * 1000:.1f}ms", fields)
        return
    # Fields as keyword arguments: loguru puts them in ``extra`` without a bind() per request.
    # Values go in as positional arguments, never into the template: a path may contain braces.
    ctx.log.info("{} {} {} {:.1f}ms", method, path, status, duration_secs * 1000, **fields)


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
    if ctx.status == 101:  # a WebSocket's upgrade lasts as long as its socket: never "slow"
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
