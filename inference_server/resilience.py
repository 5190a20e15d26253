"""Retry policy pieces the routing plan uses: the backoff schedule and the retry budget.

The gateway is the one retrying layer (SRE book, "retry at one layer"): a request's plan retries
and fails over inside the request's deadline, and the client is told ``x-should-retry: false``
once the gateway has retried.  Two bounds keep retries from multiplying an upstream's trouble:

- per request, the route's ``max_retries`` rounds within ``routing.max_attempts`` and
  ``routing.max_time_secs``;
- per process, a **retry budget** (Envoy's ``retry_budget``, gRPC's retry throttling): over a
  sliding window, retries may be at most ``ratio`` × requests + ``min_retries``.  An upstream that
  fails everything then sees about (1 + ratio) × the client's requests, not (1 + max_retries) ×.

Waits come from ``backoff``'s own generators (exponential, full jitter); an upstream's
Retry-After replaces them where it applies (routing.Plan).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator

import backoff

from inference_server.settings import RetryBudgetSettings, RetrySettings

_BUCKETS = 10


class SlidingWindow:
    """Counts of several kinds over the last ``window_secs``, kept in ten time buckets."""

    __slots__ = ("_bucket_secs", "_buckets", "_clock", "_kinds")

    def __init__(self, window_secs: float, kinds: int, clock: Callable[[], float]) -> None:
        self._bucket_secs = window_secs / _BUCKETS
        self._clock = clock
        self._kinds = kinds
        # [bucket index, count of kind 0, count of kind 1, ...]
        self._buckets: deque[list[int]] = deque()

    def add(self, kind: int, n: int = 1) -> None:
        index = int(self._clock() / self._bucket_secs)
        buckets = self._buckets
        if not buckets or buckets[-1][0] != index:
            buckets.append([index, *([0] * self._kinds)])
            self.expire()
        buckets[-1][kind + 1] += n

    def totals(self) -> list[int]:
        self.expire()
        out = [0] * self._kinds
        for bucket in self._buckets:
            for i in range(self._kinds):
                out[i] += bucket[i + 1]
        return out

    def expire(self) -> None:
        oldest = int(self._clock() / self._bucket_secs) - _BUCKETS + 1
        buckets = self._buckets
        while buckets and buckets[0][0] < oldest:
            buckets.popleft()

    def clear(self) -> None:
        self._buckets.clear()


_REQUESTS, _RETRIES = 0, 1


class RetryBudget:
    """Retries allowed per process: at most ``ratio`` × requests + ``min_retries`` per window."""

    __slots__ = ("_window", "denied", "settings")

    def __init__(self, settings: RetryBudgetSettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self._window = SlidingWindow(settings.window_secs, 2, clock)
        #: Retries refused since start (a metric reads it).
        self.denied = 0

    def request(self) -> None:
        """Count one client request (each plan counts itself once)."""
        self._window.add(_REQUESTS)

    def try_spend(self) -> bool:
        """Take one retry from the budget; False (and counted) when it is spent."""
        requests, retries = self._window.totals()
        s = self.settings
        if retries >= s.ratio * requests + s.min_retries:
            self.denied += 1
            return False
        self._window.add(_RETRIES)
        return True


def backoff_waits(settings: RetrySettings) -> Iterator[float]:
    """Seconds to wait before retry round 1, 2, ...: backoff's exponential with full jitter."""
    expo = backoff.expo(
        base=2, factor=settings.backoff_base_secs, max_value=settings.backoff_max_secs
    )
    next(expo)  # backoff primes its generators with one send(None)
    for value in expo:
        yield backoff.full_jitter(value)


def now() -> float:
    """The default clock of routing, breakers, pauses and budgets (one place)."""
    return time.monotonic()
