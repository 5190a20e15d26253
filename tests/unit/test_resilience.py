"""Retries: only retryable errors, at most max_retries, Retry-After honoured up to its cap."""

from __future__ import annotations

import time

import pytest

from inference_server.errors import InvalidRequest, ProviderError, ProviderRateLimited
from inference_server.resilience import Retrier, wait_times
from inference_server.settings import RetrySettings

FAST = RetrySettings(
    max_retries=3, backoff_base_secs=0.001, backoff_max_secs=0.002, retry_after_max_secs=0.3
)


async def test_retries_retryable_errors_then_succeeds() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ProviderError("boom")
        return "ok"

    assert await Retrier(FAST).call(flaky, max_retries=3) == "ok"
    assert calls == 3


async def test_gives_up_after_max_retries() -> None:
    calls = 0

    async def broken() -> str:
        nonlocal calls
        calls += 1
        raise ProviderError("boom")

    with pytest.raises(ProviderError):
        await Retrier(FAST).call(broken, max_retries=2)
    assert calls == 3


async def test_never_retries_client_errors() -> None:
    calls = 0

    async def bad() -> str:
        nonlocal calls
        calls += 1
        raise InvalidRequest("no")

    with pytest.raises(InvalidRequest):
        await Retrier(FAST).call(bad, max_retries=3)
    assert calls == 1


async def test_retry_after_is_waited_and_too_long_gives_up() -> None:
    calls = 0

    async def limited() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ProviderRateLimited("slow down", retry_after=0.2)
        return "ok"

    started = time.monotonic()
    assert await Retrier(FAST).call(limited, max_retries=1) == "ok"
    assert time.monotonic() - started >= 0.19

    async def very_limited() -> str:
        raise ProviderRateLimited("later", retry_after=100)

    with pytest.raises(ProviderRateLimited):
        await Retrier(FAST).call(very_limited, max_retries=3)


def test_wait_times_grow_exponentially_within_the_cap() -> None:
    gen = wait_times(base=1, cap=4, retry_after_cap=10)
    next(gen)
    waits = [gen.send(ProviderError("x")) for _ in range(6)]
    assert all(0 <= w <= 4 for w in waits)
    assert gen.send(ProviderRateLimited("x", retry_after=30)) == 10.05
