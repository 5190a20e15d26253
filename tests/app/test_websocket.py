"""Chat completions over a WebSocket (issue 15): the multiplexed envelope, cancellation,
disconnects, slow readers, bad frames, limits, authentication and per-request rate limits.

A ``websockets`` client (the library the openai SDK uses) talks to the real app on a free port;
the upstream is a scripted provider whose stream records whether it was cancelled.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from inference_server import logs
from inference_server.context import RequestContext
from inference_server.keys import TELEMETRY
from inference_server.providers import (
    CallContext,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    ProviderPlugin,
)
from tests.support.fake_upstream import completion
from tests.support.providers import ChatStub

KEY = "sk-ws-test-key"


class Scripted(ChatStub):
    """Streams what the last message says: ``slow:<n>:<tag>`` n chunks 10 ms apart,
    ``hold:<tag>`` one chunk then waits, ``big:<n>:<size>:<tag>`` n chunks of size characters
    at once.  Records each tag's start, completion and cancellation."""

    started: dict[str, float] = {}  # noqa: RUF012 (a test's shared record)
    completed: set[str] = set()  # noqa: RUF012
    cancelled: set[str] = set()  # noqa: RUF012
    calls: list[str] = []  # noqa: RUF012

    async def chat(self, request: ChatRequest, ctx: CallContext) -> ChatResponse:
        return completion(ctx.upstream_model)

    async def stream_chat(self, request: ChatRequest, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        script = str(request["messages"][-1]["content"]).split(":")
        tag = script[-1]
        Scripted.started[tag] = time.monotonic()
        Scripted.calls.append(tag)
        finished = False
        try:
            if script[0] == "slow":
                for i in range(int(script[1])):
                    yield _chunk(ctx, f"{i} ")
                    await asyncio.sleep(0.01)
            elif script[0] == "hold":
                yield _chunk(ctx, "first")
                await asyncio.sleep(3600)
            elif script[0] == "big":
                for _ in range(int(script[1])):
                    yield _chunk(ctx, "x" * int(script[2]))
                    await asyncio.sleep(0)
            else:
                yield _chunk(ctx, "hello")
            yield {
                **_chunk(ctx, ""),
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            }
            finished = True
            Scripted.completed.add(tag)
        finally:
            if not finished:
                Scripted.cancelled.add(tag)


def _chunk(ctx: CallContext, text: str) -> ChatChunk:
    return {
        "id": "chatcmpl-ws",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": ctx.upstream_model,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }


PLUGIN = ProviderPlugin(name="scripted", factory=Scripted, default_base_url="x://y")


@pytest.fixture(autouse=True)
def _fresh_records() -> None:
    Scripted.started.clear()
    Scripted.completed.clear()
    Scripted.cancelled.clear()
    Scripted.calls.clear()


def body(script: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": script}], **extra}


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (bounded) for a condition the server makes true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
def make_ws_gateway(make_settings, make_gateway) -> Callable[..., Any]:
    async def make(websocket: dict[str, Any] | None = None, **config: Any) -> str:
        settings = make_settings(
            {
                "providers": {"s": {"plugin": "scripted"}},
                "models": {"m": {"provider": "s"}},
                "websocket": websocket or {},
                **config,
            },
            plugins={"scripted": PLUGIN},
        )
        client = await make_gateway(settings)
        return str(client.make_url("/v1/chat/completions")).replace("http://", "ws://")

    return make


async def recv(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    frame: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), timeout))
    return frame


async def read_until_closed(ws: ClientConnection) -> ConnectionClosed:
    """Read (and drop) frames until the server's close; bounded."""
    async with asyncio.timeout(10):
        while True:
            try:
                await ws.recv()
            except ConnectionClosed as closed:
                return closed


async def until_terminal(ws: ClientConnection, ids: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Every frame per id until each of ``ids`` has its done or error frame."""
    frames: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    open_ids = set(ids)
    while open_ids:
        frame = await recv(ws)
        frames[frame["id"]].append(frame)
        if "done" in frame or "error" in frame:
            open_ids.discard(frame["id"])
    return frames


async def test_ten_interleaved_requests_one_cancelled_mid_stream(make_ws_gateway) -> None:
    url = await make_ws_gateway()
    async with connect(url) as ws:
        for i in range(10):
            await ws.send(orjson.dumps({"id": f"r{i}", "body": body(f"slow:15:r{i}")}).decode())
        order: list[str] = []
        frames: dict[str, list[dict[str, Any]]] = {f"r{i}": [] for i in range(10)}
        open_ids = set(frames)
        cancel_sent = False
        while open_ids:
            frame = await recv(ws)
            frames[frame["id"]].append(frame)
            order.append(frame["id"])
            if frame["id"] == "r3" and "chunk" in frame and not cancel_sent:
                await ws.send(orjson.dumps({"id": "r3", "cancel": True}).decode())
                cancel_sent = True
            if "done" in frame or "error" in frame:
                open_ids.discard(frame["id"])
    # Interleaved: the streams' frames are mixed, not one request after another.
    firsts = [order.index(f"r{i}") for i in range(10)]
    lasts = [len(order) - 1 - order[::-1].index(f"r{i}") for i in range(10)]
    assert max(firsts) < min(lasts)
    # r3 was cancelled: its upstream call saw it, it ended with REQUEST_CANCELLED, no done.
    assert "r3" in Scripted.cancelled
    assert frames["r3"][-1]["error"]["code"] == "REQUEST_CANCELLED"
    assert not any("done" in f for f in frames["r3"])
    for i in (0, 1, 2, 4, 5, 6, 7, 8, 9):
        mine = frames[f"r{i}"]
        text = "".join(f["chunk"]["choices"][0]["delta"].get("content") or "" for f in mine[:-1])
        assert text == "".join(f"{n} " for n in range(15))
        assert mine[-1]["done"] is True
        assert mine[-1]["usage"]["completion_tokens"] == 15
        assert mine[0]["chunk"]["object"] == "chat.completion.chunk"
    assert Scripted.completed == {f"r{i}" for i in range(10)} - {"r3"}


async def test_disconnect_mid_stream_cancels_every_upstream_call(make_ws_gateway) -> None:
    url = await make_ws_gateway()
    ws = await connect(url)
    for tag in ("a", "b"):
        await ws.send(orjson.dumps({"id": tag, "body": body(f"hold:{tag}")}).decode())
    seen = {(await recv(ws))["id"], (await recv(ws))["id"]}
    assert seen == {"a", "b"}
    await ws.close()
    await until(lambda: Scripted.cancelled == {"a", "b"})


async def test_slow_reader_is_closed_while_a_normal_client_is_served(make_ws_gateway) -> None:
    url = await make_ws_gateway({"send_timeout_secs": 0.3, "max_buffered_bytes": 65536})
    host, port = url.split("//")[1].split("/")[0].split(":")
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    await asyncio.get_running_loop().sock_connect(raw, (host, int(port)))
    # max_queue=1: the client stops reading its socket after one unread frame.
    slow = await connect(url, sock=raw, max_queue=1)
    await slow.send(orjson.dumps({"id": "s", "body": body("big:5000:16384:slow")}).decode())
    async with connect(url) as normal:
        await until(lambda: "slow" in Scripted.started)
        await normal.send(orjson.dumps({"id": "n", "body": body("slow:5:normal")}).decode())
        frames = await until_terminal(normal, {"n"})
        assert frames["n"][-1]["done"] is True
    await until(lambda: "slow" in Scripted.cancelled)
    assert "slow" not in Scripted.completed
    # The gateway closed the slow socket (policy violation); the client sees it once it reads.
    rcvd = (await read_until_closed(slow)).rcvd
    assert rcvd is not None
    assert rcvd.code == 1008
    assert rcvd.reason == "client is not reading"
    await slow.close()


async def test_bad_frames_get_error_frames_and_the_socket_survives(make_ws_gateway) -> None:
    url = await make_ws_gateway({"max_message_bytes": 4096})
    async with connect(url) as ws:
        await ws.send("this is not json")
        error = (await recv(ws))["error"]
        assert error["code"] == "INVALID_JSON"
        await ws.send("[1, 2]")
        assert (await recv(ws))["error"]["code"] == "INVALID_JSON"
        await ws.send(orjson.dumps({"id": "x", "what": "ever"}).decode())
        frame = await recv(ws)
        assert frame["id"] is None
        assert frame["error"]["param"] == "body"
        assert "Unknown frame" in frame["error"]["message"]
        await ws.send(orjson.dumps({"id": "bad id with spaces", "body": body("x")}).decode())
        assert (await recv(ws))["error"]["param"] == "id"
        await ws.send(orjson.dumps({"id": "v", "body": {"model": "m", "messages": []}}).decode())
        frame = await recv(ws)
        assert frame["id"] == "v"
        assert frame["error"]["type"] == "invalid_request_error"
        await ws.send(orjson.dumps({"id": "u", "body": body("x", model="nope")}).decode())
        assert (await recv(ws))["error"]["code"] is not None
        # still serving
        await ws.send(orjson.dumps({"id": "ok", "body": body("plain:ok")}).decode())
        frames = await until_terminal(ws, {"ok"})
        assert frames["ok"][-1]["done"] is True
        # oversized: aiohttp refuses it without buffering it, closing with 1009
        await ws.send("x" * 5000)
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009


async def test_requests_in_flight_per_socket_are_capped(make_ws_gateway) -> None:
    url = await make_ws_gateway({"max_in_flight": 2})
    async with connect(url) as ws:
        for tag in ("a", "b"):
            await ws.send(orjson.dumps({"id": tag, "body": body(f"hold:{tag}")}).decode())
        assert {(await recv(ws))["id"], (await recv(ws))["id"]} == {"a", "b"}
        await ws.send(orjson.dumps({"id": "c", "body": body("hold:c")}).decode())
        frame = await recv(ws)
        assert frame["id"] is None
        assert frame["error"]["code"] == "TOO_MANY_IN_FLIGHT"
        assert "c" not in Scripted.started
        await ws.send(orjson.dumps({"id": "a", "body": body("hold:a")}).decode())
        assert "already in flight" in (await recv(ws))["error"]["message"]
        await ws.send(orjson.dumps({"id": "a", "cancel": True}).decode())
        assert (await recv(ws))["error"]["code"] == "REQUEST_CANCELLED"
        await ws.send(orjson.dumps({"id": "c", "body": body("plain:c")}).decode())
        frames = await until_terminal(ws, {"c"})
        assert frames["c"][-1]["done"] is True


async def test_idle_socket_is_closed(make_ws_gateway) -> None:
    url = await make_ws_gateway({"idle_timeout_secs": 0.2})
    async with connect(url) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1000


async def test_a_long_request_keeps_an_idle_timeout_away(make_ws_gateway) -> None:
    url = await make_ws_gateway({"idle_timeout_secs": 0.1})
    async with connect(url) as ws:
        await ws.send(orjson.dumps({"id": "l", "body": body("slow:30:long")}).decode())
        frames = await until_terminal(ws, {"l"})  # 0.3 s of stream: longer than the idle limit
        assert frames["l"][-1]["done"] is True


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def test_authentication_on_the_upgrade_and_rate_limits_per_request(
    make_ws_gateway,
) -> None:
    url = await make_ws_gateway(
        auth={"enabled": True, "keys": {"team": {"key_sha256": sha(KEY), "rpm": 2}}}
    )
    with pytest.raises(InvalidStatus) as refused:
        await connect(url)
    assert refused.value.response.status_code == 401
    with pytest.raises(InvalidStatus):
        await connect(url, additional_headers={"Authorization": "Bearer wrong"})
    # A browser's form: the key as a subprotocol; the gateway echoes one of the offered names.
    async with connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "realtime"
        for i in range(3):
            await ws.send(orjson.dumps({"id": f"q{i}", "body": body(f"plain:q{i}")}).decode())
            frames = await until_terminal(ws, {f"q{i}"})
            last = frames[f"q{i}"][-1]
            if i < 2:
                assert last["done"] is True
            else:  # the third request on the same socket: the key's rpm counts requests
                assert last["error"]["code"] == "RATE_LIMITED"
    async with connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        await ws.send(orjson.dumps({"id": "z", "body": body("plain:z")}).decode())
        assert (await until_terminal(ws, {"z"}))["z"][-1]["error"]["code"] == "RATE_LIMITED"


async def test_plain_get_is_refused_with_the_json_envelope(make_settings, make_gateway) -> None:
    client = await make_gateway(make_settings({"inference": {"provider": "mock"}}))
    resp = await client.get("/v1/chat/completions")
    assert resp.status == 405
    assert "WebSocket upgrade" in (await resp.json())["error"]["message"]


async def test_usage_chunk_and_metrics_per_request(make_ws_gateway, make_settings) -> None:
    url = await make_ws_gateway()
    async with connect(url) as ws:
        await ws.send(
            orjson.dumps(
                {"id": "u", "body": body("slow:3:u", stream_options={"include_usage": True})}
            ).decode()
        )
        frames = (await until_terminal(ws, {"u"}))["u"]
    usage_chunks = [f for f in frames if "chunk" in f and not f["chunk"]["choices"]]
    assert len(usage_chunks) == 1
    assert usage_chunks[0]["chunk"]["usage"] == frames[-1]["usage"]
    # Metered like its HTTP twin: one chat request on the endpoint, answered by its deployment;
    # the upgrade itself is one more request, with status 101.
    metrics_url = url.replace("ws://", "http://").replace("/v1/chat/completions", "/metrics")
    async with aiohttp.ClientSession() as http, http.get(metrics_url) as resp:
        text = await resp.text()
    lines = [line for line in text.splitlines() if line.startswith("inference_requests_total{")]
    requests = [
        line
        for line in lines
        if 'endpoint="/v1/chat/completions"' in line
        and 'deployment="s/m"' in line
        and 'status_class="2xx"' in line
    ]
    assert len(requests) == 1, lines
    assert any('status_class="1xx"' in line for line in lines), lines
    assert requests[0].endswith(" 1.0")


async def test_a_browser_page_needs_an_allowed_origin(make_ws_gateway) -> None:
    """WebSockets are not covered by CORS: without this check any web page could drive a local
    gateway (with auth off) through the user's browser."""
    url = await make_ws_gateway()
    with pytest.raises(InvalidStatus) as refused:
        await connect(url, origin=Origin("https://evil.example"))
    assert refused.value.response.status_code == 403
    assert b"ORIGIN_NOT_ALLOWED" in refused.value.response.body
    async with connect(url) as ws:  # no Origin: not a browser
        await ws.send(orjson.dumps({"id": "a", "body": body("plain:a")}).decode())
        assert (await until_terminal(ws, {"a"}))["a"][-1]["done"] is True
    allowed = await make_ws_gateway(server={"cors": {"allow_origins": ["https://app.example"]}})
    async with connect(allowed, origin=Origin("https://app.example")) as ws:
        await ws.send(orjson.dumps({"id": "b", "body": body("plain:b")}).decode())
        assert (await until_terminal(ws, {"b"}))["b"][-1]["done"] is True
    with pytest.raises(InvalidStatus):
        await connect(allowed, origin=Origin("https://evil.example"))


async def test_each_request_is_traced_under_the_upgrades_traceparent(
    make_settings, make_gateway
) -> None:
    client = await make_gateway(
        make_settings(
            {
                "providers": {"s": {"plugin": "scripted"}},
                "models": {"m": {"provider": "s"}},
                "telemetry": {"traces": {"exporter": "console"}},
            },
            plugins={"scripted": PLUGIN},
        )
    )
    memory = InMemorySpanExporter()
    provider = client.app[TELEMETRY].provider
    assert provider is not None
    provider.add_span_processor(SimpleSpanProcessor(memory))
    url = str(client.make_url("/v1/chat/completions")).replace("http://", "ws://")
    trace, parent = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    headers = {"traceparent": f"00-{trace:032x}-{parent:016x}-01"}
    async with connect(url, additional_headers=headers) as ws:
        for rid in ("a", "b"):
            await ws.send(orjson.dumps({"id": rid, "body": body(f"slow:2:{rid}")}).decode())
        await until_terminal(ws, {"a", "b"})
    await until(
        lambda: (
            len([s for s in memory.get_finished_spans() if s.name == "WS /v1/chat/completions"])
            == 2
        )
    )
    spans = memory.get_finished_spans()
    servers = [s for s in spans if s.name == "WS /v1/chat/completions"]
    for server in servers:
        assert server.kind == SpanKind.SERVER
        assert server.context.trace_id == trace
        assert server.parent is not None
        assert server.parent.span_id == parent
        attempts = [
            s for s in spans if s.kind == SpanKind.CLIENT and s.parent is not None
            and s.parent.span_id == server.context.span_id
        ]  # fmt: skip
        assert len(attempts) == 1
        assert attempts[0].attributes is not None
        assert attempts[0].attributes["gen_ai.request.model"] == "m"


async def test_websocket_off_means_no_upgrade(make_ws_gateway) -> None:
    url = await make_ws_gateway({"enabled": False})
    with pytest.raises(InvalidStatus) as refused:
        await connect(url)
    assert refused.value.response.status_code == 405


def test_an_upgrade_is_never_a_slow_request() -> None:
    """The upgrade's access line comes when the socket closes: its duration is the socket's."""
    ctx = RequestContext(request_id="req_ws")
    ctx.status = 101
    assert not logs.slow_request(ctx, 60.0, 1.0)
    ctx.status = 200
    assert logs.slow_request(ctx, 60.0, 1.0)


async def test_sockets_bypass_the_response_cache(make_ws_gateway) -> None:
    """A hit is an HTTP replay: on a socket every request goes upstream (and says bypass)."""
    url = await make_ws_gateway(cache={"enabled": True})
    async with connect(url) as ws:
        for rid in ("one", "two"):
            await ws.send(orjson.dumps({"id": rid, "body": body("plain:same")}).decode())
            assert (await until_terminal(ws, {rid}))[rid][-1]["done"] is True
    assert Scripted.calls == ["same", "same"]


async def test_a_client_that_answers_pings_stays_one_that_does_not_is_closed(
    make_ws_gateway,
) -> None:
    url = await make_ws_gateway({"heartbeat_secs": 0.1, "idle_timeout_secs": 30})
    async with connect(url) as ws:  # the websockets client answers pings by itself
        await asyncio.sleep(0.6)  # six intervals
        await ws.send(orjson.dumps({"id": "alive", "body": body("plain:alive")}).decode())
        assert (await until_terminal(ws, {"alive"}))["alive"][-1]["done"] is True
    # A raw client completes the handshake, then never answers: closed with 1011.
    host, port = url.split("//")[1].split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101")
    opcodes: list[int] = []
    async with asyncio.timeout(5):
        while not opcodes or opcodes[-1] != 0x8:  # server frames: unmasked, short
            first, length = await reader.readexactly(2)
            payload = await reader.readexactly(length & 0x7F)
            opcodes.append(first & 0x0F)
    assert 0x9 in opcodes  # it was pinged
    assert int.from_bytes(payload[:2], "big") == 1011
    writer.close()


async def test_a_large_frame_is_validated_and_served(make_ws_gateway) -> None:
    """Over 64 KB a frame is parsed and validated on a worker thread: same answers."""
    url = await make_ws_gateway()
    padding = "x" * 100_000
    async with connect(url) as ws:
        big = body("plain:big")
        big["messages"].insert(0, {"role": "system", "content": padding})
        await ws.send(orjson.dumps({"id": "big", "body": big}).decode())
        assert (await until_terminal(ws, {"big"}))["big"][-1]["done"] is True
        bad = {"model": "m", "messages": [{"role": "nobody", "content": padding}]}
        await ws.send(orjson.dumps({"id": "bad", "body": bad}).decode())
        error = (await until_terminal(ws, {"bad"}))["bad"][-1]["error"]
        assert error["param"].startswith("messages")
        assert error["type"] == "invalid_request_error"
    assert Scripted.calls == ["big"]
