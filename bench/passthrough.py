"""Bare aiohttp pass-through: the floor for any Python gateway on this machine.

It does the least a proxy must do (read the body, forward it on one pooled
ClientSession, return the bytes; relay SSE chunk by chunk) and nothing else:
no parsing, validation, logging or auth. The gateway's added latency is judged
against this floor rather than against nginx, because the interpreter and
aiohttp cost is not something gateway code can remove.

Usage: python bench/passthrough.py --port P --upstream http://127.0.0.1:U
(paths are forwarded unchanged: /v1/chat/completions -> U/v1/chat/completions)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

try:
    import uvloop

    new_event_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
except ImportError:  # still runs, slower; main() says so in the log
    new_event_loop = asyncio.new_event_loop

SESSION = web.AppKey("session", aiohttp.ClientSession)


def make_app(upstream: str) -> web.Application:
    """Build the app: one handler for every path, one pooled session for its lifetime."""

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        session = request.app[SESSION]
        async with session.request(
            request.method, upstream + request.path_qs, data=body, headers=headers
        ) as up:
            if up.content_type == "text/event-stream":
                resp = web.StreamResponse(
                    status=up.status, headers={"Content-Type": "text/event-stream"}
                )
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
            return web.Response(
                status=up.status, body=await up.read(), content_type=up.content_type
            )

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[SESSION].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    """Parse flags and serve on 127.0.0.1 with uvloop when it is installed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="origin, e.g. http://127.0.0.1:8001")
    args = parser.parse_args()
    loop = new_event_loop()
    print(f"passthrough: event loop {type(loop).__module__}", file=sys.stderr)
    app = make_app(args.upstream.rstrip("/"))
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
