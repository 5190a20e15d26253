"""The request pipeline, top-down in one place.

``chat_completions`` reads as the gateway works:
admit → validate → route (experiment → variant → route) → cache (its key holds the route, so
aliases and variants are resolved first; a hit ends here) → attempt (walk the routing ``Plan``:
deployments, breakers, pauses, fallbacks, retry rounds, budget, panic) → respond or stream →
record.
The other endpoints (``endpoints/``: embeddings, completions, responses) run the same steps:
their own validation, then :func:`route_request` and :func:`walk` with their
:class:`Operation`, so routing, fallbacks, breakers, metrics and spans are chat's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
from aiohttp import web
from loguru import logger

from inference_server.body import read_json
from inference_server.cache import Lookup
from inference_server.context import RequestContext
from inference_server.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    NoDeploymentAvailable,
    ProviderBadResponse,
    ProviderConnectionFailed,
    ProviderTimeout,
)
from inference_server.keys import BACKGROUND, CTX, METRICS
from inference_server.providers.base import (
    CallContext,
    ChatChunk,
    Provider,
    operation_not_supported,
)
from inference_server.providers.base import Operation as ProviderOperation
from inference_server.routing import (
    SHORTHAND_ROUTE,
    Candidate,
    Experiment,
    Lease,
    Route,
    Router,
)
from inference_server.schemas import validate_chat
from inference_server.streaming import (
    SSE_HEADERS,
    Sink,
    SSESink,
    aclose_chunks,
    relay,
    sse_event,
)
from inference_server.telemetry import NO_SPAN
from inference_server.tenancy import admit


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    ctx = request[CTX]
    runtime = ctx.runtime  # issue 16: the snapshot this request took at admission
    settings = runtime.settings

    # 1. admit — authentication (tenancy.access_middleware); limits: step 1b below.
    # 2. validate
    telemetry = runtime.telemetry
    with telemetry.span("inference.validate"):
        body = validate_chat(await read_json(request))
    model = body.get("model") or settings.default_model
    body["model"] = model
    ctx.model = model
    ctx.stream = bool(body.get("stream"))
    # 3. route: an experiment may answer for this name and pick a variant (another route).
    route, experiment = route_request(request, ctx, model, body)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    ctx.include_usage = include_usage
    # 1b. admit (tenancy.py): the key was authenticated before the body was read
    #     (tenancy.access_middleware); now the model is known: its model list, budget, limits.
    #     A cache hit still counts toward the key's limits.
    admission = await admit(request, ctx, body)
    cache = runtime.cache
    cached: Lookup | None = None
    try:
        # 4. cache (cache.py): a hit answers here, JSON or SSE replay; a miss leads or waits.
        if cache is not None:
            cached = await cache.lookup(request, ctx, body, route.name)
            if cached is not None and cached.response is not None:
                return cached.response
        # 5. attempt: walk the plan (deployments, fallbacks, retry rounds, budget, panic), all
        #    before the first byte reaches the client; 6. respond or stream.
        respond = respond_chat if cached is None else partial(respond_chat, cached=cached)
        return await walk(request, ctx, route, model, body, CHAT, respond)
    finally:
        admission.settle(ctx)  # tokens settle to the real usage, slots freed, usage ledger
        if cached is not None:
            await cached.close()  # wakes identical requests waiting on this one
        # 7. record (metrics and the access log read ctx in the middleware)
        if experiment is not None and ctx.variant is not None:
            experiment.stats[ctx.variant].record(
                time.perf_counter() - ctx.started,
                ctx.error_code is not None or ctx.status is None,
                ctx.usage,
            )


def route_request(
    request: web.Request, ctx: RequestContext, model: str, body: dict[str, Any]
) -> tuple[Route, Experiment | None]:
    """Step 4 of every endpoint: allowed list, experiment → variant, route (aliases followed)."""
    runtime = ctx.runtime
    router = runtime.router
    settings = runtime.settings
    with runtime.telemetry.span("inference.route", {"gen_ai.request.model": model}) as span:
        router.check_allowed(model)
        route_name = model
        experiment = router.experiments.get(model)
        if experiment is not None:
            route_name = assign_variant(request, ctx, experiment, body)
        route = router.resolve(route_name)
        ctx.route = (
            route.name
            if route.name != SHORTHAND_ROUTE
            else (model if model in settings.allowed_models else SHORTHAND_ROUTE)
        )
        if span is not None:
            span.set_attribute("inference.route", ctx.route)
            if ctx.variant is not None:
                span.set_attribute("inference.experiment", ctx.experiment or "")
                span.set_attribute("inference.variant", ctx.variant)
    return route, experiment


@dataclass(frozen=True, slots=True)
class Operation:
    """What an endpoint asks of a provider: one walk of the plan serves every endpoint.

    ``name`` is the GenAI operation (``gen_ai.operation.name``: chat, text_completion,
    embeddings, responses); ``capability`` is what ``Provider.supports`` is asked; ``call`` makes
    the non-streaming call and ``stream`` opens a stream (its first chunk is awaited by
    :func:`open_stream` under the first-byte timeout).
    """

    name: str
    capability: ProviderOperation
    call: Callable[[Provider, dict[str, Any], CallContext], Awaitable[dict[str, Any]]]
    stream: Callable[[Provider, dict[str, Any], CallContext], AsyncIterator[dict[str, Any]]]


CHAT = Operation("chat", "chat", lambda p, b, c: p.chat(b, c), lambda p, b, c: p.stream_chat(b, c))

#: What an endpoint does with a successful attempt (inside the lease: a stream keeps it).
Respond = Callable[
    [web.Request, RequestContext, Lease, dict[str, Any], Any], Awaitable[web.StreamResponse]
]


async def walk(
    request: web.Request,
    ctx: RequestContext,
    route: Route,
    model: str,
    body: dict[str, Any],
    op: Operation,
    respond: Respond,
) -> web.StreamResponse:
    """Step 5 of every endpoint: walk the routing ``Plan`` (one lease per attempt) until an
    attempt succeeds, then ``respond`` (step 6) while the lease is held.

    A deployment whose provider lacks ``op`` is skipped unjudged (no breaker verdict: it was
    never asked); when no deployment could even be asked, the client gets 400
    ``OPERATION_NOT_SUPPORTED`` instead of the plan's refusal.
    """
    declared = route.capabilities
    if declared is not None and op.capability not in declared:
        raise operation_not_supported_by_model(model, op.capability)
    ctx.queue_secs = time.perf_counter() - ctx.started
    plan = ctx.runtime.router.plan(route, model, ctx, ctx.runtime.metrics)
    unsupported: GatewayError | None = None
    capability = op.capability
    async for lease in plan:
        async with lease:
            provider = lease.deployment.provider
            if capability != "chat" and not provider.supports(capability):
                unsupported = operation_not_supported(lease.deployment.config.name, op.name)
                plan.exclude(lease)  # never asked, so no verdict, and not asked again
                continue
            try:
                result = await attempt(request, ctx, lease.candidate, body, op)
            except GatewayError as exc:
                plan.failed(lease, exc)
                continue
            plan.succeeded(lease)
            return await respond(request, ctx, lease, body, result)
    if unsupported is not None and not ctx.attempts:
        raise unsupported
    raise plan.error()


def operation_not_supported_by_model(model: str, capability: str) -> InvalidRequest:
    """The 400 for a model whose configured ``capabilities`` do not include the request's."""
    return InvalidRequest(
        f"Model '{model}' does not serve {capability}",
        code="OPERATION_NOT_SUPPORTED",
        param="model",
    )


async def respond_chat(
    request: web.Request,
    ctx: RequestContext,
    lease: Lease,
    body: dict[str, Any],
    result: dict[str, Any] | tuple[ChatChunk, AsyncIterator[ChatChunk]],
    cached: Lookup | None = None,
) -> web.StreamResponse:
    """Step 6 for chat: the JSON answer, or the SSE relay of an opened stream (each handed to
    the response cache, when on, once complete)."""
    if isinstance(result, tuple):
        first, chunks = result
        return await stream(request, ctx, lease, body, first, chunks, cached=cached)
    ctx.usage = result.get("usage")
    payload = orjson.dumps(result)
    if cached is not None:
        await cached.store_json(payload, result)
    return web.Response(body=payload, content_type="application/json")


def assign_variant(
    request: web.Request, ctx: RequestContext, experiment: Experiment, body: dict[str, Any]
) -> str:
    """Pick the variant (sticky), apply its parameter overrides, maybe start shadow traffic."""
    router = ctx.runtime.router
    variant, how = experiment.assign(request, body, router.rng)
    ctx.set_variant(experiment.name, variant.name)
    ctx.log.debug("experiment {}: variant {} ({})", experiment.name, variant.name, how)
    body.update(variant.params)  # a variant's parameters are the experiment: they win
    shadow = experiment.spec.shadow
    if shadow is not None and router.rng.random() < shadow.fraction:
        start_shadow(request.app, router, experiment, body, ctx.request_id)
    return variant.model


def _body_for(cand: Candidate, body: dict[str, Any]) -> dict[str, Any]:
    """Deployment params are defaults: the client's own values win."""
    params = cand.deployment.params
    return {**params, **body} if params else body


async def open_stream(
    cand: Candidate, body: dict[str, Any], call: CallContext, op: Operation = CHAT
) -> tuple[ChatChunk, AsyncIterator[ChatChunk]]:
    """Start the upstream stream and wait for its first chunk (within the first-byte timeout).

    Nothing has been sent to the client yet, so any failure here may still be retried or fall
    back, and is reported with a proper HTTP status.
    """
    name = cand.deployment.config.name
    chunks = op.stream(cand.deployment.provider, body, call)
    try:
        async with asyncio.timeout(call.timeouts.first_byte):
            first = await anext(chunks)
    except StopAsyncIteration:
        raise ProviderBadResponse(
            f"Provider '{name}' ended the stream before sending anything"
        ) from None
    except TimeoutError:
        await aclose_chunks(chunks)
        raise ProviderTimeout(
            f"Provider '{name}' sent no first token within {call.timeouts.first_byte:g}s"
        ) from None
    except BaseException:
        await aclose_chunks(chunks)
        raise
    return first, chunks


async def attempt(
    request: web.Request,
    ctx: RequestContext,
    cand: Candidate,
    body: dict[str, Any],
    op: Operation = CHAT,
) -> dict[str, Any] | tuple[ChatChunk, AsyncIterator[ChatChunk]]:
    """One upstream attempt of ``op`` on one deployment: the response, or a stream's first
    chunk and the rest.  Timing, health, span; any exception leaves as a ``GatewayError`` (a plugin
    bug as ``InternalError``), so the plan can account for it."""
    runtime = ctx.runtime
    health = runtime.health
    telemetry = runtime.telemetry
    dep = cand.deployment
    name = dep.config.name
    ctx.attempts += 1
    ctx.provider, ctx.deployment, ctx.upstream_model = name, dep.id, cand.upstream_model
    call = CallContext(
        request_id=ctx.request_id,
        upstream_model=cand.upstream_model,
        timeouts=dep.timeouts,
        headers=ctx.trace_headers,
        include_usage=ctx.include_usage,
    )
    sent = _body_for(cand, body)
    metrics = runtime.metrics
    outcome = "CANCELLED"
    started = time.perf_counter()
    with (
        telemetry.client_span(
            op.name + " " + cand.upstream_model, _attempt_attributes(ctx, cand, op.name)
        )
        if telemetry.recording()
        else NO_SPAN as span
    ):
        if span is not None:
            ctx.trace_headers.clear()
            telemetry.inject(ctx.trace_headers)
            if op is CHAT:
                telemetry.record_input(span, body.get("messages") or [])
        try:
            result: dict[str, Any] | tuple[ChatChunk, AsyncIterator[ChatChunk]]
            if ctx.stream:
                result = await open_stream(cand, sent, call, op)
                telemetry.record_response(span, result[0])
            else:
                result = await op.call(dep.provider, sent, call)
                telemetry.record_response(span, result)
            outcome = "ok"
        except GatewayError as exc:
            ctx.runtime.settings.scrubber.scrub_error(exc)  # whatever the plugin: no secret goes on
            outcome = exc.code
            telemetry.record_error(span, exc.code, exc.message)
            if isinstance(exc, ProviderConnectionFailed):
                health.mark(name, False, exc.message)
            raise
        except Exception as exc:
            # A plugin bug: the breaker, metrics and logs record it like any other failure.
            outcome = "INTERNAL_ERROR"
            ctx.log.opt(exception=exc).error("provider {} raised {}", name, type(exc).__name__)
            telemetry.record_error(span, outcome, type(exc).__name__)
            raise InternalError(f"Internal error in provider '{name}'") from exc
        finally:
            elapsed = time.perf_counter() - started
            ctx.upstream_secs += elapsed
            metrics.attempt_finished(name, dep.id, outcome, elapsed, op.name)
    dep.observe_latency(elapsed)
    health.mark(name, True, "request succeeded")
    return result


def _attempt_attributes(
    ctx: RequestContext, cand: Candidate, operation: str = "chat"
) -> dict[str, Any]:
    """GenAI + inference attributes of an attempt's client span (built only when tracing)."""
    dep = cand.deployment
    return {
        "gen_ai.operation.name": operation,
        "gen_ai.request.model": cand.upstream_model,
        "gen_ai.provider.name": dep.config.plugin,
        "inference.provider": dep.config.name,
        "inference.deployment": dep.id,
        "inference.route": cand.route.name,
        "inference.attempt": ctx.attempts,
        "inference.variant": f"{ctx.experiment}/{ctx.variant}" if ctx.variant else "",
    }


async def stream(
    request: web.Request,
    ctx: RequestContext,
    lease: Lease,
    body: dict[str, Any],
    first: ChatChunk,
    chunks: AsyncIterator[ChatChunk],
    *,
    cached: Lookup | None = None,
    relay_with: Callable[..., Awaitable[str | None]] = relay,
    sink: Sink | None = None,
    encode: Callable[[Any], bytes] = sse_event,
) -> web.StreamResponse:
    """Send the 200 + SSE headers now that a first chunk exists, then relay the rest
    (``relay_with``: chat's and completions' ``streaming.relay``, or the Responses events) and
    hand a chat stream to the response cache when it ends normally.  ``encode`` writes one SSE
    event (the Responses API's are named).  A WebSocket request (websocket.py) passes its own
    ``sink`` instead: no HTTP response is made."""
    dep = lease.deployment
    ctx.first_token_secs = time.perf_counter() - ctx.started
    response: web.StreamResponse = NO_RESPONSE
    if sink is None:
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        response.headers["x-request-id"] = ctx.request_id
        response.headers.update(ctx.routing_headers())
        try:
            await response.prepare(request)
        except BaseException:
            await aclose_chunks(chunks)
            raise
        sink = SSESink(request, response, ctx.runtime.settings.server.error_format, encode)
    ctx.status = 200
    telemetry = ctx.runtime.telemetry
    # Only chat is cached: a stream is handed to the cache's collector when there is one.
    extra = {} if cached is None else {"collector": cached.collector()}
    try:
        with telemetry.span("inference.stream", {"inference.deployment": dep.id}) as span:
            text = await relay_with(
                sink,
                ctx,
                body,
                first,
                chunks,
                include_usage=ctx.include_usage,
                scrubber=ctx.runtime.settings.scrubber,  # the request's runtime (issue 16)
                collect_text=span is not None and telemetry.record_content,
                **extra,
            )
            if text is not None:
                telemetry.record_output_text(span, text)
            if span is not None:
                if ctx.usage and isinstance(ctx.usage.get("completion_tokens"), int):
                    span.set_attribute("gen_ai.usage.output_tokens", ctx.usage["completion_tokens"])
                if ctx.error_code is not None:
                    telemetry.record_error(span, ctx.error_code, ctx.error_code)
    finally:
        ctx.stream_secs = time.perf_counter() - ctx.started - ctx.first_token_secs
    if ctx.error_code not in (None, "CLIENT_DISCONNECTED", "SERVICE_UNAVAILABLE"):
        # The deployment broke the stream it had started: a fault.
        lease.broke(ctx.error_code, "the stream broke after it started")
    return response


#: What ``stream`` returns for a WebSocket request (its frames went to its sink; never sent).
NO_RESPONSE: web.StreamResponse = web.Response(status=200)


def start_shadow(
    app: web.Application,
    router: Router,
    experiment: Experiment,
    body: dict[str, Any],
    request_id: str,
) -> None:
    """Mirror the request to the experiment's shadow model in the background (never awaited)."""
    tasks = app[BACKGROUND]
    task = asyncio.create_task(run_shadow(app, router, experiment, dict(body), request_id))
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def run_shadow(
    app: web.Application,
    router: Router,
    experiment: Experiment,
    body: dict[str, Any],
    request_id: str,
) -> None:
    """One non-streaming call to the shadow model (on the router of the request's runtime
    snapshot); its outcome goes beside the variants'."""
    spec = experiment.spec.shadow
    if spec is None:
        return
    body.pop("stream", None)
    body.pop("stream_options", None)
    started = time.perf_counter()
    error: str | None = None
    usage: dict[str, Any] | None = None
    deployment = "-"
    try:
        candidates = router.candidates(router.resolve(spec.model), spec.model)
        cand = next((c for c in candidates if c.deployment.selectable()), None)
        if cand is None:
            raise NoDeploymentAvailable(f"no deployment of shadow model '{spec.model}'")
        deployment = cand.deployment.id
        call = CallContext(
            request_id=f"{request_id}-shadow",
            upstream_model=cand.upstream_model,
            timeouts=cand.deployment.timeouts,
        )
        result = await cand.deployment.provider.chat(_body_for(cand, body), call)
        usage = result.get("usage")
    except GatewayError as exc:
        error = exc.code
    except Exception:  # noqa: BLE001 (a shadow bug must never surface; it is logged)
        logger.bind(request_id=request_id).exception("shadow request failed")
        error = "INTERNAL_ERROR"
    secs = time.perf_counter() - started
    experiment.shadow_stats.record(secs, error is not None, usage)
    app[METRICS].shadow_finished(experiment.name, error or "ok", secs)
    logger.bind(request_id=request_id).info(
        "shadow {} via {}: {} in {:.1f}ms", spec.model, deployment, error or "ok", secs * 1000
    )
