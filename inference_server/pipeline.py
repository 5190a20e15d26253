"""The request pipeline, top-down in one place.

``chat_completions`` reads as the gateway works:
admit → validate → cache → route (experiment → variant → route) → attempt (walk the routing
``Plan``: deployments, breakers, pauses, fallbacks, retry rounds, budget, panic) → respond or
stream → record.
Steps that later issues fill in (auth, rate limits, cache) have their slot here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web
from loguru import logger

from inference_server.context import RequestContext
from inference_server.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    NoDeploymentAvailable,
    ProviderBadResponse,
    ProviderConnectionFailed,
    ProviderTimeout,
    UnsupportedMediaType,
)
from inference_server.keys import (
    BACKGROUND,
    CTX,
    HEALTH,
    METRICS,
    OPEN_STREAMS,
    ROUTER,
    SETTINGS,
    TELEMETRY,
)
from inference_server.providers.base import CallContext, ChatChunk
from inference_server.routing import SHORTHAND_ROUTE, Candidate, Experiment, Lease
from inference_server.schemas import validate_chat
from inference_server.server import read_body
from inference_server.streaming import SSE_HEADERS, aclose_chunks, relay
from inference_server.telemetry import NO_SPAN
from inference_server.tenancy import admit


async def read_json(request: web.Request) -> Any:
    """The body as JSON; 415 for another content type, 400 for malformed JSON, 413 if too big."""
    ctype = request.content_type
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got '{ctype or 'none'}'"
        )
    server = request.app[SETTINGS].server
    raw = await read_body(  # 413 over max_body_bytes, 408 when it stalls
        request,
        max_bytes=server.max_body_bytes,
        total_secs=server.body_timeout_secs,
        idle_secs=server.body_idle_timeout_secs,
    )
    if not raw:
        raise InvalidRequest("Request body is empty", code="INVALID_JSON")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"Malformed JSON body: {exc}", code="INVALID_JSON") from exc


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    app = request.app
    ctx = request[CTX]
    settings = app[SETTINGS]
    router = app[ROUTER]

    # 1. admit — authentication (tenancy.access_middleware); limits: step 1b below.
    # 2. validate
    telemetry = app[TELEMETRY]
    with telemetry.span("inference.validate"):
        body = validate_chat(await read_json(request))
    model = body.get("model") or settings.default_model
    body["model"] = model
    ctx.model = model
    ctx.stream = bool(body.get("stream"))
    # 3. cache — response caching slots in here.
    # 4. route: an experiment may answer for this name and pick a variant (another route).
    with telemetry.span("inference.route", {"gen_ai.request.model": model}) as span:
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
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    ctx.include_usage = include_usage
    ctx.queue_secs = time.perf_counter() - ctx.started
    # 1b. admit (issue 12): the key was authenticated before the body was read
    #     (tenancy.access_middleware); now the model is known: its model list, budget, limits.
    admission = await admit(request, ctx, body)
    try:
        # 5. attempt: walk the plan (deployments, fallbacks, retry rounds, budget, panic), all
        #    before the first byte reaches the client.
        plan = router.plan(route, model, ctx, app[METRICS])
        async for lease in plan:
            async with lease:
                try:
                    result = await attempt(request, ctx, lease.candidate, body)
                except GatewayError as exc:
                    plan.failed(lease, exc)
                    continue
                plan.succeeded(lease)
                # 6. respond or stream (a stream keeps its lease: in-flight until it ends)
                if isinstance(result, tuple):
                    first, chunks = result
                    return await stream(request, ctx, lease, body, first, chunks)
                ctx.usage = result.get("usage")
                return web.Response(body=orjson.dumps(result), content_type="application/json")
        raise plan.error()
    finally:
        # 7. record (metrics and the access log read ctx in the middleware)
        admission.settle(ctx)  # tokens settle to the real usage, slots freed, usage ledger
        if experiment is not None and ctx.variant is not None:
            experiment.stats[ctx.variant].record(
                time.perf_counter() - ctx.started,
                ctx.error_code is not None or ctx.status is None,
                ctx.usage,
            )


def assign_variant(
    request: web.Request, ctx: RequestContext, experiment: Experiment, body: dict[str, Any]
) -> str:
    """Pick the variant (sticky), apply its parameter overrides, maybe start shadow traffic."""
    router = request.app[ROUTER]
    variant, how = experiment.assign(request, body, router.rng)
    ctx.set_variant(experiment.name, variant.name)
    ctx.log.debug("experiment {}: variant {} ({})", experiment.name, variant.name, how)
    body.update(variant.params)  # a variant's parameters are the experiment: they win
    shadow = experiment.spec.shadow
    if shadow is not None and router.rng.random() < shadow.fraction:
        start_shadow(request.app, experiment, body, ctx.request_id)
    return variant.model


def _body_for(cand: Candidate, body: dict[str, Any]) -> dict[str, Any]:
    """Deployment params are defaults: the client's own values win."""
    params = cand.deployment.params
    return {**params, **body} if params else body


async def open_stream(
    cand: Candidate, body: dict[str, Any], call: CallContext
) -> tuple[ChatChunk, AsyncIterator[ChatChunk]]:
    """Start the upstream stream and wait for its first chunk (within the first-byte timeout).

    Nothing has been sent to the client yet, so any failure here may still be retried or fall
    back, and is reported with a proper HTTP status.
    """
    name = cand.deployment.config.name
    chunks = cand.deployment.provider.stream_chat(body, call)
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
    request: web.Request, ctx: RequestContext, cand: Candidate, body: dict[str, Any]
) -> dict[str, Any] | tuple[ChatChunk, AsyncIterator[ChatChunk]]:
    """One upstream attempt on one deployment: the chat response, or a stream's first chunk
    and the rest.  Timing, health, span; any exception leaves as a ``GatewayError`` (a plugin
    bug as ``InternalError``), so the plan can account for it."""
    app = request.app
    health = app[HEALTH]
    telemetry = app[TELEMETRY]
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
    metrics = app[METRICS]
    outcome = "CANCELLED"
    started = time.perf_counter()
    with (
        telemetry.client_span("chat " + cand.upstream_model, _attempt_attributes(ctx, cand))
        if telemetry.recording()
        else NO_SPAN as span
    ):
        if span is not None:
            ctx.trace_headers.clear()
            telemetry.inject(ctx.trace_headers)
            telemetry.record_input(span, body.get("messages") or [])
        try:
            result: dict[str, Any] | tuple[ChatChunk, AsyncIterator[ChatChunk]]
            if ctx.stream:
                result = await open_stream(cand, sent, call)
                telemetry.record_response(span, result[0])
            else:
                result = await dep.provider.chat(sent, call)
                telemetry.record_response(span, result)
            outcome = "ok"
        except GatewayError as exc:
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
            metrics.attempt_finished(name, dep.id, outcome, elapsed)
    dep.observe_latency(elapsed)
    health.mark(name, True, "request succeeded")
    return result


def _attempt_attributes(ctx: RequestContext, cand: Candidate) -> dict[str, Any]:
    """GenAI + inference attributes of an attempt's client span (built only when tracing)."""
    dep = cand.deployment
    return {
        "gen_ai.operation.name": "chat",
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
) -> web.StreamResponse:
    """Send the 200 + SSE headers now that a first chunk exists, then relay the rest."""
    dep = lease.deployment
    ctx.first_token_secs = time.perf_counter() - ctx.started
    response = web.StreamResponse(status=200, headers=SSE_HEADERS)
    response.headers["x-request-id"] = ctx.request_id
    response.headers.update(ctx.routing_headers())
    try:
        await response.prepare(request)
    except BaseException:
        await aclose_chunks(chunks)
        raise
    ctx.status = 200
    open_streams = request.app[OPEN_STREAMS]
    task = asyncio.current_task()
    if task is not None:
        open_streams.add(task)
    telemetry = request.app[TELEMETRY]
    try:
        with telemetry.span("inference.stream", {"inference.deployment": dep.id}) as span:
            text = await relay(
                request,
                response,
                ctx,
                body,
                first,
                chunks,
                include_usage=ctx.include_usage,
                error_format=request.app[SETTINGS].server.error_format,
                collect_text=span is not None and telemetry.record_content,
            )
            if text is not None:
                telemetry.record_output_text(span, text)
            if span is not None:
                if ctx.usage and isinstance(ctx.usage.get("completion_tokens"), int):
                    span.set_attribute("gen_ai.usage.output_tokens", ctx.usage["completion_tokens"])
                if ctx.error_code is not None:
                    telemetry.record_error(span, ctx.error_code, ctx.error_code)
    finally:
        if task is not None:
            open_streams.discard(task)
        ctx.stream_secs = time.perf_counter() - ctx.started - ctx.first_token_secs
    if ctx.error_code not in (None, "CLIENT_DISCONNECTED", "SERVICE_UNAVAILABLE"):
        # The deployment broke the stream it had started: a fault.
        lease.broke(ctx.error_code, "the stream broke after it started")
    return response


def start_shadow(
    app: web.Application, experiment: Experiment, body: dict[str, Any], request_id: str
) -> None:
    """Mirror the request to the experiment's shadow model in the background (never awaited)."""
    tasks = app[BACKGROUND]
    task = asyncio.create_task(run_shadow(app, experiment, dict(body), request_id))
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def run_shadow(
    app: web.Application, experiment: Experiment, body: dict[str, Any], request_id: str
) -> None:
    """One non-streaming call to the shadow model; its outcome goes beside the variants'."""
    spec = experiment.spec.shadow
    if spec is None:
        return
    router = app[ROUTER]
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
