"""A circuit breaker per deployment: closed → open → half-open → closed.

Closed: fault outcomes (connection failures, timeouts, 5xx, broken streams, gateway bugs inside an
attempt) are counted in a sliding time window; the breaker opens when the failure rate over the
window passes ``failure_rate`` with at least ``min_requests`` outcomes, or after
``consecutive_failures`` faults in a row.  Open: selection skips the deployment for a cooldown
(``cooldown_secs``, doubling only when a half-open probe fails, capped by ``max_cooldown_secs``).
Half-open: up to ``half_open_probes`` requests go through; one success closes the breaker, one
fault opens it again.

What the breaker never sees: upstream 429s (backpressure: the deployment is *paused* for the
Retry-After, see ``routing.Deployment.pause``) and upstream 4xx rejections (the deployment is
alive).  A success while open (a panic-routed request, see routing.Plan) closes it: the upstream
is back.  The clock is the router's, injected, so tests drive time instead of sleeping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from loguru import logger

from inference_server.resilience import SlidingWindow, now
from inference_server.settings import BreakerSettings

State = Literal["closed", "open", "half_open"]
Listener = Callable[[str, str, str], None]  # (name, old state, new state)
Clock = Callable[[], float]
_OK, _FAILED = 0, 1


class CircuitBreaker:
    """Fault accounting and admission for one deployment."""

    __slots__ = (
        "_clock",
        "_listener",
        "_probes_in_flight",
        "_window",
        "consecutive",
        "cooldown",
        "last_error",
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
        clock: Clock = now,
        listener: Listener | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self._clock = clock
        self._listener = listener
        self.state: State = "closed"
        self.consecutive = 0
        self.opened_at = 0.0
        self.cooldown = min(settings.cooldown_secs, settings.max_cooldown_secs)
        self.reopen_count = 0
        #: (code, message) of the last fault: what a refusal names as its cause.
        self.last_error: tuple[str, str] | None = None
        self._probes_in_flight = 0
        self._window = SlidingWindow(settings.window_secs, 2, clock)

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

    def retry_in(self) -> float:
        """Seconds until this breaker admits a probe again (0 when it admits now)."""
        if self.state == "open":
            return max(0.0, self.cooldown - (self._clock() - self.opened_at))
        return 0.0

    def window(self) -> tuple[int, int]:
        """(successes, failures) in the sliding window."""
        ok, failed = self._window.totals()
        return ok, failed

    # --- admission and outcomes ------------------------------------------------------------

    def acquire(self) -> bool:
        """Admit one attempt: always when closed; a limited number of probes when half-open.

        Every admitted attempt ends in exactly one of record_success, record_failure or
        release: ``routing.Lease`` guarantees it.
        """
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

    def record_success(self, *, probe: bool = True) -> None:
        """The deployment answered (or rejected the request as a live server does).

        ``probe``: the attempt held a half-open permit from :meth:`acquire` (False for a
        panic-routed attempt that was sent without one).
        """
        self.consecutive = 0
        if self.state == "closed":
            self._window.add(_OK)
            return
        if self.state == "half_open" and probe:
            self._probes_in_flight = max(0, self._probes_in_flight - 1)
        # Proof the upstream is back, whether from a probe or a panic-routed request.
        self.reopen_count = 0
        self.cooldown = min(self.settings.cooldown_secs, self.settings.max_cooldown_secs)
        self._probes_in_flight = 0
        self._window.clear()
        self._transition("closed")

    def record_failure(self, code: str, message: str, *, probe: bool = True) -> None:
        """Count a fault.  A failed half-open probe reopens with a doubled cooldown."""
        self.last_error = (code, message)
        if not self.settings.enabled:
            return
        self.consecutive += 1
        if self.state == "half_open":
            if probe:
                self._probes_in_flight = max(0, self._probes_in_flight - 1)
                self._open(escalate=True)
            return
        if self.state == "open":
            return  # a panic-routed attempt failed: still out, the cooldown is unchanged
        self._window.add(_FAILED)
        if self.consecutive >= self.settings.consecutive_failures:
            self._open(escalate=False)
            return
        ok, failed = self.window()
        total = ok + failed
        if total >= self.settings.min_requests and failed / total >= self.settings.failure_rate:
            self._open(escalate=False)

    def release(self, *, probe: bool = True) -> None:
        """An admitted attempt ended without a verdict (the client left): free its permit."""
        if probe and self.state == "half_open":
            self._probes_in_flight = max(0, self._probes_in_flight - 1)

    def force_open(self, reason: str) -> None:
        """Open from outside (an active health check failed)."""
        if self.settings.enabled and self.state != "open":
            logger.warning("breaker {}: forced open ({})", self.name, reason)
            self.last_error = ("HEALTH_CHECK_FAILED", reason)
            self._open(escalate=False)

    # --- internals -------------------------------------------------------------------------

    def _open(self, *, escalate: bool) -> None:
        s = self.settings
        if escalate:
            self.reopen_count += 1
        self.cooldown = min(s.cooldown_secs * (2**self.reopen_count), s.max_cooldown_secs)
        self.opened_at = self._clock()
        self._probes_in_flight = 0
        self._transition("open")

    def _transition(self, new: State) -> None:
        old = self.state
        if old == new:
            return
        self.state = new
        ok, failed = self.window()
        cause = f", last error {self.last_error[0]}" if self.last_error and new == "open" else ""
        logger.bind(deployment=self.name).log(
            "WARNING" if new == "open" else "INFO",
            "breaker {}: {} → {} (window {} ok / {} failed, {} consecutive{}{})",
            self.name,
            old,
            new,
            ok,
            failed,
            self.consecutive,
            f", cooldown {self.cooldown:g}s" if new == "open" else "",
            cause,
        )
        if self._listener is not None:
            self._listener(self.name, old, new)
