"""Streaming upstream for the benchmark: an OpenAI-shaped SSE source with a known clock.

Every POST .../chat/completions gets ``--chunks`` chat.completion.chunk events,
``--interval-ms`` apart (the first one at once), then ``data: [DONE]``. Because
the send schedule is fixed, any extra time to first token or any bunching of
chunks seen by a client behind a proxy is the proxy's doing. GET .../models and
GET / answer too so a gateway's health and readiness checks pass.

Usage: python bench/stream_upstream.py --port P [--chunks 20] [--interval-ms 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable

from aiohttp import web

try:
    import uvloop

    new_event_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
except ImportError:  # still runs, slower; main() says so in the log
    new_event_loop = asyncio.new_event_loop

MODELS = {
    "object": "list",
    "data": [{"id": "bench-model", "object": "model", "owned_by": "bench"}],
}


def sse_chunk(index: int, last: bool) -> bytes:
    """One SSE event; content is a short token so chunk size stays realistic."""
    event = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "delta": {"content": f"tok{index} "},
                "finish_reason": "stop" if last else None,
            }
        ],
    }
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def make_app(chunks: int, interval: float) -> web.Application:
    """Build the app; chunk bytes are precomputed so the upstream stays cheap."""
    events = [sse_chunk(i, i == chunks - 1) for i in range(chunks)]

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        for i, event in enumerate(events):
            if i:
                await asyncio.sleep(interval)
            await resp.write(event)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def models(_: web.Request) -> web.Response:
        return web.json_response(MODELS)

    async def root(_: web.Request) -> web.Response:
        return web.json_response({"message": "Ok"})

    app = web.Application()
    app.router.add_post("/{prefix:.*}chat/completions", chat)
    app.router.add_get("/{prefix:.*}models", models)
    app.router.add_get("/", root)
    return app


def main() -> None:
    """Parse flags and serve on 127.0.0.1 with uvloop when it is installed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    args = parser.parse_args()
    loop = new_event_loop()
    print(f"stream_upstream: event loop {type(loop).__module__}", file=sys.stderr)
    app = make_app(args.chunks, args.interval_ms / 1000)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
