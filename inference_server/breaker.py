"""A circuit breaker per deployment: closed → open → half-open → closed.

Closed: outcomes are counted in a sliding time window; the breaker opens when the failure rate
over the window passes ``failure_rate`` with at least ``min_requests`` outcomes, or after
``consecutive_failures`` failures in a row.  Open: the deployment is skipped by selection for a
cooldown (at least an upstream's Retry-After, doubling on repeated trips up to a cap).  Half-open:
up to ``half_open_probes`` requests go through; one success closes the breaker, one failure opens
it again.  A 429 with Retry-After pauses the deployment for exactly that long.  The clock is injectable so tests drive time instead of sleeping.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Literal

from loguru import logger

from inference_server.settings import BreakerSettings

State = Literal["closed", "open", "half_open"]
Listener = Callable[[str, str, str], None]  # (name, old state, new state)

_BUCKETS = 10  # the window is kept as this many time buckets of (successes, failures)


class CircuitBreaker:
    """Failure accounting and admission for one deployment."""

    __slots__ = (
        "_bucket_secs",
        "_buckets",
        "_clock",
        "_listener",
        "_probes_in_flight",
        "consecutive",
        "cooldown",
        "name",
        "opened_at",
        "reopen_count",
        "settings",
        "state",
    )

    def __init__(
        self,
        name: str,
        settings: BreakerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        listener: Listener | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        self._listener = listener
        self.state: State = "closed"
        self.consecutive = 0
        self.opened_at = 0.0
        self.cooldown = settings.cooldown_secs
        self.reopen_count = 0
        self._probes_in_flight = 0
        self._bucket_secs = settings.window_secs / _BUCKETS
        # (bucket index, successes, failures); bucket index = int(now / bucket_secs)
        self._buckets: deque[list[int]] = deque()

    # --- queries ---------------------------------------------------------------------------

    def available(self) -> bool:
        """May selection pick this deployment now?  (No side effects.)"""
        if not self.settings.enabled or self.state == "closed":
            return True
        if self.state == "open":
            return self._clock() - self.opened_at >= self.cooldown
        return self._probes_in_flight < self.settings.half_open_probes

    def current_state(self) -> State:
        """The state as of now (an open breaker past its cooldown reports half_open)."""
        if self.state == "open" and self._clock() - self.opened_at >= self.cooldown:
            return "half_open"
        return self.state

    def window(self) -> tuple[int, int]:
        """(successes, failures) in the sliding window."""
        self._expire()
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)

    # --- admission and outcomes ------------------------------------------------------------

    def acquire(self) -> bool:
        """Admit one attempt: always when closed; a limited number of probes when half-open."""
        if not self.settings.enabled or self.state == "closed":
            return True
        if self.state == "open":
            if self._clock() - self.opened_at < self.cooldown:
                return False
            self._transition("half_open")
        if self._probes_in_flight >= self.settings.half_open_probes:
            return False
        self._probes_in_flight += 1
        return True

    def record_success(self) -> None:
        self.consecutive = 0
        if self.state == "half_open":
            self._probes_in_flight = max(0, self._probes_in_flight - 1)
            self.reopen_count = 0
            self.cooldown = self.settings.cooldown_secs
            self._buckets.clear()
            self._transition("closed")
            return
        self._count(success=True)

    def record_failure(self, retry_after: float | None = None) -> None:
        """Count a failure; ``retry_after`` (an upstream's Retry-After) opens the breaker at once."""
        if not self.settings.enabled:
            return
        self.consecutive += 1
        if self.state == "half_open":
            self._probes_in_flight = max(0, self._probes_in_flight - 1)
            self._open(retry_after, repeated=True)
            return
        if self.state == "open":
            return
        self._count(success=False)
        if retry_after is not None and retry_after > 0:
            # The upstream said exactly how long it is out: pause it that long, no more.
            self._open(retry_after, repeated=False, exact=True)
            return
        if self.consecutive >= self.settings.consecutive_failures:
            self._open(None, repeated=False)
            return
        ok, failed = self.window()
        total = ok + failed
        if total >= self.settings.min_requests and failed / total >= self.settings.failure_rate:
            self._open(None, repeated=False)

    def release(self) -> None:
        """An admitted attempt ended without a verdict (e.g. the client left): free its slot."""
        if self.state == "half_open":
            self._probes_in_flight = max(0, self._probes_in_flight - 1)

    def force_open(self, reason: str) -> None:
        """Open from outside (an active health check failed)."""
        if self.settings.enabled and self.state != "open":
            logger.warning("breaker {}: forced open ({})", self.name, reason)
            self._open(None, repeated=False)

    # --- internals -------------------------------------------------------------------------

    def _open(self, retry_after: float | None, *, repeated: bool, exact: bool = False) -> None:
        s = self.settings
        if repeated:
            self.reopen_count += 1
        if exact and retry_after is not None:
            self.cooldown = min(retry_after, s.max_cooldown_secs)
        else:
            base = s.cooldown_secs * (2**self.reopen_count)
            self.cooldown = min(max(base, retry_after or 0.0), s.max_cooldown_secs)
        self.opened_at = self._clock()
        self._probes_in_flight = 0
        self._transition("open")

    def _transition(self, new: State) -> None:
        old = self.state
        if old == new:
            return
        self.state = new
        ok, failed = self.window()
        logger.bind(deployment=self.name).log(
            "WARNING" if new == "open" else "INFO",
            "breaker {}: {} → {} (window {} ok / {} failed, {} consecutive{})",
            self.name,
            old,
            new,
            ok,
            failed,
            self.consecutive,
            f", cooldown {self.cooldown:g}s" if new == "open" else "",
        )
        if self._listener is not None:
            self._listener(self.name, old, new)

    def _expire(self) -> None:
        oldest = int(self._clock() / self._bucket_secs) - _BUCKETS + 1
        buckets = self._buckets
        while buckets and buckets[0][0] < oldest:
            buckets.popleft()

    def _count(self, *, success: bool) -> None:
        index = int(self._clock() / self._bucket_secs)
        buckets = self._buckets
        if not buckets or buckets[-1][0] != index:
            buckets.append([index, 0, 0])
            self._expire()
        buckets[-1][1 if success else 2] += 1
