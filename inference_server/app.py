"""``create_app``: the one place the application is assembled.

Order matters: settings first; then resources in ``cleanup_ctx`` order of dependency (telemetry,
the single shared ClientSession, the providers that borrow it with the router and health checks
built on them); then middlewares (outermost first) and routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
from aiohttp import web
from loguru import logger

from inference_server import logs, reload, tenancy, websocket
from inference_server.cache import cache_ctx
from inference_server.endpoints.store import response_store_ctx
from inference_server.handlers import setup_routes
from inference_server.health import HealthMonitor
from inference_server.keys import (
    BACKGROUND,
    HEALTH,
    HTTP_SESSION,
    IN_FLIGHT,
    METRICS,
    ROUTER,
    RUNTIME,
    SETTINGS,
    TELEMETRY,
    InFlight,
    RuntimeRef,
)
from inference_server.metrics import Metrics
from inference_server.middlewares import error_envelope, request_context
from inference_server.providers.base import Provider
from inference_server.routing import Router
from inference_server.server import cut_at_deadline
from inference_server.settings import Settings
from inference_server.state import state_ctx
from inference_server.telemetry import Telemetry


def _dumps(obj: object) -> str:
    return orjson.dumps(obj).decode()


def pool_keepalive(secs: float) -> float:
    """The connector's ``keepalive_timeout`` that closes idle upstream connections within
    ``secs`` of their last use (0: no reuse, as before).

    aiohttp closes idle pooled connections in a sweep that runs every ``keepalive_timeout``
    and drops those idle for at least that long, so a connection released just after a sweep
    lived up to twice the setting (a 30 s setting: up to 60 s, past the upstream's own
    keep-alive, where a reused connection meets a server that already closed it).  Half the
    setting bounds the idle life by the setting itself (a connection idle longer than half of it
    is not reused, aiohttp checks that on acquire).
    """
    return secs / 2


async def _http_session_ctx(app: web.Application) -> AsyncIterator[None]:
    """The one pooled ClientSession every provider shares (keep-alive, limits from settings)."""
    hc = app[SETTINGS].http_client
    connector = aiohttp.TCPConnector(
        limit=hc.pool_size,
        limit_per_host=hc.pool_size_per_host,
        keepalive_timeout=pool_keepalive(hc.keepalive_timeout_secs),
        ttl_dns_cache=int(hc.dns_cache_secs) or None,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        json_serialize=_dumps,
        timeout=aiohttp.ClientTimeout(total=None),  # each call sets its own limits
        trust_env=False,
    )
    app[HTTP_SESSION] = session
    yield
    await session.close()


async def _providers_ctx(app: web.Application) -> AsyncIterator[None]:
    """Providers (plugin factories + the shared session), the router and the health monitor."""
    settings = app[SETTINGS]
    session = app[HTTP_SESSION]
    providers: dict[str, Provider] = {}
    for name, config in settings.providers.items():
        plugin = settings.plugins[config.plugin].plugin
        providers[name] = plugin.factory(session, config)
    metrics = app[METRICS]
    router = Router(settings, providers, on_breaker=metrics.breaker_transition)
    known_names(settings, router, metrics)
    for dep in router.deployments:
        metrics.breaker_state(dep.id, dep.breaker.state)
    health = make_health(settings, providers, router)
    app[ROUTER] = router
    app[HEALTH] = health
    health.start()
    if not settings.routes and not settings.allowed_models:
        # The shorthand serves whatever name its provider has: the names it lists (bounded)
        # become metric labels, read now and kept current; any other name counts as "other".
        await list_models(router, metrics, settings.health_probe_timeout_secs)
        app[BACKGROUND].add(asyncio.create_task(_keep_listing_models(app, metrics)))
    yield
    background = app[BACKGROUND]
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await health.aclose()
    await router.aclose()


def make_health(
    settings: Settings, providers: dict[str, Provider], router: Router
) -> HealthMonitor:
    """The health monitor of ``providers`` (start-up, and every reload's new runtime)."""
    return HealthMonitor(
        providers,
        router,
        max_age_secs=settings.health_probe_max_age_secs,
        probe_timeout_secs=settings.health_probe_timeout_secs,
        intervals=settings.health_checks,
    )


#: How often the shorthand's provider is asked for its models (metric labels, see above).
LISTED_MODELS_REFRESH_SECS = 60.0


def known_names(settings: Settings, router: Router, metrics: Metrics) -> None:
    """Tell metrics every name the configuration declares: only these (and the models the
    shorthand's provider lists) become label values; the rest count as "other"."""
    experiments = settings.experiments.values()
    metrics.know(
        models=[
            settings.default_model,
            *settings.allowed_models,
            *settings.routes,
            *settings.aliases,
            *settings.experiments,
        ],
        routes=[*router.routes_status(), *settings.allowed_models],
        providers=settings.providers,
        deployments=[
            *(dep.id for dep in router.deployments),
            # The shorthand's per-model deployments of the names the configuration declares.
            *(
                f"{router.shorthand.deployments[0].config.name}/{m}"
                for m in (settings.default_model, *settings.allowed_models)
                if router.shorthand is not None
            ),
        ],
        experiments=[exp.name for exp in experiments],
        variants=[variant.name for exp in experiments for variant in exp.variants],
    )


async def list_models(router: Router, metrics: Metrics, limit_secs: float) -> None:
    """One read of the provider's model list into metrics (a failure keeps the last list)."""
    try:
        async with asyncio.timeout(limit_secs):
            models = await router.list_models()
        shorthand = router.shorthand
        metrics.listed_models(
            (str(m.get("id")) for m in models),
            shorthand.deployments[0].config.name if shorthand is not None else None,
        )
    except Exception as exc:  # noqa: BLE001 (labels only: the provider may be down)
        logger.debug("metrics: could not list the provider's models: {}", exc)


async def _keep_listing_models(app: web.Application, metrics: Metrics) -> None:
    while True:
        await asyncio.sleep(LISTED_MODELS_REFRESH_SECS)
        router = app[RUNTIME].current.router  # the current one after a reload (issue 16)
        await list_models(router, metrics, LISTED_MODELS_REFRESH_SECS / 2)


async def _telemetry_ctx(app: web.Application) -> AsyncIterator[None]:
    telemetry = Telemetry(app[SETTINGS].traces)
    app[TELEMETRY] = telemetry
    yield
    telemetry.shutdown()
    await logs.complete()


async def _cut_at_deadline(app: web.Application) -> None:
    """on_shutdown: every request still running just before the deadline is answered.

    Streams end with their in-band error event, requests that sent nothing yet get a 503 JSON
    (see ``middlewares.error_envelope``), instead of aiohttp cancelling them and closing their
    sockets in the same tick at (or, for a second ``shutdown_timeout``, after) the deadline.
    """
    await cut_at_deadline(app, app[SETTINGS].server.shutdown_timeout_secs)


def create_app(settings: Settings, loader: Callable[[], Settings] | None = None) -> web.Application:
    """Assemble the gateway for already-validated ``settings``; ``loader`` re-reads them for a
    hot reload (SIGHUP, ``POST /admin/reload``; None: reloads are refused)."""
    app = web.Application(
        # error_envelope also tracks every handler task for the shutdown deadline (its 503).
        middlewares=[request_context, error_envelope],
        client_max_size=settings.server.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics(settings.metrics)
    app[IN_FLIGHT] = InFlight()
    app[RUNTIME] = RuntimeRef()  # issue 16: the reloadable snapshot (reload.runtime_ctx)
    background: set[asyncio.Task[None]] = set()
    app[BACKGROUND] = background
    app.on_shutdown.append(_cut_at_deadline)
    app.cleanup_ctx.append(_telemetry_ctx)
    app.cleanup_ctx.append(_http_session_ctx)
    app.cleanup_ctx.append(state_ctx)
    app.cleanup_ctx.append(cache_ctx)  # borrows state's Redis client
    app.cleanup_ctx.append(response_store_ctx)  # the Responses API's store (issue 14)
    app.cleanup_ctx.append(_providers_ctx)
    tenancy.install(app, settings)  # issue 12: keys, limits, usage, CORS (off: nothing added)
    reload.install(app, loader)  # issue 16: the runtime snapshot, hot reload (after the above)
    setup_routes(app)
    websocket.install(app)  # issue 15: GET upgrades on /v1/chat/completions and /v1/responses
    app[METRICS].know(
        endpoints=["unmatched", *(r.canonical for r in app.router.resources())],
    )
    return app
