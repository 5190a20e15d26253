"""WebSocket: chat streams multiplexed on one socket, and the Responses API's WebSocket mode.

``GET /v1/chat/completions`` with an upgrade carries our own envelope (there is no standard
chat WebSocket): a client frame ``{"id", "body": {chat request}}`` starts a request,
``{"id", "cancel": true}`` cancels it (and its upstream call); the server answers each id with
``{"id", "chunk": {chat.completion.chunk}}`` frames and then ``{"id", "done": true, "usage"}``
or ``{"id", "error": {OpenAI error object}}``.  Requests interleave freely.

``GET /v1/responses`` with an upgrade is OpenAI's Responses WebSocket mode (what the openai
SDK's ``client.responses.connect()`` speaks): ``{"type": "response.create", …the body of
POST /v1/responses…}`` and ``{"type": "response.cancel"}`` in, the Responses streaming events
out (``stream_id`` lanes run FIFO each and are echoed on every event).

Why it is built this way:

* **One pipeline.**  Every request on a socket is its own request: a fresh ``RequestContext``
  on a clone of the upgrade request (aiohttp's public ``clone``: the key authenticated on the
  upgrade comes along), then the same validate → route → admit → walk → stream steps as its
  HTTP twin (``endpoints.serve``, ``pipeline.stream``), writing to a
  :class:`~inference_server.streaming.Sink` instead of an SSE response.  Rate limits and
  budgets therefore count per request, and each request gets its own access line, metrics and
  server span (a child of the upgrade's ``traceparent``).  The response cache is not consulted
  (its hits are HTTP replays).
* **Bounded.**  aiohttp's ``max_msg_size`` caps a frame (a larger one closes with 1009: it is
  never buffered); ``max_in_flight`` requests per socket (beyond: an error frame); pings every
  ``heartbeat_secs``; a socket idle for ``idle_timeout_secs`` is closed.  A client that stops
  reading is closed with 1008 once a frame waits ``send_timeout_secs`` or the transport holds
  ``max_buffered_bytes`` (its requests and upstream calls are cancelled), so nothing is
  buffered for it without bound and other sockets are not held up.
* **Cancellation.**  A cancel frame, a disconnect, or the socket being closed cancels the
  request's task; the relay's ``finally`` closes the upstream stream.
* **Shutdown.**  On SIGTERM aiohttp stops reading every connection (``RequestHandler.close``
  drops incoming data), so a socket can take no new request; idle sockets close with 1001 at
  once, busy ones when their last request ends, and at the shutdown deadline
  (``server.cut_at_deadline``) what still runs gets an error frame, then 1001.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Final

import orjson
from aiohttp import WSMsgType, web
from loguru import logger

from inference_server import logs
from inference_server.body import OFFLOAD_BYTES, parse
from inference_server.context import RequestContext
from inference_server.endpoints import serve
from inference_server.endpoints.responses import prepare
from inference_server.endpoints.schemas import validate_responses
from inference_server.errors import (
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    OriginNotAllowed,
    RequestCancelled,
    ServiceUnavailable,
    TooManyInFlight,
    error_body,
)
from inference_server.keys import BACKGROUND, CTX, RUNTIME, SETTINGS
from inference_server.middlewares import new_request_id, record
from inference_server.pipeline import CHAT, stream
from inference_server.routing import Lease
from inference_server.schemas import validate_chat
from inference_server.scrub import printable
from inference_server.settings import WebSocketSettings
from inference_server.telemetry import NO_SPAN
from inference_server.websocket_auth import KEY_PROTOCOL, offered_protocols

#: A client id (chat) or ``stream_id`` (Responses): echoed on frames, so bounded and plain.
_ID: Final = re.compile(r"[A-Za-z0-9_.:\-]{1,256}")
#: How long a socket being closed may take to say goodbye before its transport is dropped.
CLOSE_GRACE_SECS: Final = 2.0
#: How long a closing socket waits for its cancelled requests to write their last frame.
STOP_GRACE_SECS: Final = 5.0


def _shutting_down() -> ServiceUnavailable:
    return ServiceUnavailable(
        "The server is shutting down; the stream was cut at the shutdown deadline"
    )


@dataclass(eq=False, slots=True)
class Job:
    """One request running on a socket."""

    task: asyncio.Task[None]
    sink: Frames
    #: Responses: the lane (``stream_id``) and the response id once known (for cancels).
    lane: str = ""
    response_id: str | None = None
    #: Its frame was large: validated off the event loop (as body.py does over HTTP).
    large: bool = False


@dataclass(eq=False, slots=True)
class Socket:
    """One client's WebSocket: its requests in flight, its limits and its writes."""

    request: web.Request
    ws: web.WebSocketResponse
    settings: WebSocketSettings
    transport: asyncio.Transport | None
    jobs: dict[str, Job] = field(default_factory=dict)
    #: Responses lanes: one lock each, so a lane's requests run in order.
    lanes: dict[str, asyncio.Lock] = field(default_factory=dict)
    #: Responses: the connection's most recent response (chained even with ``store: false``).
    recent: dict[str, Any] = field(default_factory=dict)
    #: Set by the shutdown hook: no new requests; close with 1001 once idle.
    draining: bool = False
    #: Set once the socket is being closed (slow reader, drain, idle, shutdown).
    closing: bool = False
    #: loop.time() the client was last heard from (any frame, a pong): the heartbeat's clock.
    heard: float = field(default_factory=lambda: asyncio.get_running_loop().time())

    async def send(self, data: bytes) -> None:
        """One text frame.  A client that does not read is closed (1008) instead of being
        buffered for: the transport's queue is checked and each frame may wait only
        ``send_timeout_secs`` for room (aiohttp's writer waits for the transport to drain)."""
        if self.closing or self.ws.closed:
            raise ConnectionResetError("the WebSocket is closed")
        transport = self.transport
        if transport is not None:
            buffered = transport.get_write_buffer_size()
            if buffered > self.settings.max_buffered_bytes:
                self.shed(1008, "client is not reading")
                raise ConnectionResetError("the client is not reading")
        try:
            async with asyncio.timeout(self.settings.send_timeout_secs):
                await self.ws.send_frame(data, WSMsgType.TEXT)
        except TimeoutError:
            self.shed(1008, "client is not reading")
            raise ConnectionResetError("the client is not reading") from None

    def shed(self, code: int, reason: str) -> None:
        """Close the socket from a request's task (its reader loop then stops everything)."""
        if self.closing:
            return
        self.closing = True
        tasks = self.request.app[BACKGROUND]  # referenced until done; cancelled at cleanup
        task = asyncio.create_task(self.close(code, reason))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def close(self, code: int, reason: str) -> None:
        """Send the close frame (it queues behind what the client has not read yet), give a
        slow client ``CLOSE_GRACE_SECS`` to read up to it, then drop the transport."""
        self.closing = True
        deadline = asyncio.get_running_loop().time() + CLOSE_GRACE_SECS
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_GRACE_SECS):
                await self.ws.close(code=code, message=reason.encode(), drain=False)
        transport = self.transport
        if transport is None:
            return
        loop = asyncio.get_running_loop()
        # No public event says "buffer flushed": poll it, bounded by the grace deadline.
        while transport.get_write_buffer_size() and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if transport.get_write_buffer_size():
            transport.abort()  # a reader that never reads again

    def finished(self, rid: str, job: Job) -> None:
        """A request ended: forget it; a draining socket closes when its last one ends."""
        if self.jobs.get(rid) is job:
            del self.jobs[rid]
        if self.draining and not self.jobs:
            self.shed(1001, "server shutting down")

    async def stop(self) -> None:
        """The socket is over: cancel what runs (each writes its last frame if it still can)."""
        tasks = [job.task for job in self.jobs.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_GRACE_SECS)


#: Every open socket of the app, for the shutdown hook.
SOCKETS: web.AppKey[set[Socket]] = web.AppKey("websockets")


class Frames:
    """A request's :class:`~inference_server.streaming.Sink` on its socket."""

    __slots__ = ("cancelled", "done_sent", "sock")

    def __init__(self, sock: Socket) -> None:
        self.sock = sock
        #: The client cancelled this request (its stream ends with ``REQUEST_CANCELLED``).
        self.cancelled = False
        #: A terminal frame went out (done or error).
        self.done_sent = False

    def interrupted(self) -> GatewayError | None:
        if self.cancelled:
            return RequestCancelled("The request was cancelled by the client")
        if self.sock.closing or self.sock.ws.closed:
            return None  # the client is gone (or being dropped): nothing more is written
        return _shutting_down()

    async def end(self) -> None:
        return None

    async def send(self, obj: dict[str, Any]) -> None:
        raise NotImplementedError

    async def done(self, usage: dict[str, Any]) -> None:
        raise NotImplementedError

    async def error(self, err: GatewayError) -> None:
        raise NotImplementedError

    async def fail(self, err: GatewayError) -> None:
        """A request-level error (before or instead of a stream)."""
        await self.error(err)


class ChatFrames(Frames):
    """Chat envelope frames for one client id."""

    __slots__ = ("prefix", "rid")

    def __init__(self, sock: Socket, rid: str) -> None:
        super().__init__(sock)
        self.rid = rid
        # The chunk is dumped once and wrapped as bytes: no envelope dict per chunk.
        self.prefix = b'{"id":' + orjson.dumps(rid) + b',"chunk":'

    async def send(self, obj: dict[str, Any]) -> None:
        await self.sock.send(self.prefix + orjson.dumps(obj) + b"}")

    async def done(self, usage: dict[str, Any]) -> None:
        self.done_sent = True
        await self.sock.send(orjson.dumps({"id": self.rid, "done": True, "usage": usage}))

    async def error(self, err: GatewayError) -> None:
        self.done_sent = True
        frame = {"id": self.rid, "error": error_body(err)["error"]}
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await self.sock.send(orjson.dumps(frame))


class ResponseFrames(Frames):
    """Responses streaming events for one ``response.create`` (its lane echoed on each)."""

    __slots__ = ("lane",)

    def __init__(self, sock: Socket, lane: str) -> None:
        super().__init__(sock)
        self.lane = lane

    async def send(self, obj: dict[str, Any]) -> None:
        if self.lane:
            obj["stream_id"] = self.lane
        await self.sock.send(orjson.dumps(obj))

    async def done(self, usage: dict[str, Any]) -> None:
        self.done_sent = True

    async def error(self, err: GatewayError) -> None:
        self.done_sent = True
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await self.sock.send(orjson.dumps(error_event(err, self.lane)))


def error_event(err: GatewayError, lane: str = "") -> dict[str, Any]:
    """The Responses WebSocket mode's error event (``status`` + the OpenAI error object)."""
    event: dict[str, Any] = {
        "type": "error",
        "status": err.http_status,
        "error": error_body(err)["error"],
    }
    if lane:
        event["stream_id"] = lane
    return event


# --- the protocols ------------------------------------------------------------------------

#: One request's steps, given its clone of the upgrade request, its context and its body.
Run = Callable[[web.Request, RequestContext, dict[str, Any]], Awaitable[None]]


class Protocol:
    """What differs between the two endpoints: how frames are read and errors written."""

    endpoint: ClassVar[str]

    def socket_error(self, err: GatewayError) -> bytes:
        raise NotImplementedError

    def on_frame(self, sock: Socket, frame: dict[str, Any], large: bool) -> Job | None:
        raise NotImplementedError


async def _respond(
    request: web.Request,
    ctx: RequestContext,
    lease: Lease,
    body: dict[str, Any],
    result: Any,
    *,
    sink: Frames,
) -> web.StreamResponse:
    """Step 6 on a socket: relay the opened stream onto the request's frames."""
    first, chunks = result  # a socket always streams (ctx.stream is set)
    return await stream(request, ctx, lease, body, first, chunks, sink=sink)


async def validated(
    validate: Callable[[Any], dict[str, Any]], body: dict[str, Any], large: bool
) -> dict[str, Any]:
    """``validate(body)``, on a worker thread for a large frame (marshmallow on a megabyte
    body would hold the event loop for every other socket and request)."""
    if large:
        return await asyncio.get_running_loop().run_in_executor(None, validate, body)
    return validate(body)


async def serve_chat(
    request: web.Request, ctx: RequestContext, body: dict[str, Any], sink: Frames, large: bool
) -> None:
    """One chat request: POST /v1/chat/completions' steps, always streamed."""
    with ctx.runtime.telemetry.span("inference.validate"):
        body = await validated(validate_chat, body, large)
    body["stream"] = True
    ctx.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    if ctx.runtime.cache is not None:
        ctx.cache = "bypass"  # a hit is an HTTP replay; sockets do not use the cache (yet)
    await serve(request, body, CHAT, partial(_respond, sink=sink), stream=True)


async def serve_response(
    request: web.Request, ctx: RequestContext, body: dict[str, Any], sink: Frames, job: Job
) -> None:
    """One ``response.create``: POST /v1/responses' steps, always streamed, FIFO per lane."""
    sock = sink.sock
    lock = sock.lanes.setdefault(job.lane, asyncio.Lock())
    try:
        async with lock:
            with ctx.runtime.telemetry.span("inference.validate"):
                if body.get("background"):
                    raise InvalidRequest(
                        "background responses are not supported over a WebSocket",
                        param="background",
                    )
                body.pop("stream", None)  # implicit over a socket
                body = await validated(validate_responses, body, job.large)
            body["stream"] = True
            turn, op = await prepare(request, body, sock.recent)
            job.response_id = turn.rid
            await serve(request, body, op, partial(turn.respond, sink=sink), stream=True)
    finally:
        # The lane's lock goes with its last request (lanes are the client's names: bounded
        # by what is in flight, not by what was ever used).
        if not any(j.lane == job.lane and j is not job for j in sock.jobs.values()):
            sock.lanes.pop(job.lane, None)


class ChatProtocol(Protocol):
    """``{"id", "body"}`` / ``{"id", "cancel": true}`` in; chunk, done and error frames out."""

    endpoint = "/v1/chat/completions"

    def socket_error(self, err: GatewayError) -> bytes:
        return orjson.dumps({"id": None, "error": error_body(err)["error"]})

    def on_frame(self, sock: Socket, frame: dict[str, Any], large: bool) -> Job | None:
        rid = frame.get("id")
        if not isinstance(rid, str) or not _ID.fullmatch(rid):
            raise InvalidRequest(
                "A frame needs an 'id': 1-256 letters, digits or _ . : -", param="id"
            )
        if frame.get("cancel") is True:
            job = sock.jobs.get(rid)
            if job is not None:  # an id already finished: nothing to do
                job.sink.cancelled = True
                job.task.cancel()
            return None
        body = frame.get("body")
        if not isinstance(body, dict):
            raise InvalidRequest(
                "Unknown frame: expected {'id', 'body': {chat request}} or {'id', 'cancel': true}",
                param="body",
            )
        if rid in sock.jobs:
            raise InvalidRequest(f"Request id '{rid}' is already in flight", param="id")
        sink = ChatFrames(sock, rid)
        return start(
            sock,
            rid,
            sink,
            lambda job: partial(serve_chat, sink=sink, large=job.large),
            body,
            self.endpoint,
            large=large,
        )


class ResponsesProtocol(Protocol):
    """OpenAI's Responses WebSocket mode: ``response.create`` / ``response.cancel``."""

    endpoint = "/v1/responses"

    def __init__(self) -> None:
        self.count = 0

    def socket_error(self, err: GatewayError) -> bytes:
        return orjson.dumps(error_event(err))

    def on_frame(self, sock: Socket, frame: dict[str, Any], large: bool) -> Job | None:
        kind = frame.pop("type", None)
        lane = frame.pop("stream_id", None)
        if lane is not None and (not isinstance(lane, str) or not _ID.fullmatch(lane)):
            raise InvalidRequest(
                "stream_id must be 1-256 letters, digits or _ . : -", param="stream_id"
            )
        lane = lane or ""
        if kind == "response.cancel":
            target = frame.get("response_id")
            for job in list(sock.jobs.values()):
                if (target is None or job.response_id == target) and (not lane or job.lane == lane):
                    job.sink.cancelled = True
                    job.task.cancel()
            return None
        if kind != "response.create":
            shown = kind if isinstance(kind, str) and len(kind) <= 64 else "?"
            raise InvalidRequest(
                f"Unsupported event type '{printable(shown)}': send response.create or "
                "response.cancel",
                param="type",
            )
        self.count += 1
        key = f"{self.count}"
        sink = ResponseFrames(sock, lane)
        return start(
            sock,
            key,
            sink,
            lambda job: partial(serve_response, sink=sink, job=job),
            frame,
            self.endpoint,
            lane=lane,
            large=large,
        )


def start(
    sock: Socket,
    key: str,
    sink: Frames,
    runner: Callable[[Job], Run],
    body: dict[str, Any],
    endpoint: str,
    *,
    lane: str = "",
    large: bool = False,
) -> Job:
    """Check the socket's limits and start one request as its own task (``runner`` gives what
    runs it, given its job)."""
    if sock.draining or sock.closing:
        raise _refused()
    if len(sock.jobs) >= sock.settings.max_in_flight:
        raise TooManyInFlight(
            f"This socket has {len(sock.jobs)} requests in flight, the limit "
            f"(websocket.max_in_flight); wait for one to finish",
            retry_after=1,
        )
    job = Job(task=None, sink=sink, lane=lane, large=large)  # type: ignore[arg-type]  # set below
    job.task = asyncio.create_task(run_request(sock, sink, runner(job), body, endpoint))
    sock.jobs[key] = job
    job.task.add_done_callback(lambda _: sock.finished(key, job))
    return job


def _refused() -> ServiceUnavailable:
    return ServiceUnavailable("The server is shutting down; open a new connection", retry_after=1)


async def run_request(
    sock: Socket,
    sink: Frames,
    run: Run,
    body: dict[str, Any],
    endpoint: str,
) -> None:
    """One request on a socket, recorded like an HTTP request (the middleware's work: request
    id, server span, metrics, access and slow-request lines)."""
    upgrade = sock.request
    # Each request takes the runtime snapshot current when it starts (a socket may outlive a
    # hot reload; its requests then use the new settings, as new HTTP requests do).
    runtime = upgrade.app[RUNTIME].current
    ctx = RequestContext(request_id=new_request_id(), endpoint=endpoint, runtime=runtime)
    upstream_ctx = upgrade.get(CTX)
    if upstream_ctx is not None:  # the key authenticated on the upgrade
        ctx.api_key, ctx.key_name = upstream_ctx.api_key, upstream_ctx.key_name
    request = upgrade.clone()
    request[CTX] = ctx
    telemetry = runtime.telemetry
    metrics = runtime.metrics
    metrics.request_started(endpoint)
    scope_token = logs.REQUEST_ID.set(ctx.request_id)
    try:
        with (
            telemetry.server_span(
                "WS " + endpoint,
                upgrade.headers,
                {"http.request.method": "WS", "url.path": endpoint},
            )
            if telemetry.enabled
            else NO_SPAN as span
        ):
            ids = logs.span_ids(span)
            if ids is not None:
                ctx.set_trace(*ids)
                if not span.is_recording():  # type: ignore[union-attr]
                    telemetry.inject(ctx.trace_headers, span)
            await _run(sock, request, ctx, sink, run, body)
            telemetry.finish_request(span, ctx, ctx.status or 200)
    finally:
        if ctx.status is None:
            ctx.status = 200
        record(ctx, "WS", endpoint)
        logs.REQUEST_ID.reset(scope_token)


async def _run(
    sock: Socket,
    request: web.Request,
    ctx: RequestContext,
    sink: Frames,
    run: Run,
    body: dict[str, Any],
) -> None:
    """Run the request; any error before its stream becomes its error frame."""
    err: GatewayError | None
    try:
        await run(request, ctx, body)
        return
    except asyncio.CancelledError:
        # Cancelled by the client, a disconnect, a slow-reader close or the shutdown deadline.
        # A stream that started wrote its own last frames (the relay); otherwise say why, if
        # anyone still listens.
        if sink.done_sent or ctx.first_token_secs is not None:
            ctx.error_code = ctx.error_code or "CLIENT_DISCONNECTED"
            return
        ctx.status = 499
        err = sink.interrupted()
        if err is None:
            ctx.error_code = "CLIENT_DISCONNECTED"
            return
    except GatewayError as exc:
        err = exc
    except Exception:
        ctx.log.exception("unhandled error on a WebSocket request")
        err = GatewayError("Internal server error")
    ctx.runtime.settings.scrubber.scrub_error(err)
    ctx.error_code = err.code
    ctx.status = err.http_status
    if err.http_status >= 500:
        ctx.log.warning("{} ({}): {}", err.http_status, err.code, err.message)
    if not sink.done_sent:
        await sink.fail(err)


# --- the handlers -------------------------------------------------------------------------


async def chat_socket(request: web.Request) -> web.StreamResponse:
    """GET /v1/chat/completions with an upgrade: multiplexed chat streams."""
    return await run_socket(request, ChatProtocol())


async def responses_socket(request: web.Request) -> web.StreamResponse:
    """GET /v1/responses with an upgrade: the Responses API's WebSocket mode."""
    return await run_socket(request, ResponsesProtocol())


def check_origin(request: web.Request) -> None:
    """A browser's upgrade (it always sends ``Origin``) only from ``server.cors.allow_origins``.

    WebSockets are outside CORS: without this, any web page a user opens could drive a gateway
    on their machine (with auth off) through their browser.  Clients that are not browsers send
    no ``Origin`` and are not affected."""
    origin = request.headers.get("Origin")
    if origin is None:
        return
    allowed = request.app[SETTINGS].tenancy.cors_origins
    if "*" in allowed or (len(origin) <= 512 and origin in allowed):
        return
    raise OriginNotAllowed(
        f"WebSocket connections from origin '{printable(origin[:100])}' are not allowed "
        "(server.cors.allow_origins)",
    )


def _subprotocols(request: web.Request) -> tuple[str, ...]:
    """The subprotocol to echo: a browser that offers any must get one of them back.  Another
    offered name first (the key is not echoed when avoidable), else the key's own."""
    offered = offered_protocols(request.headers)
    plain = [p for p in offered if not p.startswith(KEY_PROTOCOL) and len(p) <= 64]
    chosen = plain[:1] or offered[:1]
    return tuple(chosen)


async def run_socket(request: web.Request, protocol: Protocol) -> web.StreamResponse:
    """Upgrade, then read frames until the socket ends; every request it started ends too."""
    settings = request.app[SETTINGS].websocket
    ws = web.WebSocketResponse(
        autoping=False,  # pings and pongs are ours: see heartbeat()
        max_msg_size=settings.max_message_bytes,
        compress=False,  # per-message deflate costs CPU per chunk and hides the buffer size
        protocols=_subprotocols(request),
        timeout=CLOSE_GRACE_SECS,
    )
    if not ws.can_prepare(request).ok:
        raise MethodNotAllowed(
            f"GET {protocol.endpoint} is a WebSocket upgrade; use POST for a plain HTTP request",
        )
    check_origin(request)
    await ws.prepare(request)
    sock = Socket(request, ws, settings, request.transport)
    sockets = request.app[SOCKETS]
    sockets.add(sock)
    loop = asyncio.get_running_loop()
    beat = asyncio.create_task(heartbeat(sock)) if settings.heartbeat_secs else None
    idle = settings.idle_timeout_secs
    last_frame = loop.time()  # pings and pongs do not count: idle means no requests
    try:
        while not sock.closing:
            try:
                msg = await ws.receive(timeout=max(0.0, last_frame + idle - loop.time()))
            except TimeoutError:
                if sock.jobs:
                    last_frame = loop.time()
                    continue
                await sock.close(1000, "idle timeout")
                break
            kind = msg.type
            if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
                sock.heard = last_frame = loop.time()
                await _frame(sock, protocol, msg.data, loop)
            elif kind is WSMsgType.PONG:
                sock.heard = loop.time()
            elif kind is WSMsgType.PING:
                sock.heard = loop.time()
                with contextlib.suppress(ConnectionResetError, RuntimeError):
                    await ws.pong(msg.data)
            else:  # CLOSE / CLOSING / CLOSED / ERROR (an oversized frame: aiohttp sent 1009)
                break
    finally:
        if beat is not None:
            beat.cancel()
        sockets.discard(sock)
        shutting = sock.draining
        await sock.stop()
        if not ws.closed:
            await sock.close(1001 if shutting else 1000, "server shutting down" if shutting else "")
    return ws


async def heartbeat(sock: Socket) -> None:
    """Ping every ``heartbeat_secs``; a client silent for 1.5 intervals (no pong, no frame) is
    gone: close it (1011), which cancels its requests.

    Not aiohttp's own ``heartbeat``: once shutdown starts aiohttp reads nothing more from any
    connection, so no pong can arrive, and its heartbeat would cut streams that may still
    finish within the shutdown deadline.  While draining this one only stops checking.
    """
    interval = sock.settings.heartbeat_secs
    loop = asyncio.get_running_loop()
    while not sock.closing:
        await asyncio.sleep(interval)
        if sock.draining:
            continue
        if loop.time() - sock.heard > 1.5 * interval:
            sock.shed(1011, "no pong")
            return
        try:
            async with asyncio.timeout(sock.settings.send_timeout_secs):
                await sock.ws.ping()
        except TimeoutError:
            sock.shed(1008, "client is not reading")
            return
        except (ConnectionResetError, RuntimeError):
            return


async def _frame(
    sock: Socket, protocol: Protocol, data: str | bytes, loop: asyncio.AbstractEventLoop
) -> None:
    """One client frame: parsed (off the loop when large), then the protocol's; a bad frame
    gets an error frame and the socket goes on."""
    try:
        raw = data.encode() if isinstance(data, str) else data
        if len(raw) > OFFLOAD_BYTES:
            frame = await loop.run_in_executor(None, parse, raw)
        else:
            frame = parse(raw)
        if not isinstance(frame, dict):
            raise InvalidRequest("A frame must be a JSON object", code="INVALID_JSON")
        protocol.on_frame(sock, frame, len(raw) > OFFLOAD_BYTES)
    except GatewayError as err:
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await sock.send(protocol.socket_error(err))


async def drain_sockets(app: web.Application) -> None:
    """on_shutdown: sockets take no new requests and close (1001) once their last one ends;
    idle ones close now.  Whatever still runs at the deadline is cut by ``cut_at_deadline``."""
    sockets = app[SOCKETS]
    for sock in list(sockets):
        sock.draining = True
        if not sock.jobs:
            sock.shed(1001, "server shutting down")
    if sockets:
        logger.info("shutdown: {} WebSocket(s) finishing their requests", len(sockets))


def install(app: web.Application) -> None:
    """Routes and the shutdown hook (nothing when ``websocket.enabled`` is false)."""
    if not app[SETTINGS].websocket.enabled:
        return
    app[SOCKETS] = set()
    app.router.add_get("/v1/chat/completions", chat_socket)
    app.router.add_get("/v1/responses", responses_socket)
    app.on_shutdown.append(drain_sockets)
