"""The OpenAI endpoints beyond chat: ``/v1/embeddings``, ``/v1/completions``, ``/v1/responses``.

Each handler runs the same pipeline as chat (``pipeline.py``): validate (its own schema) →
route (``pipeline.route_request``: allowed list, experiments, aliases) → attempt
(``pipeline.walk`` with its :class:`~inference_server.pipeline.Operation`: the same plan,
breakers, fallbacks, retries, metrics and spans) → respond → record.  Only the wire shapes
live here.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from inference_server.context import RequestContext
from inference_server.keys import CTX
from inference_server.pipeline import Operation, Respond, route_request, walk
from inference_server.tenancy import admit


async def serve(
    request: web.Request,
    body: dict[str, Any],
    op: Operation,
    respond: Respond,
    *,
    stream: bool = False,
) -> web.StreamResponse:
    """Steps 1b and 3–7 for a validated ``body``: route, admit (limits, budget, the key's
    models), walk the plan with ``op``, respond, record and settle."""
    ctx: RequestContext = request[CTX]
    model = body.get("model") or ctx.runtime.settings.default_model
    body["model"] = model
    ctx.model = model
    ctx.stream = stream
    route, experiment = route_request(request, ctx, model, body)
    admission = await admit(request, ctx, body)
    try:
        return await walk(request, ctx, route, model, body, op, respond)
    finally:
        admission.settle(ctx)
        if experiment is not None and ctx.variant is not None:
            experiment.stats[ctx.variant].record(
                time.perf_counter() - ctx.started,
                ctx.error_code is not None or ctx.status is None,
                ctx.usage,
            )
