"""Health for orchestrators and hot reload (issue 16).

- ``GET /health/live``: the process serves (no upstream call, no state read).
- ``GET /health/ready``: start-up is complete (settings loaded, every provider built) and the
  process is not draining; 503 in the JSON error envelope from SIGTERM on, for
  ``server.drain_delay_secs`` before the listener closes (``server.serve``), so a load balancer
  stops sending before connections are refused.
- Hot reload (SIGHUP, ``POST /admin/reload``): re-read the settings with the same loader and the
  same complete validation as start-up (``settings.load_settings``, what ``--check-config``
  runs), build the new providers, router, health monitor, cache and tenancy, and swap the one
  :class:`~inference_server.keys.Runtime` reference.  A request takes the snapshot once at
  admission, so requests and streams in flight finish on the objects they started with; the
  replaced providers, health checks and cache are closed only after every request that was in
  flight at the swap has ended.  What did not change carries over: a provider whose settings are
  equal is the same object (so its deployments keep breaker, pause, latency and health state,
  see ``Router.adopt``), an unchanged cache keeps its entries, unchanged limits their counters.
  An invalid file changes nothing: the reasons are logged (and returned as a 422).  Settings a
  running process cannot apply (the listening socket, workers, the client pool, logging,
  metrics, tracing, the state backend) are reported as needing a restart and keep their old
  values until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from aiohttp import web
from loguru import logger

from inference_server.cache import CACHE, ResponseCache, make_cache
from inference_server.errors import (
    GatewayError,
    InternalError,
    InvalidSettings,
    ServiceUnavailable,
)
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
    Runtime,
)
from inference_server.providers.base import Provider
from inference_server.routing import Router
from inference_server.settings import ConfigError, Settings
from inference_server.tenancy import TENANCY, Tenancy

#: Re-reads the settings the process was started with (file, environment, command-line flags).
Loader = Callable[[], Settings]


class Reloader:
    """One per app: serialises reloads and closes what a reload replaced once it is idle."""

    def __init__(self, loader: Loader | None) -> None:
        self.loader = loader
        self.lock = asyncio.Lock()
        #: Closing tasks of replaced runtimes (each waits for the requests that may use it).
        self.retiring: set[asyncio.Task[None]] = set()
        #: The start-up runtime: its objects are closed by their own cleanup contexts.
        self.first: Runtime | None = None
        #: With --workers: the supervisor's pid (``POST /admin/reload`` asks it to reload
        #: every worker, this one included, instead of reloading this worker alone).
        self.supervisor_pid: int | None = None
        #: ``POST /admin/reload`` requests waiting for the SIGHUP the supervisor sends back.
        self.waiters: list[asyncio.Future[dict[str, Any]]] = []


RELOADER = web.AppKey("reloader", Reloader)


def install(app: web.Application, loader: Loader | None) -> None:
    """create_app's hook (after every context that builds a runtime object)."""
    app[RELOADER] = Reloader(loader)
    app.cleanup_ctx.append(runtime_ctx)


async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    """The start-up snapshot from what the other contexts built; at cleanup, close what later
    snapshots added (the start-up objects are closed by their own contexts)."""
    first = Runtime(
        settings=app[SETTINGS],
        router=app[ROUTER],
        health=app[HEALTH],
        cache=app[CACHE],
        tenancy=app.get(TENANCY),
        metrics=app[METRICS],
        telemetry=app[TELEMETRY],
    )
    ref = app[RUNTIME]
    ref.current = first
    ref.started = True
    reloader = app[RELOADER]
    reloader.first = first
    yield
    for task in reloader.retiring:
        task.cancel()
    await asyncio.gather(*reloader.retiring, return_exceptions=True)
    current = ref.current
    if current is not first:
        await _close(current, first)


# --- health for orchestrators -------------------------------------------------------------

_LIVE = orjson.dumps({"status": "ok"})


async def live(request: web.Request) -> web.Response:
    """GET /health/live — the process serves requests (nothing else is checked: a liveness
    probe that called upstreams would restart healthy gateways when a provider is down)."""
    return web.Response(body=_LIVE, content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    """GET /health/ready — 200 once start-up is complete, 503 while draining after SIGTERM."""
    ref = request.app[RUNTIME]
    if ref.draining:
        raise ServiceUnavailable("The server is draining: it is shutting down")
    if not ref.started:
        raise ServiceUnavailable("The server is starting")
    body = {"status": "ready", "generation": ref.current.generation}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


# --- reload -----------------------------------------------------------------------------------


#: At most this many problems are quoted in the 422 (all of them are logged).
MAX_PROBLEMS_SHOWN = 20
#: How long ``POST /admin/reload`` under a supervisor waits for its worker's reload.
SUPERVISED_RELOAD_SECS = 30.0


async def admin_reload(request: web.Request) -> web.Response:
    """POST /admin/reload — re-read and apply the settings; 422 (nothing changed) if invalid.

    Under ``--workers`` the request reaches one worker, but every worker must reload: it sends
    SIGHUP to the supervisor (which validates and forwards it to every worker, this one too,
    exactly as for ``kill -HUP``) and answers with this worker's outcome of that reload.
    """
    from inference_server.handlers import require_admin

    require_admin(request)
    app = request.app
    reloader = app[RELOADER]
    pid = reloader.supervisor_pid
    if pid is None:
        report = await reload(app)
    else:
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        reloader.waiters.append(waiter)
        try:
            os.kill(pid, signal.SIGHUP)
            async with asyncio.timeout(SUPERVISED_RELOAD_SECS):
                report = await waiter
        except (OSError, TimeoutError) as exc:
            raise ServiceUnavailable(f"The supervisor did not run the reload: {exc}") from exc
        finally:
            with contextlib.suppress(ValueError):
                reloader.waiters.remove(waiter)
    return web.Response(body=orjson.dumps(report), content_type="application/json")


def request_reload(app: web.Application) -> None:
    """SIGHUP: reload in the background (the outcome is logged)."""
    task = asyncio.create_task(_reload_logged(app))
    background = app[BACKGROUND]
    background.add(task)
    task.add_done_callback(background.discard)


async def _reload_logged(app: web.Application) -> None:
    reloader = app[RELOADER]
    waiters, reloader.waiters = reloader.waiters, []  # POSTs that asked for this SIGHUP
    try:
        report = await reload(app)
    except GatewayError as exc:  # invalid settings: each problem is logged by reload()
        if not isinstance(exc, InvalidSettings):
            logger.warning("reload refused: {}", exc.message)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(exc)
    except Exception:  # noqa: BLE001 (a bug must not pass silently; the old runtime stays)
        logger.exception("reload failed; the running settings are kept")
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(InternalError("The reload failed; the settings are kept"))
    else:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(report)


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_post("/admin/reload", admin_reload)


async def reload(app: web.Application) -> dict[str, Any]:
    """Re-read, validate completely and apply the settings; what changed and what needs a
    restart.  Raises :class:`InvalidSettings` (nothing changed) when they are invalid."""
    reloader = app[RELOADER]
    ref = app[RUNTIME]
    async with reloader.lock:
        if ref.draining:
            raise ServiceUnavailable("The server is draining: no reload")
        if reloader.loader is None:
            raise ServiceUnavailable("This server was not started from a settings file")
        try:
            # dynaconf reads files and the environment: off the event loop.
            settings = await asyncio.to_thread(reloader.loader)
        except ConfigError as exc:
            for problem in exc.problems:
                logger.error("reload rejected, settings kept: {}", problem)
            shown = exc.problems[:MAX_PROBLEMS_SHOWN]
            more = len(exc.problems) - len(shown)
            raise InvalidSettings(
                "Settings are invalid; the running ones are kept: "
                + "; ".join(shown)
                + (f"; and {more} more (see the log)" if more > 0 else "")
            ) from exc
        old = ref.current
        new, fresh = _build(app, old, settings)
        restart = needs_restart(old.settings, settings, tenancy=old.tenancy is not None)
        carried = new.router.adopt(old.router)
        new.health.adopt(old.health)
        for dep in new.router.deployments:
            app[METRICS].breaker_state(dep.id, dep.breaker.state)
        kept = {dep.id for dep in new.router.deployments}
        for dep in old.router.deployments:
            if dep.id not in kept:
                app[METRICS].forget_breaker(dep.id)
        if new.tenancy is not None and new.tenancy is not old.tenancy:
            keys = new.tenancy.keys  # shared with the old snapshot: one reference swap
            keys.static = {k.key_sha256: k for k in new.tenancy.settings.keys}
        ref.current = new  # the swap: requests admitted from now on see the new runtime
        new.health.start()
        _after_swap(app, new)
        before, after = old.settings.raw, settings.raw
        changed = sorted(k for k in {*before, *after} if before.get(k) != after.get(k))
        report: dict[str, Any] = {
            "object": "reload",
            "status": "reloaded",
            "generation": new.generation,
            "changed": changed,
            "restart_required": restart,
            "new_providers": sorted(fresh),
            "carried_deployments": carried,
        }
        logger.info(
            "settings reloaded (generation {}): changed {}; state carried for {}",
            new.generation,
            ", ".join(changed) or "nothing",
            ", ".join(carried) or "no deployment",
        )
        if restart:
            logger.warning(
                "reload: these settings need a restart and keep their old values: {}",
                ", ".join(restart),
            )
        _retire(app, old, new)
        return report


def _build(app: web.Application, old: Runtime, settings: Settings) -> tuple[Runtime, list[str]]:
    """The new runtime (nothing swapped yet) and the names of the providers built anew.

    A provider whose settings are equal to the running one's is reused (same object: the
    deployments on it keep their state); a plugin factory that fails rejects the reload.
    """
    session = app[HTTP_SESSION]
    providers: dict[str, Provider] = {}
    fresh: list[str] = []
    for name, config in settings.providers.items():
        previous = old.router.providers.get(name)
        if previous is not None and previous.config == config:
            providers[name] = previous
            continue
        try:
            providers[name] = settings.plugins[config.plugin].plugin.factory(session, config)
        except Exception as exc:
            # What start-up would die of: the reload is refused; the ones built are dropped.
            logger.error("reload rejected, settings kept: provider {}: {}", name, exc)
            for built in fresh:
                _close_later(app[RELOADER], providers[built])
            raise InvalidSettings(
                f"Settings are invalid; the running ones are kept: provider {name}: {exc}"
            ) from exc
        fresh.append(name)
    metrics = app[METRICS]
    router = Router(settings, providers, on_breaker=metrics.breaker_transition)
    from inference_server.app import known_names, make_health  # (app imports this module)

    known_names(settings, router, metrics)
    health = make_health(settings, providers, router)
    cache: ResponseCache | None = old.cache
    if (
        settings.cache != old.settings.cache
        or settings.routing.max_time_secs != old.settings.routing.max_time_secs
    ):
        cache = make_cache(app, settings)
    tenancy = old.tenancy
    if tenancy is not None and tenancy.settings != settings.tenancy:
        tenancy = _tenancy(tenancy, settings)
    runtime = Runtime(
        settings=settings,
        router=router,
        health=health,
        cache=cache,
        tenancy=tenancy,
        metrics=old.metrics,
        telemetry=old.telemetry,
        generation=old.generation + 1,
    )
    return runtime, fresh


def _tenancy(old: Tenancy, settings: Settings) -> Tenancy:
    """Keys, limits, budgets and CORS of ``settings`` on the running limiter, ledger and
    virtual keys (counters of unchanged scopes go on; compiled plans are rebuilt)."""
    t = settings.tenancy
    old.metrics.know(k.name for k in t.keys)
    return dataclasses.replace(old, settings=t, plans={})


def needs_restart(old: Settings, new: Settings, *, tenancy: bool) -> list[str]:
    """The settings that changed but take effect only after a restart."""
    out = [
        f"server.{f.name}"
        for f in dataclasses.fields(old.server)
        if getattr(old.server, f.name) != getattr(new.server, f.name)
    ]
    for name, a, b in (
        ("http_client", old.http_client, new.http_client),
        ("logging", old.logging, new.logging),
        ("telemetry", old.traces, new.traces),
        ("metrics", old.metrics, new.metrics),
        ("state", old.state, new.state),
        ("responses", old.responses, new.responses),
        ("usage.flush_secs", old.tenancy.flush_secs, new.tenancy.flush_secs),
        ("auth.key_refresh_secs", old.tenancy.key_refresh_secs, new.tenancy.key_refresh_secs),
    ):
        if a != b:
            out.append(name)
    wants = new.tenancy.active or bool(new.tenancy.cors_origins)
    if wants and not tenancy:
        out.append("auth/limits/cors (turned on: their hooks are installed at start-up)")
    return out


def _after_swap(app: web.Application, new: Runtime) -> None:
    """The shorthand's model list (metric labels) for a router whose provider is new."""
    if new.router.shorthand is not None and not new.settings.allowed_models:
        from inference_server.app import list_models

        task = asyncio.create_task(
            list_models(new.router, app[METRICS], new.settings.health_probe_timeout_secs)
        )
        background = app[BACKGROUND]
        background.add(task)
        task.add_done_callback(background.discard)


def _close_later(reloader: Reloader, provider: Provider) -> None:
    """Close a provider no request has seen (a refused reload built it)."""

    async def close() -> None:
        try:
            await provider.aclose()
        except Exception:  # noqa: BLE001 (logged; nothing else depends on it)
            logger.exception("reload: closing provider {} failed", provider.config.name)

    task = asyncio.create_task(close())
    reloader.retiring.add(task)
    task.add_done_callback(reloader.retiring.discard)


def _retire(app: web.Application, old: Runtime, new: Runtime) -> None:
    """Close what ``old`` has and ``new`` does not, once every request that was in flight at
    the swap has ended (a request admitted later cannot see ``old``)."""
    current = asyncio.current_task()
    waiting = [t for t in app[IN_FLIGHT].tasks if t is not current and not t.done()]
    reloader = app[RELOADER]

    async def retire() -> None:
        try:
            if waiting:
                await asyncio.wait(waiting)
        finally:  # also at shutdown (cancelled): nothing of ``old`` is left running
            await _close(old, new)

    task = asyncio.create_task(retire())
    reloader.retiring.add(task)
    task.add_done_callback(reloader.retiring.discard)


async def _close(old: Runtime, keep: Runtime) -> None:
    """Close the providers, health checks and cache of ``old`` that ``keep`` does not use
    (never the shared ClientSession)."""
    await old.health.aclose()
    kept = {id(p) for p in keep.router.providers.values()}
    for provider in old.router.providers.values():
        if id(provider) not in kept:
            try:
                await provider.aclose()
            except Exception:  # noqa: BLE001 (a plugin's close failing must not stop the rest)
                logger.exception("reload: closing provider {} failed", provider.config.name)
    if old.cache is not None and old.cache is not keep.cache:
        await old.cache.aclose()
