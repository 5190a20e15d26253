"""Circuit breaker state machine on a controllable clock."""

from __future__ import annotations

import dataclasses

from inference_server.breaker import CircuitBreaker
from inference_server.settings import BreakerSettings

SETTINGS = BreakerSettings(
    enabled=True,
    window_secs=10,
    min_requests=4,
    failure_rate=0.5,
    consecutive_failures=3,
    cooldown_secs=5,
    max_cooldown_secs=60,
    half_open_probes=1,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(b: CircuitBreaker) -> str:
    """The breaker's state, read through a call so mypy does not narrow it between steps."""
    return b.state


def make(**overrides: object) -> tuple[CircuitBreaker, Clock, list[tuple[str, str]]]:
    clock = Clock()
    seen: list[tuple[str, str]] = []
    settings = dataclasses.replace(SETTINGS, **overrides)  # type: ignore[arg-type]
    b = CircuitBreaker("p/m", settings, clock=clock, listener=lambda _n, o, n: seen.append((o, n)))
    return b, clock, seen


def test_consecutive_failures_open_then_half_open_then_closed() -> None:
    b, clock, seen = make()
    for _ in range(2):
        b.record_failure()
    assert state(b) == "closed"
    b.record_failure()
    assert state(b) == "open"
    assert not b.available()
    assert not b.acquire()
    clock.now += 5
    assert b.available()
    assert b.current_state() == "half_open"
    assert b.acquire()  # the one probe
    assert not b.acquire()  # no second probe while it is out
    b.record_success()
    assert state(b) == "closed"
    assert seen == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_failure_rate_needs_min_requests() -> None:
    b, _clock, _ = make(consecutive_failures=100)
    b.record_success()
    b.record_failure()
    b.record_success()
    assert state(b) == "closed"  # 1/3 failed, and fewer than 4 outcomes
    b.record_failure()
    assert state(b) == "open"  # 2/4 = 50 % over >= 4 requests


def test_window_forgets_old_outcomes() -> None:
    b, clock, _ = make(consecutive_failures=100)
    b.record_failure()
    b.record_failure()
    clock.now += 11  # past the window
    b.record_success()
    b.record_success()
    b.record_failure()
    assert b.window() == (2, 1)
    assert state(b) == "closed"


def test_failed_probe_reopens_with_doubled_cooldown() -> None:
    b, clock, _ = make()
    for _ in range(3):
        b.record_failure()
    clock.now += 5
    assert b.acquire()
    b.record_failure()
    assert state(b) == "open"
    assert b.cooldown == 10
    clock.now += 9
    assert not b.available()
    clock.now += 1
    assert b.acquire()
    b.record_success()
    assert state(b) == "closed"
    assert b.cooldown == 5


def test_retry_after_pauses_exactly_that_long() -> None:
    b, clock, _ = make()
    b.record_failure(retry_after=2)
    assert state(b) == "open"
    clock.now += 1.9
    assert not b.available()
    clock.now += 0.1
    assert b.acquire()


def test_disabled_breaker_never_opens() -> None:
    b, _clock, _ = make(enabled=False)
    for _ in range(50):
        b.record_failure()
    assert b.acquire()
    assert b.available()


def test_release_frees_a_probe_slot() -> None:
    b, clock, _ = make()
    for _ in range(3):
        b.record_failure()
    clock.now += 5
    assert b.acquire()
    b.release()
    assert b.acquire()
