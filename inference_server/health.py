"""Provider health as /health reports it: probed at most every N seconds, failures count at once.

A probe result older than ``health.probe_max_age_secs`` is refreshed on the next /health call
(concurrent callers share one probe).  A connection failure seen by a real request marks the
provider down immediately, and a success marks it up, so /health never lags real traffic.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from loguru import logger

from inference_server.providers.base import HealthStatus, Provider


@dataclass(slots=True)
class _State:
    healthy: bool = False
    detail: str = "not probed yet"
    checked_at: float = float("-inf")


class HealthMonitor:
    """Tracks one health state per provider instance."""

    def __init__(
        self, providers: dict[str, Provider], *, max_age_secs: float, probe_timeout_secs: float
    ) -> None:
        self.providers = providers
        self.max_age = max_age_secs
        self.probe_timeout = probe_timeout_secs
        self._states = {name: _State() for name in providers}
        self._probes: dict[str, asyncio.Task[None]] = {}

    def mark(self, name: str, healthy: bool, detail: str) -> None:
        """Record what a real request just learned about provider ``name``."""
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

    async def _probe(self, name: str) -> None:
        provider = self.providers[name]
        try:
            async with asyncio.timeout(self.probe_timeout):
                result = await provider.health()
        except TimeoutError:
            result = HealthStatus(False, f"probe timed out after {self.probe_timeout:g}s")
        self.mark(name, result.healthy, result.detail)

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

    async def aclose(self) -> None:
        """Cancel probes still running at shutdown."""
        for task in self._probes.values():
            task.cancel()
        await asyncio.gather(*self._probes.values(), return_exceptions=True)
