"""Typed keys for everything stored on the aiohttp Application or Request (no module state)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from inference_server.context import RequestContext
from inference_server.health import HealthMonitor
from inference_server.metrics import Metrics
from inference_server.routing import Router
from inference_server.settings import Settings
from inference_server.telemetry import Telemetry

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
