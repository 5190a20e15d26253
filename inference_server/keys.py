"""Typed keys for everything stored on the aiohttp Application or Request (no module state)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from inference_server.context import RequestContext
from inference_server.health import HealthMonitor
from inference_server.metrics import Metrics
from inference_server.routing import Router
from inference_server.settings import Settings
from inference_server.telemetry import Telemetry

if TYPE_CHECKING:
    from inference_server.cache import ResponseCache
    from inference_server.tenancy import Tenancy

SETTINGS = web.AppKey("settings", Settings)
HTTP_SESSION = web.AppKey("http_session", aiohttp.ClientSession)
ROUTER = web.AppKey("router", Router)
HEALTH = web.AppKey("health", HealthMonitor)
TELEMETRY = web.AppKey("telemetry", Telemetry)
METRICS = web.AppKey("metrics", Metrics)
#: Fire-and-forget tasks (shadow traffic), cancelled at cleanup.
BACKGROUND: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("background")
CTX = web.RequestKey("ctx", RequestContext)


@dataclass(slots=True)
class InFlight:
    """Handler tasks running now, and whether the shutdown deadline has cut them."""

    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    cut: bool = False


#: Every request's handler task (middlewares.error_envelope), cut at the shutdown deadline.
IN_FLIGHT = web.AppKey("in_flight", InFlight)


# --- issue 16: the reloadable runtime and the process's lifecycle (reload.py) ----------------


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything a hot reload replaces, as one immutable snapshot.

    A request takes the current snapshot once, at admission (``middlewares.request_context``
    puts it in ``RequestContext.runtime``), and uses only that for its whole life: a reload
    swaps :attr:`RuntimeRef.current` and never changes a snapshot, so a request (or a stream)
    in flight finishes on the providers, routes, limits and cache it started with.
    """

    settings: Settings
    router: Router
    health: HealthMonitor
    cache: ResponseCache | None
    tenancy: Tenancy | None
    #: Not reloaded (metrics and tracing need a restart) but carried in every snapshot, so the
    #: request path reads them as attributes instead of looking them up in the app per use.
    metrics: Metrics
    telemetry: Telemetry
    #: 0 at start-up, +1 per successful reload.
    generation: int = 0


@dataclass(slots=True)
class RuntimeRef:
    """The one mutable reference to the current :class:`Runtime` (set by ``reload.runtime_ctx``
    once start-up built every provider; no request is served before) and the lifecycle flags
    ``/health/ready`` reports."""

    current: Runtime = field(init=False)
    #: True once start-up is complete (``current`` is set).
    started: bool = False
    #: True from SIGTERM on: readiness fails so load balancers stop sending first.
    draining: bool = False


RUNTIME = web.AppKey("runtime", RuntimeRef)
