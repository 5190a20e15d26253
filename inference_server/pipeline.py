"""The request pipeline, top-down in one place.

``chat_completions`` reads as the gateway works:
admit → validate → cache → route (experiment → variant → route) → attempt (plan of deployments,
breakers, fallbacks, retry rounds, budget) → respond or stream → record.
Steps that later issues fill in (auth, rate limits, cache) have their slot here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web
from loguru import logger

from inference_server.body import read_json
from inference_server.context import RequestContext
from inference_server.errors import (
    CircuitOpen,
    GatewayError,
    InvalidRequest,
    NoDeploymentAvailable,
    ProviderBadResponse,
    ProviderConnectionFailed,
    ProviderRejected,
    ProviderTimeout,
)
from inference_server.keys import (
    BACKGROUND,
    CTX,
    HEALTH,
    METRICS,
    OPEN_STREAMS,
    RETRIER,
    ROUTER,
    SETTINGS,
    TELEMETRY,
)
from inference_server.providers.base import CallContext, ChatChunk
from inference_server.routing import SHORTHAND_ROUTE, Candidate, Deployment, Experiment, Route
from inference_server.schemas import validate_chat
from inference_server.streaming import SSE_HEADERS, aclose_chunks, relay
from inference_server.telemetry import NO_SPAN

T = TypeVar("T")
#: One upstream operation on one candidate: ``chat`` or "open the stream, read its first chunk".
Operation = Callable[[Candidate, dict[str, Any], CallContext], Awaitable[T]]


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    app = request.app
    ctx = request[CTX]
    settings = app[SETTINGS]
    router = app[ROUTER]

    # 1. admit — authentication and rate limits slot in here.
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
    try:
        # 5. attempt (deployments, fallbacks, retry rounds: all before the first byte)
        # 6. respond or stream
        if ctx.stream:
            opened, cand = await run(request, ctx, route, body, _open_stream_op)
            first, chunks = opened
            return await stream(request, ctx, cand, body, first, chunks, include_usage)
        result, cand = await run(request, ctx, route, body, _chat_op)
        ctx.usage = result.get("usage")
        return web.Response(body=orjson.dumps(result), content_type="application/json")
    finally:
        # 7. record (metrics and the access log read ctx in the middleware)
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


async def _chat_op(cand: Candidate, body: dict[str, Any], call: CallContext) -> dict[str, Any]:
    return await cand.deployment.provider.chat(_body_for(cand, body), call)


async def _open_stream_op(
    cand: Candidate, body: dict[str, Any], call: CallContext
) -> tuple[ChatChunk, AsyncIterator[ChatChunk]]:
    return await open_stream(cand, _body_for(cand, body), call)


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


async def run(
    request: web.Request,
    ctx: RequestContext,
    route: Route,
    body: dict[str, Any],
    op: Operation[T],
) -> tuple[T, Candidate]:
    """Try the route's plan until one deployment answers, within the request's budget.

    A round walks the plan (the route's deployments in strategy order, then its fallbacks'),
    skipping open breakers and moving on after each retryable failure; a typed failure
    (context length, content policy) jumps to the route's typed fallbacks.  When a whole round
    fails retryably, backoff waits and a new round starts, up to ``max_retries`` rounds, while
    ``routing.max_attempts`` and ``routing.max_time_secs`` allow.
    """
    app = request.app
    router = app[ROUTER]
    limits = app[SETTINGS].routing
    deadline = ctx.started + limits.max_time_secs
    model = ctx.model or ""
    previous: list[Candidate] = []
    metrics = app[METRICS]

    def budget_left() -> bool:
        return ctx.attempts < limits.max_attempts and time.perf_counter() < deadline

    async def one_round() -> tuple[T, Candidate]:
        plan = router.plan(route, model)
        last: GatewayError | None = None
        i = 0
        while i < len(plan) and budget_left():
            cand = plan[i]
            i += 1
            dep = cand.deployment
            if not dep.breaker.acquire():
                last = last or CircuitOpen(f"Deployment {dep.id} is unavailable (circuit open)")
                continue
            if previous:
                before = previous[-1]
                if before.deployment is dep:
                    ctx.retries += 1
                    metrics.retry(dep.id)
                else:
                    ctx.fallbacks += 1
                    metrics.fallback(before.route.name, cand.route.name)
                    ctx.log.info("falling back from {} to {}", before.deployment.id, dep.id)
            previous.append(cand)
            try:
                result = await attempt(request, ctx, cand, body, op)
            except GatewayError as exc:
                record_outcome(dep, exc)
                typed = [] if exc.retryable else router.typed_plan(cand.route, exc.code, model)
                if typed:
                    ctx.log.info("{} on {}: typed fallback", exc.code, dep.id)
                    plan, i, last = typed, 0, exc
                    continue
                if not exc.retryable:
                    raise
                last = exc
                continue
            except asyncio.CancelledError:
                dep.breaker.release()
                raise
            dep.breaker.record_success()
            return result, cand
        if last is None or (isinstance(last, CircuitOpen) and ctx.attempts == 0):
            raise NoDeploymentAvailable(
                f"No deployment of model '{model}' is available now "
                "(circuit breakers open or health checks failing)",
                retry_after=_soonest_retry(router.plan_routes(route)),
            )
        raise last

    return await app[RETRIER].call(
        one_round, max_retries=route.max_retries, budget_left=budget_left
    )


def _soonest_retry(routes: list[Route]) -> float | None:
    waits = [
        d.breaker.cooldown - (time.monotonic() - d.breaker.opened_at)
        for r in routes
        for d in r.deployments
        if d.breaker.state == "open"
    ]
    return max(1.0, min(waits)) if waits else None


def record_outcome(dep: Deployment, exc: GatewayError) -> None:
    """Feed the breaker: upstream faults count as failures; a 4xx rejection shows it is alive."""
    if isinstance(exc, ProviderRejected | InvalidRequest):
        dep.breaker.record_success()
    else:
        dep.breaker.record_failure(exc.retry_after if exc.http_status == 429 else None)


async def attempt(
    request: web.Request,
    ctx: RequestContext,
    cand: Candidate,
    body: dict[str, Any],
    op: Operation[T],
) -> T:
    """One upstream attempt on one deployment: timing, health, span, in-flight accounting."""
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
    metrics = app[METRICS]
    outcome = "CANCELLED"
    started = time.perf_counter()
    dep.in_flight += 1
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
            result = await op(cand, body, call)
            outcome = "ok"
            response = result[0] if isinstance(result, tuple) else result
            if isinstance(response, dict):
                telemetry.record_response(span, response)
        except GatewayError as exc:
            outcome = exc.code
            telemetry.record_error(span, exc.code, exc.message)
            if isinstance(exc, ProviderConnectionFailed):
                health.mark(name, False, exc.message)
            raise
        except Exception:
            outcome = "INTERNAL_ERROR"
            raise
        finally:
            elapsed = time.perf_counter() - started
            ctx.upstream_secs += elapsed
            dep.in_flight -= 1
            metrics.attempt_finished(name, dep.id, outcome, elapsed)
    dep.observe_latency(elapsed)
    health.mark(name, True, "request succeeded")
    if ctx.stream:
        dep.in_flight += 1  # the stream keeps the deployment busy until it ends
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
    cand: Candidate,
    body: dict[str, Any],
    first: ChatChunk,
    chunks: AsyncIterator[ChatChunk],
    include_usage: bool,
) -> web.StreamResponse:
    """Send the 200 + SSE headers now that a first chunk exists, then relay the rest."""
    dep = cand.deployment
    try:
        ctx.first_token_secs = time.perf_counter() - ctx.started
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
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
                    include_usage=include_usage,
                    error_format=request.app[SETTINGS].server.error_format,
                    collect_text=span is not None and telemetry.record_content,
                )
                if text is not None:
                    telemetry.record_output_text(span, text)
                if span is not None:
                    if ctx.usage and isinstance(ctx.usage.get("completion_tokens"), int):
                        span.set_attribute(
                            "gen_ai.usage.output_tokens", ctx.usage["completion_tokens"]
                        )
                    if ctx.error_code is not None:
                        telemetry.record_error(span, ctx.error_code, ctx.error_code)
        finally:
            if task is not None:
                open_streams.discard(task)
            ctx.stream_secs = time.perf_counter() - ctx.started - ctx.first_token_secs
        if ctx.error_code not in (None, "CLIENT_DISCONNECTED", "SERVICE_UNAVAILABLE"):
            dep.breaker.record_failure()  # the deployment broke the stream it had started
        return response
    finally:
        dep.in_flight -= 1


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
        plan = router.plan(router.resolve(spec.model), spec.model)
        if not plan:
            raise NoDeploymentAvailable(f"no deployment of shadow model '{spec.model}'")
        cand = plan[0]
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
