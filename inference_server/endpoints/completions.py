"""``POST /v1/completions`` (the legacy text API), non-streaming and SSE.

The body passes through to providers that serve it (``Provider.complete`` /
``stream_complete``); the stream is relayed exactly like chat's (``pipeline.stream``: first
chunk before the 200, usage chunk on ``include_usage``, ``[DONE]``, one error event on a cut).
"""

from __future__ import annotations

from aiohttp import web

from inference_server.body import read_validated
from inference_server.endpoints import serve
from inference_server.endpoints.schemas import validate_completions
from inference_server.keys import CTX, TELEMETRY
from inference_server.pipeline import Operation, respond_chat

COMPLETE = Operation(
    "text_completion",
    "completions",
    lambda p, b, c: p.complete(b, c),
    lambda p, b, c: p.stream_complete(b, c),
)


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions."""
    ctx = request[CTX]
    # 1. admit — authentication (tenancy.access_middleware); limits: in serve(), once the
    #    model is known.
    # 2. validate
    with request.app[TELEMETRY].span("inference.validate"):
        body = await read_validated(request, validate_completions)
    ctx.operation = "text_completion"
    ctx.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return await serve(request, body, COMPLETE, respond_chat, stream=bool(body.get("stream")))
