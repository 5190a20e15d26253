"""The ``gateway-ws`` measures (issue 15): what a WebSocket costs against SSE.

* **TTFT, WebSocket against SSE**, on the same gateway process (the gateway arm pointed at the
  streaming upstream) and the same upstream stream: pairs of one SSE request
  (``POST /v1/chat/completions``, ``stream: true``, a kept-alive connection) and one request on
  an open chat WebSocket, one after the other, the order alternating per pair.  The client is
  the same aiohttp session for both, and neither parses JSON (SSE: the first ``data:`` line;
  WebSocket: the first ``chunk`` frame, by its prefix), so the difference is the server's.
* **Memory per idle socket**: the gateway's RSS (process tree) before and after opening 1,000
  chat WebSockets that then sit idle, divided by 1,000; then again after closing them.

aiohttp is imported here (the project's venv has it); bench.py itself stays stdlib-only.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

Stats = dict[str, float]


async def _sse_ttft(session: Any, url: str, body: str, auth: str) -> float:
    started = time.perf_counter()
    first = float("nan")
    headers = {"Content-Type": "application/json", "Authorization": auth}
    async with session.post(url, data=body, headers=headers) as resp:
        async for line in resp.content:
            if first != first and line.startswith(b"data: "):  # NaN: not seen yet
                first = time.perf_counter() - started
    return first


async def _ws_ttft(ws: Any, rid: str, body: str) -> float:
    prefix = '{"id":' + json.dumps(rid) + ',"chunk":'
    started = time.perf_counter()
    await ws.send_str('{"id":' + json.dumps(rid) + ',"body":' + body + "}")
    first = float("nan")
    while True:
        msg = await ws.receive(timeout=30)
        data = msg.data
        if not isinstance(data, str):
            raise RuntimeError(f"the WebSocket ended: {msg.type} {data!r}")
        if data.startswith(prefix):
            if first != first:
                first = time.perf_counter() - started
        else:  # done or error: the request's last frame
            if '"error"' in data:
                raise RuntimeError(f"error frame: {data[:300]}")
            return first


async def _ttft(origin: str, body: str, auth: str, pairs: int) -> Stats:
    import aiohttp

    url = origin + "/v1/chat/completions"
    ws_url = url.replace("http://", "ws://")
    sse: list[float] = []
    ws_times: list[float] = []
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(ws_url, headers={"Authorization": auth}) as ws,
    ):
        await _sse_ttft(session, url, body, auth)  # warm: connection, code paths
        await _ws_ttft(ws, "warm", body)
        for i in range(pairs):
            if i % 2:
                ws_times.append(await _ws_ttft(ws, f"r{i}", body))
                sse.append(await _sse_ttft(session, url, body, auth))
            else:
                sse.append(await _sse_ttft(session, url, body, auth))
                ws_times.append(await _ws_ttft(ws, f"r{i}", body))
    deltas = [w - s for w, s in zip(ws_times, sse, strict=True)]
    return {
        "sse_ttft_p50_us": statistics.median(sse) * 1e6,
        "ws_ttft_p50_us": statistics.median(ws_times) * 1e6,
        "delta_p50_us": statistics.median(deltas) * 1e6,
        "pairs": float(pairs),
    }


def ttft(origin: str, body: str, auth: str, pairs: int) -> Stats:
    """One round of TTFT pairs (WebSocket and SSE) against ``origin``."""
    return asyncio.run(_ttft(origin, body, auth, pairs))


async def _idle_memory(origin: str, auth: str, sockets: int, weigh: Callable[[], float]) -> Stats:
    import aiohttp

    ws_url = origin.replace("http://", "ws://") + "/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.sleep(0.5)
        before = weigh()
        opened: list[Any] = []
        for start in range(0, sockets, 100):  # 100 handshakes at a time
            batch = [
                session.ws_connect(ws_url, headers={"Authorization": auth}, heartbeat=None)
                for _ in range(min(100, sockets - start))
            ]
            opened += await asyncio.gather(*batch)
        await asyncio.sleep(1.0)  # let the gateway settle (no requests: idle sockets)
        with_open = weigh()
        await asyncio.gather(*(ws.close() for ws in opened))
    await asyncio.sleep(1.0)
    after = weigh()
    return {
        "sockets": float(sockets),
        "rss_before_mb": before,
        "rss_open_mb": with_open,
        "rss_after_close_mb": after,
        "kb_per_socket": (with_open - before) * 1024 / sockets,
    }


def idle_memory(origin: str, auth: str, sockets: int, weigh: Callable[[], float]) -> Stats:
    """Open ``sockets`` idle chat WebSockets and weigh the gateway (``weigh``: RSS in MB)."""
    return asyncio.run(_idle_memory(origin, auth, sockets, weigh))
