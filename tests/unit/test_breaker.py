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
        b.record_failure("PROVIDER_ERROR", "boom")
    assert state(b) == "closed"
    b.record_failure("PROVIDER_ERROR", "boom")
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
    b.record_failure("PROVIDER_ERROR", "boom")
    b.record_success()
    assert state(b) == "closed"  # 1/3 failed, and fewer than 4 outcomes
    b.record_failure("PROVIDER_ERROR", "boom")
    assert state(b) == "open"  # 2/4 = 50 % over >= 4 requests


def test_window_forgets_old_outcomes() -> None:
    b, clock, _ = make(consecutive_failures=100)
    b.record_failure("PROVIDER_ERROR", "boom")
    b.record_failure("PROVIDER_ERROR", "boom")
    clock.now += 11  # past the window
    b.record_success()
    b.record_success()
    b.record_failure("PROVIDER_ERROR", "boom")
    assert b.window() == (2, 1)
    assert state(b) == "closed"


def test_failed_probe_reopens_with_doubled_cooldown() -> None:
    b, clock, _ = make()
    for _ in range(3):
        b.record_failure("PROVIDER_ERROR", "boom")
    clock.now += 5
    assert b.acquire()
    b.record_failure("PROVIDER_ERROR", "boom")
    assert state(b) == "open"
    assert b.cooldown == 10
    clock.now += 9
    assert not b.available()
    clock.now += 1
    assert b.acquire()
    b.record_success()
    assert state(b) == "closed"
    assert b.cooldown == 5


def test_cooldown_escalates_only_on_failed_probes_and_is_capped() -> None:
    b, clock, _ = make(max_cooldown_secs=12)
    for _ in range(3):
        b.record_failure("PROVIDER_ERROR", "boom")
    assert b.cooldown == 5
    for expected in (10, 12, 12):  # 5·2, 5·4 capped at 12, still capped
        clock.now += b.cooldown
        assert b.acquire()
        b.record_failure("PROVIDER_ERROR", "boom")
        assert (state(b), b.cooldown) == ("open", expected)
    assert b.retry_in() == 12
    assert b.last_error == ("PROVIDER_ERROR", "boom")


def test_success_while_open_closes_it() -> None:
    """A panic-routed request (no permit) that succeeds proves the upstream is back."""
    b, _clock, seen = make()
    for _ in range(3):
        b.record_failure("PROVIDER_CONNECTION_FAILED", "refused")
    assert state(b) == "open"
    b.record_failure("PROVIDER_CONNECTION_FAILED", "refused", probe=False)
    assert (state(b), b.cooldown) == ("open", 5)  # a failed panic attempt changes nothing
    b.record_success(probe=False)
    assert state(b) == "closed"
    assert seen[-1] == ("open", "closed")


def test_unpermitted_outcome_does_not_free_a_probe_slot() -> None:
    b, clock, _ = make()
    for _ in range(3):
        b.record_failure("PROVIDER_ERROR", "boom")
    clock.now += 5
    assert b.acquire()  # the probe
    b.release(probe=False)  # a panic attempt ending unjudged must not free the probe's slot
    assert not b.acquire()


def test_disabled_breaker_never_opens() -> None:
    b, _clock, _ = make(enabled=False)
    for _ in range(50):
        b.record_failure("PROVIDER_ERROR", "boom")
    assert b.acquire()
    assert b.available()


def test_release_frees_a_probe_slot() -> None:
    b, clock, _ = make()
    for _ in range(3):
        b.record_failure("PROVIDER_ERROR", "boom")
    clock.now += 5
    assert b.acquire()
    b.release()
    assert b.acquire()
