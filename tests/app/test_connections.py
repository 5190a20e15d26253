"""The connection layer over real sockets: slow clients, the connection cap, protocol errors as
JSON, ``Expect: 100-continue``, body-read timeouts, the shutdown deadline, the upstream pool.

Each test runs the real app behind ``server.Listener`` (the production protocol factory) on a
free loopback port and speaks raw HTTP/1.1, so what the client sees on the wire is asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from inference_server.app import create_app, pool_keepalive
from inference_server.errors import GatewayError, LocalResourceExhausted, local_resource_error
from inference_server.keys import HTTP_SESSION
from inference_server.middlewares import error_response
from inference_server.server import (
    LINGERING_SECS,
    GatewayRequestHandler,
    Listener,
    ProtocolFactory,
    bind_socket,
    read_body,
)
from inference_server.settings import Settings
from tests.conftest import SettingsFactory
from tests.support.fake_upstream import Action, FakeUpstream

Start = Callable[..., Awaitable[Listener]]


@pytest.fixture
async def start(
    make_settings: SettingsFactory, fake_upstream: FakeUpstream
) -> AsyncIterator[Start]:
    """Start the gateway behind the production listener with ``server`` settings overrides."""
    listeners: list[Listener] = []

    async def make(**server: Any) -> Listener:
        settings: Settings = make_settings(
            {"inference": {"base_url": fake_upstream.base_url}, "server": server}
        )
        listener = Listener(create_app(settings), settings.server, reuse_port=False)
        await listener.start(bind_socket("127.0.0.1", 0, reuse_port=False))
        listeners.append(listener)
        return listener

    yield make
    for listener in listeners:
        await listener.stop()


async def connect(listener: Listener) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", listener.port)


async def shut(writer: asyncio.StreamWriter) -> None:
    """Close a client connection and wait until it is closed (no leaked transports)."""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader, timeout: float = 5) -> tuple[int, bytes]:
    """Read one response (status, body) that ends with the connection (Connection: close)."""
    raw = await asyncio.wait_for(reader.read(), timeout)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), raw[:200]
    return int(head.split()[1]), body


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes; fails if it is still open after timeout."""
    return await asyncio.wait_for(reader.read(), timeout)


def envelope(body: bytes) -> dict[str, Any]:
    err: dict[str, Any] = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()


# --- header-read timeout -------------------------------------------------------------------


async def test_stalled_headers_get_408_and_the_connection_closes(start: Start) -> None:
    listener = await start(header_timeout_secs=0.3)
    reader, writer = await connect(listener)
    began = time.monotonic()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and then nothing
    status, body = await read_response(reader)
    assert status == 408
    assert envelope(body)["code"] == "REQUEST_TIMEOUT"
    assert 0.25 <= time.monotonic() - began < 2
    await shut(writer)


async def test_trickled_headers_do_not_extend_the_header_timeout(start: Start) -> None:
    listener = await start(header_timeout_secs=0.4)
    reader, writer = await connect(listener)
    began = time.monotonic()
    writer.write(b"GET / HTTP/1.1\r\n")

    async def trickle() -> None:
        for _ in range(40):  # one header byte every 50 ms: 2 s if never cut
            writer.write(b"X")
            await asyncio.sleep(0.05)

    trickler = asyncio.create_task(trickle())
    status, _body = await read_response(reader)
    trickler.cancel()
    assert status == 408
    assert time.monotonic() - began < 1.5
    await shut(writer)


async def test_a_connection_that_sends_nothing_is_closed(start: Start) -> None:
    listener = await start(header_timeout_secs=0.3)
    reader, writer = await connect(listener)
    assert await closed_within(reader, 3) == b""  # closed, no response: it asked nothing
    await shut(writer)


async def test_the_header_timer_runs_again_for_a_second_request(start: Start) -> None:
    listener = await start(header_timeout_secs=0.3)
    reader, writer = await connect(listener)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    await asyncio.sleep(0.5)  # idle keep-alive longer than the header timeout: still open
    writer.write(b"GET / HTTP/1.1\r\nHost")  # a second request that stalls
    rest = await closed_within(reader, 3)
    assert b"HTTP/1.1 408" in rest
    await shut(writer)


async def test_a_slow_but_complete_request_is_served(start: Start) -> None:
    listener = await start(header_timeout_secs=1)
    reader, writer = await connect(listener)
    for part in (b"GET / HTTP/1.1\r\n", b"Host: x\r\n", b"Connection: close\r\n\r\n"):
        writer.write(part)
        await asyncio.sleep(0.1)
    status, body = await read_response(reader)
    assert status == 200
    assert json.loads(body) == {"message": "Ok"}
    await shut(writer)


# --- connection cap ------------------------------------------------------------------------


async def test_connections_over_the_cap_get_a_json_503_and_capacity_returns(
    start: Start,
) -> None:
    listener = await start(max_connections=2, header_timeout_secs=30)
    held = [await connect(listener) for _ in range(2)]
    for reader, writer in held:  # both are accepted and served (keep-alive, then idle)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(
            b"HTTP/1.1 200"
        )
        await reader.readexactly(len(b'{"message":"Ok"}'))
    reader, writer = await connect(listener)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, body = await read_response(reader)
    assert status == 503
    err = envelope(body)
    assert err["code"] == "GATEWAY_OVERLOADED"
    assert "limit 2" in err["message"]
    await shut(writer)
    # One held connection goes away: a new one is served again.
    await shut(held[0][1])
    assert listener.factory is not None
    for _ in range(100):
        if listener.factory.open_connections < 2:
            break
        await asyncio.sleep(0.02)
    reader, writer = await connect(listener)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, _ = await read_response(reader)
    assert status == 200
    await shut(writer)
    await shut(held[1][1])


def test_handler_limits_are_passed_explicitly() -> None:
    """aiohttp silently drops every custom kwarg if one is wrong: these must all be real."""
    import inspect

    params = inspect.signature(web.RequestHandler.__init__).parameters
    assert set(ProtocolFactory.HANDLER_DEFAULTS) <= set(params)
    assert "keepalive_timeout" in params
    assert LINGERING_SECS < 10


# --- protocol errors -----------------------------------------------------------------------


async def test_a_bad_request_line_is_a_json_400_that_echoes_nothing(start: Start) -> None:
    listener = await start()
    reader, writer = await connect(listener)
    writer.write(b"GET<script>alert(1)</script> / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, body = await read_response(reader)
    assert status == 400
    assert envelope(body)["code"] == "MALFORMED_REQUEST"
    assert b"script" not in body
    await shut(writer)


async def test_a_header_over_the_limit_is_a_json_400(start: Start) -> None:
    listener = await start()
    reader, writer = await connect(listener)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"A" * 9000 + b"\r\n\r\n")
    status, body = await read_response(reader)
    assert status == 400
    assert envelope(body)["code"] == "HEADER_TOO_LARGE"
    assert b"AAAA" not in body
    await shut(writer)


async def test_legacy_error_format_applies_to_protocol_errors(start: Start) -> None:
    listener = await start(error_format="legacy")
    reader, writer = await connect(listener)
    writer.write(b"\x16\x03\x01garbage\r\n\r\n")
    status, body = await read_response(reader)
    assert status == 400
    assert json.loads(body)["code"] == "MALFORMED_REQUEST"
    await shut(writer)


# --- Expect: 100-continue ------------------------------------------------------------------


async def test_expect_continue_with_an_oversized_length_gets_413_and_no_continue(
    start: Start,
) -> None:
    listener = await start(max_body_bytes=2048)
    reader, writer = await connect(listener)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"100 Continue" not in head
    await shut(writer)


async def test_expect_continue_within_the_limit_still_continues(start: Start) -> None:
    listener = await start()
    reader, writer = await connect(listener)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n" % len(CHAT)
    )
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert first.startswith(b"HTTP/1.1 100 Continue")
    writer.write(CHAT)
    status, body = await read_response(reader)
    assert status == 200
    assert json.loads(body)["object"] == "chat.completion"
    await shut(writer)


async def test_an_unknown_expectation_is_a_json_417(start: Start) -> None:
    listener = await start()
    reader, writer = await connect(listener)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\nExpect: teapot\r\nConnection: close\r\n\r\n{}"
    )
    status, body = await read_response(reader)
    assert status == 417
    assert envelope(body)["code"] == "EXPECTATION_FAILED"
    await shut(writer)


# --- body-read timeouts (read_body) --------------------------------------------------------


@pytest.fixture
async def body_server(aiohttp_server: Any) -> Callable[..., Awaitable[int]]:
    """A bare app whose handler reads the body with read_body and the given limits."""

    async def make(**limits: Any) -> int:
        async def handler(request: web.Request) -> web.Response:
            try:
                body = await read_body(request, **limits)
            except GatewayError as exc:
                return error_response(exc, "openai")
            return web.json_response({"bytes": len(body)})

        app = web.Application()
        app.router.add_post("/", handler)
        server = await aiohttp_server(app)
        port: int = server.port
        return port

    return make


async def raw_post(
    port: int, head_length: int, parts: list[tuple[bytes, float]]
) -> asyncio.Task[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % head_length)

    async def feed() -> None:
        for data, pause in parts:
            await asyncio.sleep(pause)
            if writer.is_closing():
                return
            writer.write(data)

    feeder = asyncio.create_task(feed())

    async def answer() -> bytes:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            return head + await asyncio.wait_for(reader.readexactly(length), 10)
        finally:
            feeder.cancel()
            await shut(writer)

    return asyncio.create_task(answer())


async def test_a_stalled_body_gets_408_after_the_idle_timeout(
    body_server: Callable[..., Awaitable[int]],
) -> None:
    port = await body_server(max_bytes=1000, total_secs=30, idle_secs=0.3)
    began = time.monotonic()
    answer = await raw_post(port, 100, [(b"x" * 10, 0.05)])  # 10 of 100 bytes, then nothing
    raw = await answer
    assert raw.startswith(b"HTTP/1.1 408")
    assert b'"REQUEST_TIMEOUT"' in raw
    assert b"stalled" in raw
    assert time.monotonic() - began < 2


async def test_a_trickled_body_gets_408_at_the_total_timeout(
    body_server: Callable[..., Awaitable[int]],
) -> None:
    port = await body_server(max_bytes=1000, total_secs=0.5, idle_secs=5)
    began = time.monotonic()
    answer = await raw_post(port, 100, [(b"x", 0.05)] * 100)  # 1 byte per 50 ms: 5 s
    raw = await answer
    assert raw.startswith(b"HTTP/1.1 408")
    assert b"within 0.5 s" in raw
    assert time.monotonic() - began < 2


async def test_a_body_sent_in_pieces_in_time_is_read_whole(
    body_server: Callable[..., Awaitable[int]],
) -> None:
    port = await body_server(max_bytes=1000, total_secs=5, idle_secs=1)
    answer = await raw_post(port, 30, [(b"x" * 10, 0.1)] * 3)
    raw = await answer
    assert raw.startswith(b"HTTP/1.1 200")
    assert raw.endswith(b'{"bytes": 30}')


async def test_read_body_refuses_an_oversized_length_before_reading(
    body_server: Callable[..., Awaitable[int]],
) -> None:
    port = await body_server(max_bytes=50, total_secs=5, idle_secs=1)
    answer = await raw_post(port, 100, [])  # never sends the body
    raw = await answer
    assert raw.startswith(b"HTTP/1.1 413")


async def test_read_body_refuses_a_chunked_body_that_grows_too_large(
    body_server: Callable[..., Awaitable[int]], session: aiohttp.ClientSession
) -> None:
    port = await body_server(max_bytes=50, total_secs=5, idle_secs=1)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 20

    async with session.post(f"http://127.0.0.1:{port}/", data=chunks()) as resp:
        assert resp.status == 413


async def test_a_stalled_chat_body_gets_408(start: Start) -> None:
    listener = await start(body_idle_timeout_secs=0.3, body_timeout_secs=1, shutdown_timeout_secs=1)
    reader, writer = await connect(listener)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"messages"'
    )
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    finally:
        await shut(writer)
    assert head.startswith(b"HTTP/1.1 408")


# --- the shutdown deadline -----------------------------------------------------------------


async def test_a_request_waiting_for_the_upstream_gets_a_503_at_the_shutdown_deadline(
    start: Start, fake_upstream: FakeUpstream, session: aiohttp.ClientSession
) -> None:
    listener = await start(shutdown_timeout_secs=1)
    # Scripted after start-up: the shorthand lists the provider's models when it starts.
    fake_upstream.script(Action(delay=30))
    call = asyncio.create_task(
        session.post(
            f"http://127.0.0.1:{listener.port}/v1/chat/completions",
            data=CHAT,
            headers={"Content-Type": "application/json"},
        )
    )
    for _ in range(200):  # the upstream has the request: the gateway is waiting for it
        if fake_upstream.requests:
            break
        await asyncio.sleep(0.02)
    assert fake_upstream.requests
    began = time.monotonic()
    await listener.stop()
    took = time.monotonic() - began
    resp = await call
    assert resp.status == 503
    assert envelope(await resp.read())["code"] == "SERVICE_UNAVAILABLE"
    assert took < 1.5


# --- local resource errors -----------------------------------------------------------------


def test_local_resource_errors_are_told_apart_from_provider_failures() -> None:
    emfile = OSError(errno.EMFILE, "Too many open files")
    err = local_resource_error(emfile)
    assert isinstance(err, LocalResourceExhausted)
    assert (err.http_status, err.code, err.retryable) == (503, "GATEWAY_OVERLOADED", False)
    assert "EMFILE" in err.message
    assert err.response_headers()["x-should-retry"] == "true"
    client_side = aiohttp.ClientOSError(errno.EMFILE, "Too many open files")
    assert isinstance(local_resource_error(client_side), LocalResourceExhausted)
    refused = OSError(errno.ECONNREFUSED, "Connection refused")
    assert local_resource_error(refused) is None
    outer = RuntimeError("connect failed")
    outer.__cause__ = OSError(errno.ENFILE, "File table overflow")
    assert isinstance(local_resource_error(outer), LocalResourceExhausted)
    assert local_resource_error(ValueError("x")) is None


# --- the upstream connection pool ----------------------------------------------------------


def test_pool_keepalive_is_half_the_setting() -> None:
    assert pool_keepalive(30) == 15
    assert pool_keepalive(0) == 0


async def test_pooled_upstream_connections_close_within_their_keepalive(
    make_settings: SettingsFactory, aiohttp_client: Any
) -> None:
    """A connection is closed no later than ``keepalive_timeout_secs`` after its last use."""
    closed_at: list[float] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            closed_at.append(time.monotonic())
            writer.close()

    upstream = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    settings = make_settings({"http_client": {"keepalive_timeout_secs": 1.0}})
    client = await aiohttp_client(create_app(settings))
    session = client.app[HTTP_SESSION]
    for pause in (0.0, 0.4):  # two uses of one pooled connection
        await asyncio.sleep(pause)
        async with session.get(f"http://127.0.0.1:{port}/") as resp:
            assert await resp.read() == b"ok"
    last_use = time.monotonic()
    for _ in range(150):
        if closed_at:
            break
        await asyncio.sleep(0.02)
    assert closed_at, "the pooled connection was still open 3 s after its last use"
    assert len(closed_at) == 1  # one connection, reused
    assert closed_at[0] - last_use <= 1.0 + 0.25
    upstream.close()
    await upstream.wait_closed()


def test_the_handler_class_is_aiohttps() -> None:
    assert issubclass(GatewayRequestHandler, web.RequestHandler)


def test_the_connection_cap_is_derived_from_the_descriptor_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ulimit -n 1024: at most 480 client connections, so their upstream sockets fit too."""
    import resource

    from inference_server.server import derived_max_connections

    monkeypatch.setattr(resource, "getrlimit", lambda _which: (1024, 4096))
    assert derived_max_connections(None) == 480
    assert derived_max_connections(7) == 7
