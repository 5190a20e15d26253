"""Transport concerns only: request id + access log + server span, and the error envelope.

Business logic lives in pipeline.py.  The order matters and is fixed in app.py:
``request_context`` (outermost: sees the final status, sets ``x-request-id`` on every response)
then ``error_envelope`` (turns every exception into the JSON error body, in one place, and
answers a request cut at the shutdown deadline with a 503).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from loguru import logger

from inference_server import logs
from inference_server.context import RequestContext
from inference_server.errors import (
    ErrorFormat,
    GatewayError,
    InternalError,
    RequestTooLarge,
    ServiceUnavailable,
    error_body,
    from_http_status,
)
from inference_server.keys import CTX, IN_FLIGHT, RUNTIME, SETTINGS
from inference_server.telemetry import Telemetry

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def new_request_id() -> str:
    """128 random bits, like a uuid4 but without its os.urandom syscall (~7 µs under load): an
    id must be unique, not unguessable.  ``random`` reseeds in every forked worker."""
    return f"req_{random.getrandbits(128):032x}"


def _request_id(request: web.Request) -> str:
    given = request.headers.get("x-request-id")
    # Echoed in a response header and every log line: printable ASCII only (isprintable alone
    # lets non-ASCII and undecodable bytes through).
    if given and len(given) <= 200 and given.isascii() and given.isprintable():
        return given
    return new_request_id()


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Create the request's context, time it, trace it, count it and write its access line."""
    rid = _request_id(request)
    # issue 16: the runtime snapshot is taken once, here; a reload swaps the reference only.
    runtime = request.app[RUNTIME].current
    ctx = RequestContext(request_id=rid, runtime=runtime)
    resource = request.match_info.route.resource
    endpoint = ctx.endpoint = resource.canonical if resource is not None else "unmatched"
    request[CTX] = ctx
    telemetry = runtime.telemetry
    metrics = runtime.metrics
    metrics.request_started(endpoint)
    status = 500
    scope_token = logs.REQUEST_ID.set(rid)
    try:
        if telemetry.enabled:
            response = await _traced(request, handler, ctx, telemetry)
        else:  # no span objects at all (tracing off: the production default)
            response = await handler(request)
        status = response.status
        if not response.prepared:
            response.headers["x-request-id"] = rid
            if ctx.attempts:
                response.headers.update(ctx.routing_headers())
        return response
    except asyncio.CancelledError:
        # The client went away before the response was complete (handler cancellation).
        ctx.error_code = ctx.error_code or "CLIENT_DISCONNECTED"
        status = 499
        raise
    finally:
        if ctx.status is None:
            ctx.status = status
        record(ctx, request.method, request.path)
        logs.REQUEST_ID.reset(scope_token)


def record(ctx: RequestContext, method: str, path: str) -> None:
    """The end of every request, HTTP or one on a WebSocket: metrics, access line, slow line."""
    runtime = ctx.runtime
    duration = time.perf_counter() - ctx.started
    runtime.metrics.request_finished(ctx, duration)
    log_settings = runtime.settings.logging
    if log_settings.access_log:
        logs.access(ctx, method, path, ctx.status or 500, duration)
    logs.slow_request(ctx, duration, log_settings.slow_request_secs)


async def _traced(
    request: web.Request, handler: Handler, ctx: RequestContext, telemetry: Telemetry
) -> web.StreamResponse:
    """The handler inside the request's server span (tracing on)."""
    method = request.method
    with telemetry.server_span(
        f"{method} {ctx.endpoint}",
        request.headers,
        {"http.request.method": method, "url.path": request.path},
    ) as span:
        ids = logs.span_ids(span)
        if ids is not None:
            ctx.set_trace(*ids)
            if not span.is_recording():  # type: ignore[union-attr]
                # Unsampled: no attempt spans; upstreams still get the trace (flag 00).
                telemetry.inject(ctx.trace_headers, span)
        response = await handler(request)
        telemetry.finish_request(span, ctx, ctx.status or response.status)
    return response


def error_response(err: GatewayError, error_format: str) -> web.Response:
    """The one place a ``GatewayError`` becomes an HTTP response."""
    fmt: ErrorFormat = "legacy" if error_format == "legacy" else "openai"
    return web.Response(
        status=err.http_status,
        body=orjson.dumps(error_body(err, fmt)),
        content_type="application/json",
        headers=err.response_headers(),
    )


@web.middleware
async def error_envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every exception to the JSON error envelope; a bug becomes a logged generic 500.

    It also tracks the handler task for the shutdown deadline: ``server.cut_at_deadline``
    cancels every tracked task just before aiohttp's own deadline.  A stream has then written
    its error event (streaming.py) and the cancellation goes on; a request that has sent
    nothing yet (typically one waiting for the upstream's first byte) gets a 503 JSON
    (``SERVICE_UNAVAILABLE``) here instead of a bare disconnect.  And it refuses a
    ``Content-Length`` over the limit before anything reads the body.
    """
    app = request.app
    state = app[IN_FLIGHT]
    task = asyncio.current_task()
    if task is not None:
        state.tasks.add(task)
    try:
        length = request.content_length
        if length is not None and length > (limit := app[SETTINGS].server.max_body_bytes):
            raise RequestTooLarge(f"Request body too large: the limit is {limit} bytes")
        return await handler(request)
    except asyncio.CancelledError:
        transport = request.transport
        if not (
            state.cut
            and task is not None
            and request.writer.output_size == 0
            and transport is not None
            and not transport.is_closing()
        ):
            raise
        task.uncancel()
        err: GatewayError = ServiceUnavailable(
            "The server is shutting down; the request was cut at the shutdown deadline"
        )
    except GatewayError as exc:
        err = exc
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].server.max_body_bytes
        err = RequestTooLarge(f"Request body too large: the limit is {limit} bytes")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = exc.reason
        if exc.status == 404:
            reason = f"Not found: {request.method} {request.path}"
        elif exc.status == 405:
            allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
            reason = f"Method {request.method} not allowed for {request.path} (allowed: {allowed})"
        err = from_http_status(exc.status, reason)
    except Exception:  # noqa: BLE001 (a bug must still leave as a JSON 500, logged)
        ctx = request.get(CTX)
        (ctx.log if ctx else logger).exception("unhandled error")
        err = InternalError("Internal server error")
    finally:
        if task is not None:
            state.tasks.discard(task)
    # Before anything reads it (access log, metrics, spans, the body): no configured secret in
    # any field of the error, and a code that is a plain token (the secrets of the request's
    # runtime: a reload may have added some).
    ctx = request.get(CTX)
    (ctx.runtime.settings if ctx is not None else request.app[SETTINGS]).scrubber.scrub_error(err)
    if ctx is not None:
        ctx.error_code = err.code
        ctx.status = err.http_status
        if err.http_status >= 500:
            ctx.log.warning("{} ({}): {}", err.http_status, err.code, err.message)
    return error_response(err, request.app[SETTINGS].server.error_format)
