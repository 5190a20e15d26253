"""The routing plan's rules on a fake clock: retries, pauses, panic, budget, x-should-retry.

The plan is walked exactly as the pipeline walks it (``async for lease in plan`` / ``async with
lease``), with each deployment's outcome scripted, so every rule is checked without a network.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest
from inference_server_mock import MockProvider

from inference_server.context import RequestContext
from inference_server.errors import (
    GatewayError,
    InternalError,
    NoDeploymentAvailable,
    ProviderConnectionFailed,
    ProviderError,
    ProviderQuotaExceeded,
    ProviderRateLimited,
    ProviderRejected,
)
from inference_server.resilience import RetryBudget, backoff_waits
from inference_server.routing import Plan, Router
from inference_server.settings import RetryBudgetSettings, RetrySettings

RETRY = RetrySettings(
    max_retries=3, backoff_base_secs=0.25, backoff_max_secs=8, retry_after_max_secs=30
)


class FakeTime:
    """The router's clock and sleep: sleeping advances the clock, nothing really waits."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, secs: float) -> None:
        self.slept.append(secs)
        self.now += secs


class Moves:
    def __init__(self) -> None:
        self.retries: list[str] = []
        self.fallbacks: list[tuple[str, str]] = []

    def retry(self, deployment: str) -> None:
        self.retries.append(deployment)

    def fallback(self, from_route: str, to_route: str) -> None:
        self.fallbacks.append((from_route, to_route))


Outcome = Callable[[], GatewayError | None]


def make_router(make_settings, config: dict[str, Any], clock: FakeTime) -> Router:
    settings = make_settings(config)
    providers = {n: MockProvider(None, c) for n, c in settings.providers.items()}  # type: ignore[arg-type]
    return Router(settings, providers, rng=random.Random(1), clock=clock, sleep=clock.sleep)


async def walk(
    router: Router, model: str, outcomes: dict[str, list[GatewayError | None]]
) -> tuple[str | GatewayError, list[str], Plan]:
    """Run one request's plan; ``outcomes[deployment id]`` scripts each attempt (None: ok)."""
    ctx = RequestContext(request_id="t")
    plan = router.plan(router.resolve(model), model, ctx, Moves())
    tried: list[str] = []
    async for lease in plan:
        async with lease:
            dep = lease.deployment.id
            ctx.attempts += 1
            tried.append(dep)
            script = outcomes.get(dep, [])
            exc = script.pop(0) if script else None
            if exc is not None:
                plan.failed(lease, exc)
                continue
            plan.succeeded(lease)
            return dep, tried, plan
    return plan.error(), tried, plan


SHORTHAND = {"inference": {"provider": "mock", "max_retries": 3}}


def refused() -> ProviderConnectionFailed:
    return ProviderConnectionFailed("Connection failed: refused")


# --- backoff and budget --------------------------------------------------------------------


def test_backoff_waits_are_full_jitter_exponential_and_capped() -> None:
    waits = backoff_waits(RETRY)
    values = [next(waits) for _ in range(8)]
    caps = [0.25, 0.5, 1, 2, 4, 8, 8, 8]
    assert all(0 <= v <= cap for v, cap in zip(values, caps, strict=True))


def test_retry_budget_ratio_plus_floor_over_a_sliding_window() -> None:
    clock = FakeTime()
    budget = RetryBudget(RetryBudgetSettings(ratio=0.2, min_retries=3, window_secs=10), clock)
    for _ in range(50):
        budget.request()
    granted = sum(budget.try_spend() for _ in range(100))
    assert granted == 13  # 0.2 × 50 + 3
    assert budget.denied == 87
    clock.now += 11  # the window slid past all of it
    budget.request()
    assert budget.try_spend()


# --- the plan ------------------------------------------------------------------------------


async def test_retry_rounds_back_off_then_succeed(make_settings) -> None:
    clock = FakeTime()
    r = make_router(make_settings, SHORTHAND, clock)
    result, tried, _ = await walk(r, "m", {"local/m": [ProviderError("500"), ProviderError("500")]})
    assert result == "local/m"
    assert tried == ["local/m"] * 3
    assert len(clock.slept) == 2
    assert all(0 <= s <= 0.5 for s in clock.slept)


async def test_gateway_retried_so_client_must_not(make_settings) -> None:
    clock = FakeTime()
    r = make_router(make_settings, SHORTHAND, clock)
    err, tried, _ = await walk(r, "m", {"local/m": [refused() for _ in range(4)]})
    assert isinstance(err, ProviderConnectionFailed)
    assert len(tried) == 4
    assert err.response_headers()["x-should-retry"] == "false"


async def test_no_gateway_retry_lets_the_client_retry(make_settings) -> None:
    clock = FakeTime()
    r = make_router(make_settings, {"inference": {"provider": "mock", "max_retries": 0}}, clock)
    err, tried, _ = await walk(r, "m", {"local/m": [ProviderError("500")]})
    assert isinstance(err, GatewayError)
    assert tried == ["local/m"]
    assert err.response_headers()["x-should-retry"] == "true"


async def test_panic_routes_to_an_ejected_deployment_and_recovers(make_settings) -> None:
    """LM Studio not running: every request is the real 502, and the first one after the
    upstream is back succeeds (no lockout, no 503)."""
    clock = FakeTime()
    r = make_router(make_settings, SHORTHAND, clock)
    for _ in range(3):
        err, _, _ = await walk(r, "m", {"local/m": [refused() for _ in range(4)]})
        assert isinstance(err, ProviderConnectionFailed)
    dep = r.model_deployment("m")
    assert dep.breaker.current_state() == "open"
    slept = len(clock.slept)
    err, tried, plan = await walk(r, "m", {"local/m": [refused()]})
    assert isinstance(err, ProviderConnectionFailed)
    assert tried == ["local/m"]  # one panic attempt, no retry rounds
    assert len(clock.slept) == slept
    assert plan.panicked
    assert err.response_headers()["x-should-retry"] == "false"
    result, _, _ = await walk(r, "m", {})  # the upstream is back
    assert result == "local/m"
    assert dep.breaker.state == "closed"


async def test_refusing_when_panic_is_off_names_the_cause(make_settings) -> None:
    clock = FakeTime()
    r = make_router(make_settings, {**SHORTHAND, "routing": {"panic": False}}, clock)
    for _ in range(2):
        await walk(r, "m", {"local/m": [refused() for _ in range(4)]})
    assert r.model_deployment("m").breaker.current_state() == "open"
    clock.now += 12
    err, tried, _ = await walk(r, "m", {})
    assert tried == []
    assert isinstance(err, NoDeploymentAvailable)
    assert "PROVIDER_CONNECTION_FAILED" in err.message
    assert "refused" in err.message
    assert err.response_headers()["Retry-After"] == "18"  # 30 s cooldown, 12 s gone


async def test_one_models_failures_never_block_another(make_settings) -> None:
    clock = FakeTime()
    r = make_router(make_settings, {**SHORTHAND, "routing": {"panic": False}}, clock)
    for _ in range(2):
        await walk(r, "llama-2-7b", {"local/llama-2-7b": [ProviderError("500")] * 4})
    assert r.model_deployment("llama-2-7b").breaker.state == "open"
    result, _, _ = await walk(r, "mistral-7b", {})
    assert result == "local/mistral-7b"


def limited(secs: float | None) -> ProviderRateLimited:
    return ProviderRateLimited("slow down", code="rate_limit_exceeded", retry_after=secs)


async def test_429_pauses_exactly_and_never_trips_the_breaker(make_settings) -> None:
    clock = FakeTime()
    r = make_router(make_settings, SHORTHAND, clock)
    result, tried, _ = await walk(r, "m", {"local/m": [limited(2), limited(2)]})
    assert result == "local/m"
    assert tried == ["local/m"] * 3
    assert clock.slept == [2, 2]  # waited out exactly the pause, twice
    dep = r.model_deployment("m")
    assert dep.breaker.state == "closed"
    assert dep.breaker.window() == (1, 0)


async def test_429_beyond_the_cap_reaches_the_client_as_429(make_settings) -> None:
    clock = FakeTime()
    r = make_router(
        make_settings, {"inference": {"provider": "mock", "retry_after_max_secs": 5}}, clock
    )
    err, tried, _ = await walk(r, "m", {"local/m": [limited(20)]})
    assert isinstance(err, ProviderRateLimited)
    assert (err.http_status, err.wire_code) == (429, "rate_limit_exceeded")
    assert tried == ["local/m"]
    assert clock.slept == []
    assert err.response_headers()["Retry-After"] == "5"  # what is left of the capped pause
    # Paused 5 s (the cap); the next request, arriving 2 s later, is not sent upstream:
    clock.now += 2
    err, tried, _ = await walk(r, "m", {})
    assert tried == []
    assert isinstance(err, ProviderRateLimited)
    assert err.response_headers()["Retry-After"] == "3"
    assert err.response_headers()["x-should-retry"] == "true"  # the gateway sent nothing
    clock.now += 3
    result, _, _ = await walk(r, "m", {})
    assert result == "local/m"


async def test_429_without_retry_after_pauses_one_second(make_settings) -> None:
    clock = FakeTime()
    r = make_router(make_settings, SHORTHAND, clock)
    result, _, _ = await walk(r, "m", {"local/m": [limited(None)]})
    assert result == "local/m"
    assert clock.slept == [1.0]


async def test_quota_errors_are_never_retried(make_settings) -> None:
    clock = FakeTime()
    r = make_router(make_settings, SHORTHAND, clock)
    quota = ProviderQuotaExceeded("You exceeded your current quota", code="insufficient_quota")
    err, tried, _ = await walk(r, "m", {"local/m": [quota]})
    assert err is quota
    assert tried == ["local/m"]
    assert err.response_headers()["x-should-retry"] == "false"
    assert "Retry-After" not in err.response_headers()


TWO_DEPLOYMENTS = {
    "providers": {"a": {"plugin": "mock", "max_retries": 2}, "b": {"plugin": "mock"}},
    "models": {
        "chat": {
            "deployments": [
                {"provider": "a", "upstream_model": "m"},
                {"provider": "b", "upstream_model": "m"},
            ]
        }
    },
}


async def test_429_fails_over_to_a_deployment_that_can_serve(make_settings) -> None:
    clock = FakeTime()
    r = make_router(make_settings, TWO_DEPLOYMENTS, clock)
    result, tried, _ = await walk(r, "chat", {"a/m": [limited(10)]})
    assert (result, tried) == ("b/m", ["a/m", "b/m"])
    assert clock.slept == []
    # While a is paused, b serves first.
    result, tried, _ = await walk(r, "chat", {})
    assert (result, tried) == ("b/m", ["b/m"])


async def test_upstream_rejection_is_returned_and_counts_as_alive(make_settings) -> None:
    clock = FakeTime()
    r = make_router(make_settings, TWO_DEPLOYMENTS, clock)
    bad = ProviderRejected("bad param", code="invalid_value", param="temperature", status=422)
    err, tried, _ = await walk(r, "chat", {"a/m": [bad]})
    assert err is bad
    assert tried == ["a/m"]
    assert r.resolve("chat").deployments[0].breaker.window() == (1, 0)


async def test_retry_budget_bounds_upstream_requests(make_settings) -> None:
    clock = FakeTime()
    r = make_router(
        make_settings,
        {**SHORTHAND, "routing": {"retry_budget": {"ratio": 0.2, "min_retries": 2}}},
        clock,
    )
    attempts = 0
    for _ in range(100):
        clock.now += 0.01
        _, tried, _ = await walk(r, "m", {"local/m": [ProviderError("500")] * 10})
        attempts += len(tried)
    # Without the budget: 4 attempts per request until the breaker opened; with it, about 1.2×.
    assert attempts <= 100 * 1.2 + 2


async def test_a_plugin_bug_in_a_half_open_probe_does_not_wedge_the_deployment(
    make_settings,
) -> None:
    clock = FakeTime()
    r = make_router(make_settings, {**SHORTHAND, "routing": {"panic": False}}, clock)
    dep = r.model_deployment("m")
    for _ in range(5):
        dep.breaker.record_failure("PROVIDER_ERROR", "boom")
    clock.now += 30  # half-open: one probe
    _, tried, _ = await walk(r, "m", {"local/m": [InternalError("KeyError in plugin")]})
    assert tried == ["local/m"]
    assert dep.breaker.current_state() == "open"  # the bug counted as a failed probe
    clock.now += dep.breaker.cooldown
    result, _, _ = await walk(r, "m", {})  # the plugin recovered
    assert result == "local/m"
    assert dep.breaker.state == "closed"


async def test_a_cancelled_probe_gives_its_permit_back(make_settings) -> None:
    clock = FakeTime()
    r = make_router(make_settings, {**SHORTHAND, "routing": {"panic": False}}, clock)
    dep = r.model_deployment("m")
    for _ in range(5):
        dep.breaker.record_failure("PROVIDER_ERROR", "boom")
    clock.now += 30
    ctx = RequestContext(request_id="t")
    plan = r.plan(r.resolve("m"), "m", ctx, Moves())
    seen_in_flight: list[int] = []

    async def torn_down() -> None:
        async for lease in plan:
            async with lease:
                seen_in_flight.append(dep.in_flight)
                raise RuntimeError("the handler was torn down mid-attempt")

    with pytest.raises(RuntimeError):
        await torn_down()
    assert seen_in_flight == [1]
    assert dep.in_flight == 0
    assert dep.breaker.acquire()  # the probe slot is free again


async def test_a_pause_that_runs_out_mid_round_is_served_not_refused(make_settings) -> None:
    """The round skipped a paused deployment; by the time the round is over the pause has run
    out: the request is sent, never refused with 503 (seen once under a 429 storm)."""
    clock = FakeTime()
    r = make_router(make_settings, SHORTHAND, clock)
    dep = r.model_deployment("m")
    dep.pause(1.0, limited(1.0), 1.0)
    ctx = RequestContext(request_id="t")
    plan = r.plan(r.resolve("m"), "m", ctx, Moves())
    assert plan._select() is None  # skipped: paused
    clock.now += 1.0  # the pause runs out before the round is judged
    assert plan._round_over() == 0.0  # look again at once (no refusal, no wait)
    assert plan.final is None
    plan.queue = deque(plan._candidates())  # what __anext__ does for the next round
    lease = plan._select()
    assert lease is not None
    assert lease.deployment is dep


async def test_a_plan_always_ends_even_when_nothing_it_selects_is_attempted(
    make_settings,
) -> None:
    """Leases handed out but never attempted (the walk skipped them: its provider lacks the
    operation) must not make the plan spin without awaiting: it ends, bounded."""
    clock = FakeTime()
    r = make_router(make_settings, SHORTHAND, clock)
    ctx = RequestContext(request_id="t")
    plan = r.plan(r.resolve("m"), "m", ctx, Moves())
    handed = 0
    async for lease in plan:
        async with lease:
            handed += 1
            assert handed < 50
            plan.exclude(lease)
    assert handed == 1
    assert isinstance(plan.error(), NoDeploymentAvailable)
    # Without exclude() (a walk that just skips): bounded by the retry rounds.
    plan = r.plan(r.resolve("m"), "m", ctx, Moves())
    handed = 0
    async for lease in plan:
        async with lease:
            handed += 1
            assert handed < 50
    assert handed <= 1 + r.resolve("m").max_retries
