"""Provider and route health for /health, probed lazily and (optionally) actively.

Lazily: a provider's probe result older than ``health.probe_max_age_secs`` is refreshed on the
next /health call (concurrent callers share one probe).  Actively: providers with
``health_check_interval_secs`` are probed in the background; a failing check takes their
deployments out of selection (the same availability the circuit breakers feed) until a check
passes.  A connection failure seen by a real request marks the provider down at once, a success
marks it up, so /health never lags real traffic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loguru import logger

from inference_server.providers.base import HealthStatus, Provider
from inference_server.routing import Router


@dataclass(slots=True)
class _State:
    healthy: bool = False
    detail: str = "not probed yet"
    checked_at: float = float("-inf")


class HealthMonitor:
    """Tracks one health state per provider instance and runs the active checks."""

    def __init__(
        self,
        providers: Mapping[str, Provider],
        router: Router,
        *,
        max_age_secs: float,
        probe_timeout_secs: float,
        intervals: Mapping[str, float] | None = None,
    ) -> None:
        self.providers = providers
        self.router = router
        self.max_age = max_age_secs
        self.probe_timeout = probe_timeout_secs
        self.intervals = dict(intervals or {})
        self._states = {name: _State() for name in providers}
        self._probes: dict[str, asyncio.Task[HealthStatus]] = {}
        self._loops: list[asyncio.Task[None]] = []

    def mark(self, name: str, healthy: bool, detail: str) -> None:
        """Record what a request or a probe just learned about provider ``name``."""
        state = self._states.get(name)
        if state is None:
            return
        if state.healthy != healthy:
            logger.bind(provider=name).log(
                "INFO" if healthy else "WARNING",
                "provider {} is now {} ({})",
                name,
                "healthy" if healthy else "unhealthy",
                detail,
            )
        state.healthy, state.detail, state.checked_at = healthy, detail, time.monotonic()

    async def _probe(self, name: str) -> HealthStatus:
        provider = self.providers[name]
        try:
            async with asyncio.timeout(self.probe_timeout):
                result = await provider.health()
        except TimeoutError:
            result = HealthStatus(False, f"probe timed out after {self.probe_timeout:g}s")
        self.mark(name, result.healthy, result.detail)
        return result

    async def check(self) -> dict[str, tuple[bool, str]]:
        """Fresh-enough state of every provider (probing the stale ones, concurrently)."""
        now = time.monotonic()
        waits = []
        for name, state in self._states.items():
            if now - state.checked_at <= self.max_age:
                continue
            task = self._probes.get(name)
            if task is None or task.done():
                task = asyncio.create_task(self._probe(name))
                self._probes[name] = task
            waits.append(task)
        if waits:
            await asyncio.gather(*(asyncio.shield(t) for t in waits))
        return {name: (s.healthy, s.detail) for name, s in self._states.items()}

    def start(self) -> None:
        """Start the active health-check loops (providers that configured an interval)."""
        for name, interval in self.intervals.items():
            self._loops.append(asyncio.create_task(self._loop(name, interval)))

    async def _loop(self, name: str, interval: float) -> None:
        while True:  # ends when the app cancels it at cleanup
            result = await self._probe(name)
            self.router.set_provider_health(name, result.healthy, result.detail)
            await asyncio.sleep(interval)

    async def report(self) -> tuple[str, dict[str, Any]]:
        """(status, details): healthy, degraded (a deployment out) or unhealthy (a route has none).

        A deployment is out when its breaker is open, its active check fails, or its provider's
        latest probe failed.
        """
        states = await self.check()
        routes: dict[str, Any] = {}
        any_out = False
        any_route_down = False
        for name, route in self.router.routes_status().items():
            deps: dict[str, Any] = {}
            usable = 0
            deployments = self.router.route_deployments(route)
            for dep in deployments:
                snap = dep.snapshot()
                provider_ok = states.get(dep.config.name, (True, ""))[0]
                snap["available"] = snap["available"] and provider_ok
                usable += snap["available"]
                any_out |= not snap["available"]
                deps[dep.id] = snap
            any_route_down |= usable == 0
            routes[name] = {
                "status": "healthy"
                if usable == len(deployments)
                else ("degraded" if usable else "unhealthy"),
                "strategy": route.strategy,
                "deployments": deps,
            }
        status = "unhealthy" if any_route_down else ("degraded" if any_out else "healthy")
        providers = {
            name: {"status": "healthy" if ok else "unhealthy", "detail": detail}
            for name, (ok, detail) in states.items()
        }
        return status, {"providers": providers, "routes": routes}

    def adopt(self, old: HealthMonitor) -> None:
        """Hot reload (issue 16): a provider the reload kept (the same object) keeps what the
        monitor it replaces knew of it, so /health does not forget a provider that is down."""
        for name, provider in self.providers.items():
            state = old._states.get(name)
            if state is not None and old.providers.get(name) is provider:
                self._states[name] = state

    async def aclose(self) -> None:
        """Cancel probes and loops still running at shutdown."""
        tasks = [*self._probes.values(), *self._loops]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
