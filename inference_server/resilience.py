"""Retries with ``backoff``: exponential with full jitter, Retry-After honoured up to a cap.

Only errors whose class says ``retryable`` are retried, and only before anything was sent to the
client (the pipeline calls this around a non-streaming call, or around opening a stream and
reading its first chunk; never around the rest of a stream).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

import backoff
from loguru import logger

from inference_server.errors import GatewayError
from inference_server.settings import RetrySettings

T = TypeVar("T")


class _BudgetSpent(Exception):
    """The request's budget ran out between retry rounds."""


def wait_times(
    base: float, cap: float, retry_after_cap: float
) -> Generator[float, BaseException | None, None]:
    """backoff wait generator; backoff sends it each failure, so it can read Retry-After."""
    attempt = 0
    exc = yield 0.0  # backoff primes the generator with send(None)
    while True:
        retry_after = getattr(exc, "retry_after", None)
        if isinstance(retry_after, (int, float)):
            # A hair past the upstream's delay, so its breaker pause is surely over.
            value = min(float(retry_after), retry_after_cap) + 0.05
        else:
            value = random.uniform(0, min(cap, base * 2**attempt))  # noqa: S311 (jitter, not crypto)
        attempt += 1
        exc = yield value


async def _run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return await fn()


class Retrier:
    """Runs an upstream attempt with up to ``max_retries`` retries, per the settings."""

    def __init__(self, settings: RetrySettings) -> None:
        self.settings = settings
        self._runners: dict[
            tuple[int, int], Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]
        ] = {}

    def _giveup(self, exc: Exception) -> bool:
        if not isinstance(exc, GatewayError) or not exc.retryable:
            return True
        # A Retry-After beyond our cap: waiting that long inside a request helps nobody;
        # the client gets the 429 with the header and decides.
        return exc.retry_after is not None and exc.retry_after > self.settings.retry_after_max_secs

    @staticmethod
    def _log_backoff(details: Any) -> None:
        exc = details.get("exception")
        logger.warning(
            "upstream attempt {} failed ({}); retrying in {:.3f}s",
            details["tries"],
            getattr(exc, "code", type(exc).__name__),
            details["wait"],
        )

    def _runner(
        self, max_tries: int, first_retry: int
    ) -> Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]:
        """A backoff-wrapped runner for ``max_tries`` calls whose waits continue the schedule
        from retry number ``first_retry`` (the fast path has already waited for the first)."""
        key = (max_tries, first_retry)
        runner = self._runners.get(key)
        if runner is None:
            s = self.settings
            runner = backoff.on_exception(
                wait_times,
                GatewayError,
                max_tries=max_tries,
                giveup=self._giveup,
                jitter=None,
                on_backoff=self._log_backoff,
                logger=None,
                base=s.backoff_base_secs * 2**first_retry,
                cap=s.backoff_max_secs,
                retry_after_cap=s.retry_after_max_secs,
            )(_run)
            self._runners[key] = runner
        return runner

    def first_wait(self, exc: GatewayError) -> float:
        """The wait before the first retry (the same schedule backoff continues)."""
        s = self.settings
        gen = wait_times(s.backoff_base_secs, s.backoff_max_secs, s.retry_after_max_secs)
        next(gen)
        return gen.send(exc)

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        max_retries: int,
        budget_left: Callable[[], bool] | None = None,
    ) -> T:
        """Await ``fn()``; on a retryable ``GatewayError`` wait and call it again.

        The first attempt runs bare (the common case costs nothing extra); backoff takes over
        only once an attempt has failed retryably.  ``budget_left`` (the request's attempt and
        time budget) is asked before each retry; when it says no, the last error is raised.
        """
        try:
            return await fn()
        except GatewayError as exc:
            if max_retries <= 0 or self._giveup(exc) or (budget_left and not budget_left()):
                raise
            first = exc
        wait = self.first_wait(first)
        self._log_backoff({"tries": 1, "exception": first, "wait": wait})
        await asyncio.sleep(wait)
        last: list[GatewayError] = [first]

        async def guarded() -> T:
            if budget_left is not None and not budget_left():
                raise _BudgetSpent
            try:
                return await fn()
            except GatewayError as exc:
                last[:] = [exc]
                raise

        try:
            result: T = await self._runner(max_retries, first_retry=1)(guarded)
        except _BudgetSpent:
            raise last[0] from None
        return result
