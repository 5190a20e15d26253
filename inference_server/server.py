"""Serving one worker: the listening socket, the connection layer aiohttp does not have, and
the shutdown deadline for every request in flight.

aiohttp (3.14) has no header-read timeout, no body-read timeout and no connection cap, and it
answers protocol errors (a bad request line, a header over the limit) with plain text that echoes
what the client sent.  This module adds those through public API only:

- :class:`ProtocolFactory` wraps the app's ``web.Server`` (``AppRunner.server``, the public
  protocol factory) for ``loop.create_server``: over ``server.max_connections`` a connection
  gets a minimal JSON 503 and is closed; every other one gets a :class:`GatewayRequestHandler`
  (a ``web.RequestHandler``) that closes a connection whose request line and headers are not
  complete ``server.header_timeout_secs`` after its first byte (or after it opened), and renders
  protocol errors as the OpenAI error envelope without echoing request bytes.
- :func:`read_body` reads a request body under an idle (per chunk) and a total timeout and
  raises :class:`RequestTimeout` (408) when either expires, so a stalled body cannot hold a
  connection for ever.
- ``middlewares.error_envelope`` (tracking every handler task) and :func:`cut_at_deadline` (``on_shutdown``) make
  sure every request still running just before ``server.shutdown_timeout_secs`` gets an answer:
  a 503 JSON if nothing was sent yet, the in-band error event if it is a stream.
- :func:`local_resource_error` tells a local resource failure (out of file descriptors, memory,
  ephemeral ports) apart from an unreachable provider, so it is not blamed on the provider.
- :class:`Listener` binds first, starts the app, listens, and says "listening" only then.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import orjson
from aiohttp import http_exceptions, web
from loguru import logger

from inference_server.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    LocalResourceExhausted,
    RequestTimeout,
    RequestTooLarge,
    error_body,
)
from inference_server.keys import IN_FLIGHT, RUNTIME, SETTINGS
from inference_server.middlewares import error_response, new_request_id
from inference_server.settings import ServerSettings

# --- request bodies ------------------------------------------------------------------------


async def read_body(
    request: web.BaseRequest, *, max_bytes: int, total_secs: float, idle_secs: float
) -> bytes:
    """The whole request body, read under an idle (per chunk) and a total timeout.

    aiohttp has no body-read timeout: a client that sends headers and then stalls or trickles
    its body would hold the handler and its connection for ever.  A ``Content-Length`` over
    ``max_bytes`` is refused before reading anything (also without ``100 Continue``); a body that
    grows past it while read is refused too (reading ``request.content`` bypasses aiohttp's own
    ``client_max_size`` check).  Raises :class:`RequestTimeout` (408) or ``RequestTooLarge``
    (413).  The common case, a body already received whole, costs no timer at all.
    """
    length = request.content_length
    if length is not None and length > max_bytes:
        raise RequestTooLarge(f"Request body too large: the limit is {max_bytes} bytes")
    content = request.content
    if content.is_eof():  # everything arrived with the headers: no waiting, no timers
        body = content.read_nowait()
        if len(body) > max_bytes:
            raise RequestTooLarge(f"Request body too large: the limit is {max_bytes} bytes")
        return body
    parts: list[bytes] = []
    size = 0
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(loop.time() + total_secs) as total:
            while True:
                async with asyncio.timeout(idle_secs):
                    chunk = await content.readany()
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise RequestTooLarge(f"Request body too large: the limit is {max_bytes} bytes")
                parts.append(chunk)
    except TimeoutError:
        if total.expired():
            raise RequestTimeout(
                f"The request body was not received within {total_secs:g} s"
            ) from None
        raise RequestTimeout(
            f"The request body stalled: nothing received for {idle_secs:g} s"
        ) from None
    return b"".join(parts)


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """Route ``expect_handler``: ``100 Continue`` only for a body the gateway would accept.

    A ``Content-Length`` over ``client_max_size`` gets no ``100 Continue``; the request then goes
    on to ``middlewares.error_envelope``, which answers 413 without reading the body.  Any other
    ``Expect`` value gets 417 (as aiohttp's default handler does, but as the JSON envelope).
    """
    expect = request.headers.get("Expect", "")
    settings = request.app[SETTINGS].server
    if expect.lower() != "100-continue":
        err = InvalidRequest(
            "Unsupported Expect header (only 100-continue)", code="EXPECTATION_FAILED", status=417
        )
        return error_response(err, settings.error_format)
    length = request.content_length
    if length is not None and length > settings.max_body_bytes:
        return None
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    return None


# --- the shutdown deadline for every request -----------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def cut_at_deadline(app: web.Application, deadline_secs: float) -> None:
    """``on_shutdown``: cancel every request still running just before the deadline.

    aiohttp waits ``shutdown_timeout`` for handlers, then cancels them and closes their sockets
    in the same tick (and may wait a second ``shutdown_timeout`` for them), which cut requests
    with a bare disconnect well after the deadline.  Cancelling them a margin earlier ourselves
    lets each one answer (see ``middlewares.error_envelope``) within the deadline.
    """
    state = app[IN_FLIGHT]
    margin = min(0.5, deadline_secs / 10)

    def cut() -> None:
        state.cut = True
        for task in tuple(state.tasks):
            task.cancel()

    if state.tasks:
        asyncio.get_running_loop().call_later(max(0.0, deadline_secs - margin), cut)


# --- the connection layer ------------------------------------------------------------------

#: After a response, how long an unread request body is drained before the socket closes
#: (aiohttp's default is 10 s; a stalled client would hold the connection that long).
LINGERING_SECS = 2.0
#: How long a refused (over-capacity) connection may take to read its 503 before it is closed.
REFUSE_LINGER_SECS = 1.0
#: File descriptors kept free for upstream connections, logs and metrics when the connection
#: cap is derived from RLIMIT_NOFILE.
_FD_RESERVE = 64


def derived_max_connections(configured: int | None) -> int:
    """``server.max_connections``, or half the free file descriptors when it is null.

    Each proxied request holds a client and an upstream socket, so half the descriptors left
    after a reserve keeps ``accept`` from ever failing with EMFILE (which aiohttp would log
    and retry, and which an upstream connect would report as a provider failure).
    """
    if configured is not None:
        return configured
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(16, (soft - _FD_RESERVE) // 2)


def _raw_response(status: int, reason: str, err: GatewayError, error_format: str) -> bytes:
    """A complete HTTP/1.1 response with the JSON error body, closing the connection."""
    body = orjson.dumps(error_body(err, "legacy" if error_format == "legacy" else "openai"))
    fields = {**err.response_headers(), "x-request-id": new_request_id()}
    headers = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{headers}Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


@dataclass(slots=True)
class Limits:
    """What the connection layer enforces (from :class:`ServerSettings`)."""

    header_timeout_secs: float
    keepalive_timeout_secs: float
    max_connections: int
    error_format: str

    @classmethod
    def from_settings(cls, server: ServerSettings) -> Limits:
        return cls(
            header_timeout_secs=server.header_timeout_secs,
            keepalive_timeout_secs=server.keepalive_timeout_secs,
            max_connections=derived_max_connections(server.max_connections),
            error_format=server.error_format,
        )


class _Refuse(asyncio.Protocol):
    """An over-capacity connection: write the 503, half-close, drain briefly, close."""

    def __init__(self, response: bytes, loop: asyncio.AbstractEventLoop) -> None:
        self._response = response
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        transport.write(self._response)
        # Half-close and read what the client still sends, so its request does not meet a
        # closed socket (a reset could destroy the 503 before the client reads it).
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = self._loop.call_later(REFUSE_LINGER_SECS, transport.close)

    def data_received(self, data: bytes) -> None:
        return None  # discarded

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


_PROTOCOL_ERROR_CODES: dict[type[BaseException], tuple[str, str]] = {
    http_exceptions.LineTooLong: (
        "HEADER_TOO_LARGE",
        "The request line or a header is too large",
    ),
    http_exceptions.BadStatusLine: ("MALFORMED_REQUEST", "Malformed HTTP request line"),
    http_exceptions.InvalidHeader: ("MALFORMED_REQUEST", "Malformed HTTP header"),
}


def protocol_error(status: int, exc: BaseException | None) -> GatewayError:
    """The gateway error for a request aiohttp could not parse or handle (never echoing bytes)."""
    if status == 500:
        return InternalError("Internal server error")
    if status == 504:
        return InternalError("The request handler timed out", code="GATEWAY_TIMEOUT", status=504)
    for cls, (code, message) in _PROTOCOL_ERROR_CODES.items():
        if isinstance(exc, cls):
            return InvalidRequest(message, code=code, status=status)
    if isinstance(exc, http_exceptions.BadHttpMessage) and "header" in str(exc).lower():
        return InvalidRequest("Too many or malformed headers", code="HEADER_TOO_LARGE")
    return InvalidRequest("Malformed HTTP request", code="MALFORMED_REQUEST", status=status)


class GatewayRequestHandler(web.RequestHandler):
    """aiohttp's connection protocol plus a header-read timeout and JSON protocol errors.

    The header clock runs while the connection waits for a complete request line and headers:
    from the moment it opens, and again from the first byte of each further request.  It stops
    when a request starts (see :meth:`ProtocolFactory.request_factory`).  The factory's sweep
    (:meth:`ProtocolFactory.sweep`, a few times per timeout, one timer per worker) expires a
    connection whose clock ran past ``server.header_timeout_secs``: the client gets a 408 JSON
    if it sent anything, and the connection closes.  No timer is made per request.
    """

    def __init__(self, manager: web.Server, *, factory: ProtocolFactory, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._gw_factory = factory
        #: loop.time() since when a request's headers are awaited (None: in a request, or idle
        #: between requests, which is keep-alive's to bound).
        self._gw_since: float | None = None
        self._gw_in_request = False
        self._gw_partial = False
        self._gw_counted = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._gw_since = self._gw_factory.now()
        self._gw_factory.handlers.add(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._gw_since = None
        factory = self._gw_factory
        factory.handlers.discard(self)
        if self._gw_counted:
            self._gw_counted = False
            factory.open_connections -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._gw_in_request:
            self._gw_partial = True
            if self._gw_since is None:
                self._gw_since = self._gw_factory.now()
        super().data_received(data)

    def request_started(self) -> None:
        """A complete request line and headers arrived: the header clock stops."""
        self._gw_in_request = True
        self._gw_partial = False
        self._gw_since = None

    def log_access(
        self, request: web.BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        """aiohttp calls this once each response is complete: the request is over."""
        self._gw_in_request = False
        super().log_access(request, response, time)

    def request_finished(self) -> None:
        self._gw_in_request = False

    def header_overdue(self, now: float, timeout: float) -> bool:
        since = self._gw_since
        return since is not None and not self._gw_in_request and now - since >= timeout

    def expire_headers(self) -> None:
        self._gw_since = None
        transport = self.transport
        if self._gw_in_request or transport is None or transport.is_closing():
            return
        # A 408 only on a quiet connection: a previous response still in the write buffer
        # (a client that does not read) must not get bytes spliced into it; it is just closed.
        if self._gw_partial and transport.get_write_buffer_size() == 0:
            limits = self._gw_factory.limits
            err = RequestTimeout(
                f"Request headers not received within {limits.header_timeout_secs:g} s"
            )
            transport.write(_raw_response(408, "Request Timeout", err, limits.error_format))
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Protocol errors as the JSON envelope; the client's bytes are never echoed or logged."""
        self.request_finished()
        err = protocol_error(status, exc)
        if status >= 500:
            self.log_exception("Error handling request", exc_info=exc)
        else:
            logger.debug("protocol error {} ({}): {}", status, err.code, type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        fmt = self._gw_factory.limits.error_format
        rid = new_request_id()  # every response has one, even one no handler saw
        logger.debug("protocol error {} ({}) answered as request {}", status, err.code, rid)
        resp = web.Response(
            status=err.http_status,
            body=orjson.dumps(error_body(err, "legacy" if fmt == "legacy" else "openai")),
            content_type="application/json",
            headers={**err.response_headers(), "x-request-id": rid},
        )
        resp.force_close()
        return resp


class ProtocolFactory:
    """The protocol factory given to ``loop.create_server``: a connection cap in front of
    ``web.Server``, and a :class:`GatewayRequestHandler` per accepted connection.

    It hooks the server's public ``request_factory`` to learn when a request starts on a
    connection (``log_access`` tells when it ended): the header clock's on/off switch.
    """

    #: Keyword arguments of every ``RequestHandler`` (explicit: a typo here would make aiohttp
    #: fall back to its defaults silently, so the tests assert them).
    HANDLER_DEFAULTS: ClassVar[dict[str, Any]] = {
        "access_log": None,  # our access line comes from middlewares.request_context
        "lingering_time": LINGERING_SECS,
        "max_line_size": 8190,
        "max_field_size": 8190,
        "max_headers": 128,
    }

    def __init__(self, server: web.Server, limits: Limits) -> None:
        self.server = server
        self.limits = limits
        self.open_connections = 0
        self.refused = 0
        self._loop = asyncio.get_running_loop()
        self.now = self._loop.time
        #: Live connections (the sweep's list).
        self.handlers: set[GatewayRequestHandler] = set()
        over = LocalResourceExhausted(
            f"Too many connections to this worker (limit {limits.max_connections}); retry shortly"
        )
        self._over = over
        make_request = server.request_factory

        def request_factory(
            message: Any, payload: Any, protocol: Any, writer: Any, task: Any
        ) -> web.BaseRequest:
            if isinstance(protocol, GatewayRequestHandler):
                protocol.request_started()
            return make_request(message, payload, protocol, writer, task)

        server.request_factory = request_factory
        # A few sweeps per timeout: a connection is expired within 1.25 × the timeout.
        self._sweep_every = min(1.0, limits.header_timeout_secs / 4)
        self._sweeper: asyncio.TimerHandle | None = self._loop.call_later(
            self._sweep_every, self.sweep
        )

    def sweep(self) -> None:
        """Expire connections whose request headers are overdue (one timer per worker)."""
        now = self.now()
        timeout = self.limits.header_timeout_secs
        for handler in [h for h in self.handlers if h.header_overdue(now, timeout)]:
            handler.expire_headers()
        self._sweeper = self._loop.call_later(self._sweep_every, self.sweep)

    def close(self) -> None:
        """Stop sweeping (the listener is shutting down)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def __call__(self) -> asyncio.BaseProtocol:
        if self.open_connections >= self.limits.max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                logger.warning(
                    "connection cap reached ({} open): refused {} connection(s) with 503",
                    self.open_connections,
                    self.refused,
                )
            refusal = _raw_response(
                503, "Service Unavailable", self._over, self.limits.error_format
            )
            return _Refuse(refusal, self._loop)
        self.open_connections += 1
        return GatewayRequestHandler(
            self.server,
            factory=self,
            loop=self._loop,
            keepalive_timeout=self.limits.keepalive_timeout_secs,
            **self.HANDLER_DEFAULTS,
        )


# --- the listener --------------------------------------------------------------------------


class BindError(Exception):
    """The address cannot be bound (busy port, bad interface): a one-line start-up failure."""


def bind_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A bound (not yet listening) TCP socket; :class:`BindError` with one clear line if not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise BindError(f"cannot resolve {host!r}: {exc.strerror or exc}") from None
    family, socktype, proto, _name, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason = "the port is already in use"
        raise BindError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.setblocking(False)
    return sock


class Listener:
    """One worker's server: bind, start the app, listen; stop within the shutdown deadline."""

    def __init__(self, app: web.Application, server: ServerSettings, *, reuse_port: bool) -> None:
        self.app = app
        self.settings = server
        self.reuse_port = reuse_port
        self.runner = web.AppRunner(
            app,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=server.shutdown_timeout_secs,
        )
        self.factory: ProtocolFactory | None = None
        self._server: asyncio.Server | None = None
        self.port = server.port

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind (unless given a bound socket), start the app, listen (BindError if it cannot)."""
        if sock is None:
            sock = bind_socket(self.settings.host, self.settings.port, reuse_port=self.reuse_port)
        self.port = sock.getsockname()[1]
        try:
            await self.runner.setup()
            server = self.runner.server
            assert server is not None
            self.factory = ProtocolFactory(server, Limits.from_settings(self.settings))
            self._server = await asyncio.get_running_loop().create_server(
                self.factory, sock=sock, backlog=1024
            )
        except BaseException:
            sock.close()
            await self.runner.cleanup()
            raise

    async def stop(self) -> None:
        """Stop accepting, then aiohttp's graceful shutdown (deadline: see cut_at_deadline)."""
        if self._server is not None:
            self._server.close()
        await self.runner.cleanup()
        if self.factory is not None:
            self.factory.close()


async def drain(app: web.Application, delay_secs: float, stop: asyncio.Event) -> None:
    """Readiness drops first (issue 16): ``/health/ready`` answers 503 while the listener
    still serves for ``delay_secs``, so a load balancer polling it stops sending new requests
    before connections are refused."""
    app[RUNTIME].draining = True
    if delay_secs <= 0:
        return
    logger.info("draining: /health/ready fails for {:g} s before the listener closes", delay_secs)
    stop.clear()  # a second SIGTERM/SIGINT ends the wait early
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(delay_secs):
            await stop.wait()


#: How often a supervised worker checks that its supervisor is still alive.
PARENT_CHECK_SECS = 1.0


async def serve(
    app: web.Application,
    server: ServerSettings,
    *,
    reuse_port: bool,
    on_ready: Callable[[], None] | None = None,
    banner: Callable[[int], None] | None = None,
    parent_pid: int | None = None,
    on_hangup: Callable[[], None] | None = None,
) -> None:
    """Run one worker until SIGTERM/SIGINT; BindError before anything started if it cannot bind.

    With ``parent_pid`` (a supervised worker) it also stops, gracefully, when that process is
    gone (its parent pid changes), so a supervisor killed with SIGKILL leaves no orphan holding
    the port.  ``on_hangup`` is called on SIGHUP (the hot reload).  On a stop, ``/health/ready``
    fails for ``server.drain_delay_secs`` while the listener still serves, then it closes.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    listener = Listener(app, server, reuse_port=reuse_port)
    await listener.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_hangup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    watch: asyncio.TimerHandle | None = None

    def check_parent() -> None:
        nonlocal watch
        if os.getppid() != parent_pid:
            logger.warning("the supervisor (pid {}) is gone: stopping", parent_pid)
            stop.set()
        else:
            watch = loop.call_later(PARENT_CHECK_SECS, check_parent)

    if parent_pid is not None:
        watch = loop.call_later(PARENT_CHECK_SECS, check_parent)
    if banner is not None:
        banner(listener.port)
    if on_ready is not None:
        on_ready()
    try:
        await stop.wait()
        await drain(app, server.drain_delay_secs, stop)
        logger.info(
            "shutting down: in-flight requests get up to {} s", server.shutdown_timeout_secs
        )
    finally:
        if watch is not None:
            watch.cancel()
        await listener.stop()
