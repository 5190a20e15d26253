"""``POST /v1/embeddings``: one vector per input, through the same pipeline as chat.

Providers receive ``input`` as a list and always return float vectors (``Provider.embed``);
``encoding_format: base64`` is encoded here (little-endian float32, what the openai SDK
decodes), so every provider serves both and llama.cpp's per-token vectors can be pooled first
(``openai_compat.normalise_embeddings``).  Usage is the upstream's, else estimated.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Any, NoReturn

import orjson
from aiohttp import web

from inference_server.body import read_validated
from inference_server.context import RequestContext
from inference_server.endpoints import serve
from inference_server.endpoints.schemas import validate_embeddings
from inference_server.errors import InternalError
from inference_server.keys import CTX, TELEMETRY
from inference_server.pipeline import Operation
from inference_server.providers.base import CallContext, Provider
from inference_server.routing import Lease


def _no_stream(provider: Provider, body: dict[str, Any], call: CallContext) -> NoReturn:
    """Embeddings never stream (``ctx.stream`` stays false): reaching this is a gateway bug."""
    raise InternalError("embeddings do not stream")


EMBED = Operation("embeddings", "embeddings", lambda p, b, c: p.embed(b, c), _no_stream)


def estimate_usage(inputs: list[Any]) -> dict[str, int]:
    """~4 characters per token for text, the ids themselves for token lists."""
    tokens = sum(math.ceil(len(i) / 4) if isinstance(i, str) else len(i) for i in inputs)
    return {"prompt_tokens": tokens, "total_tokens": tokens}


def encode_base64(vector: list[float]) -> str:
    """A vector as OpenAI's base64: little-endian float32 (the SDK decodes exactly this)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def respond_embeddings(
    request: web.Request,
    ctx: RequestContext,
    lease: Lease,
    body: dict[str, Any],
    result: dict[str, Any],
) -> web.StreamResponse:
    """The ``list`` object, base64-encoded when asked; usage recorded (estimated if absent)."""
    usage = result.get("usage")
    if not isinstance(usage, dict):
        usage = estimate_usage(body["input"])
        ctx.usage_estimated = True
    ctx.usage = {**usage, "completion_tokens": 0}
    data = result.get("data") or []
    if body.get("encoding_format") == "base64":
        data = [{**item, "embedding": encode_base64(item["embedding"])} for item in data]
    answer = {
        "object": "list",
        "data": data,
        "model": result.get("model") or ctx.model,
        "usage": usage,
    }
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


async def embeddings(request: web.Request) -> web.StreamResponse:
    """POST /v1/embeddings."""
    ctx = request[CTX]
    # 1. admit — authentication (tenancy.access_middleware); limits: in serve(), once the
    #    model is known.
    # 2. validate
    with request.app[TELEMETRY].span("inference.validate"):
        body = await read_validated(request, validate_embeddings)
    ctx.operation = "embeddings"
    return await serve(request, body, EMBED, respond_embeddings)
