"""WebSockets through a real gateway process and SIGTERM: requests in flight finish (up to the
shutdown deadline, then an error frame), every socket closes with 1001 (idle ones at once)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.process.test_server_process import mock_config
from tests.support.procs import gateway_process as gateway


def chat(tag: str) -> str:
    body = {"model": "mock-model", "messages": [{"role": "user", "content": tag}]}
    return orjson.dumps({"id": tag, "body": body}).decode()


async def frames_until_closed(ws: ClientConnection) -> tuple[list[dict[str, Any]], int | None]:
    """Every frame until the server closes the socket, and its close code (bounded)."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(30):
        while True:
            try:
                frames.append(orjson.loads(await ws.recv()))
            except ConnectionClosed as closed:
                return frames, closed.rcvd.code if closed.rcvd is not None else None


async def test_sigterm_lets_streams_finish_then_closes_every_socket_with_1001(
    tmp_path: Path,
) -> None:
    config = {
        **mock_config(tokens_per_second=20, reply_tokens=20),  # a 1 s stream
        "server": {"shutdown_timeout_secs": 10},
    }
    with gateway(tmp_path, config) as (proc, port):
        url = f"ws://127.0.0.1:{port}/v1/chat/completions"
        busy = await connect(url)
        idle = await connect(url)
        await busy.send(chat("inflight"))
        first = orjson.loads(await asyncio.wait_for(busy.recv(), 10))
        assert "chunk" in first
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # The idle socket closes at once, with 1001 (going away).
        idle_frames, idle_code = await frames_until_closed(idle)
        assert idle_frames == []
        assert idle_code == 1001
        frames, code = await frames_until_closed(busy)
        code_exit = await asyncio.to_thread(proc.wait, 20)
        took = time.monotonic() - began
    mine = [f for f in frames if f.get("id") == "inflight"]
    assert mine[-1]["done"] is True  # the stream in flight finished
    assert code == 1001
    assert code_exit == 0
    assert took < 10, f"exited {took:.2f} s after SIGTERM"


async def test_a_stream_longer_than_the_deadline_is_cut_with_an_error_frame(
    tmp_path: Path,
) -> None:
    config = {
        **mock_config(tokens_per_second=2, reply_tokens=100),  # a 50 s stream
        "server": {"shutdown_timeout_secs": 2},
    }
    with gateway(tmp_path, config) as (proc, port):
        ws = await connect(f"ws://127.0.0.1:{port}/v1/chat/completions")
        await ws.send(chat("long"))
        assert "chunk" in orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        frames, code = await frames_until_closed(ws)
        code_exit = await asyncio.to_thread(proc.wait, 20)
        took = time.monotonic() - began
    assert frames[-1]["id"] == "long"
    assert frames[-1]["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert code == 1001
    assert code_exit == 0
    assert took <= 2 + 1, f"exited {took:.2f} s after SIGTERM"


async def test_pings_do_not_cut_a_stream_while_the_server_shuts_down(tmp_path: Path) -> None:
    """aiohttp reads nothing once shutdown starts, so a pong cannot arrive: a heartbeat that
    waited for one would close a socket whose stream may still finish."""
    config = {
        **mock_config(tokens_per_second=10, reply_tokens=25),  # a 2.5 s stream
        "server": {"shutdown_timeout_secs": 10},
        "websocket": {"heartbeat_secs": 0.3},
    }
    with gateway(tmp_path, config) as (proc, port):
        ws = await connect(f"ws://127.0.0.1:{port}/v1/chat/completions")
        await ws.send(chat("beat"))
        assert "chunk" in orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        proc.send_signal(signal.SIGTERM)
        frames, code = await frames_until_closed(ws)
        code_exit = await asyncio.to_thread(proc.wait, 20)
    assert frames[-1].get("done") is True, frames[-1]
    assert code == 1001
    assert code_exit == 0
