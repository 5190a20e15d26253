"""Routing: public model name → an ordered plan of deployments to try.

A :class:`Route` holds deployments (provider + upstream model + defaults + timeouts + breaker) and
a strategy that orders the available ones for each request; fallback routes are appended to the
plan.  Without a model table (the seed's one-provider shorthand) every model name goes to the one
provider through a single implicit route ``*``.  Experiments pick a variant (another public
model name plus parameter overrides) sticky by a hash of a request key.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from inference_server.breaker import CircuitBreaker, Listener
from inference_server.errors import (
    GatewayError,
    InvalidRequest,
    LocalResourceExhausted,
    ModelNotFound,
    NoDeploymentAvailable,
    ProviderRateLimited,
    ProviderRejected,
)
from inference_server.providers.base import OPERATIONS, Provider, ProviderConfig, Timeouts
from inference_server.resilience import RetryBudget, backoff_waits, now
from inference_server.routing_config import DeploymentSpec, ExperimentSpec, RouteSpec, VariantSpec
from inference_server.settings import Settings

if TYPE_CHECKING:
    from inference_server.context import RequestContext

SHORTHAND_ROUTE = "*"
_EWMA_ALPHA = 0.3
#: Error codes (lower-cased) that switch a plan to the route's typed fallbacks.
CONTEXT_CODES = frozenset({"context_length_exceeded"})
CONTENT_POLICY_CODES = frozenset({"content_policy_violation", "content_filter"})
#: The shorthand keeps per-model state (breaker, pause) for at most this many model names.
MAX_TRACKED_MODELS = 1024


class ProviderHealth:
    """A provider's active health-check verdict, shared by every deployment of the provider."""

    __slots__ = ("detail", "healthy", "since")

    def __init__(self) -> None:
        self.healthy = True
        #: Clock time of the last change (how long a failing provider has been ejected).
        self.since = 0.0
        self.detail = ""


class Deployment:
    """Runtime state of one deployment: breaker, 429 pause, in-flight count, latency, health."""

    __slots__ = (
        "_clock",
        "breaker",
        "config",
        "ewma_secs",
        "health",
        "id",
        "in_flight",
        "params",
        "pause_asked",
        "pause_error",
        "paused_until",
        "provider",
        "timeouts",
        "upstream_model",
        "weight",
    )

    def __init__(
        self,
        provider: Provider,
        upstream_model: str | None,
        weight: float,
        params: Mapping[str, Any],
        timeouts: Timeouts,
        breaker: CircuitBreaker,
        *,
        health: ProviderHealth | None = None,
        clock: Callable[[], float] = now,
        id: str | None = None,  # noqa: A002 (the deployment's id)
    ) -> None:
        self.provider = provider
        self.config: ProviderConfig = provider.config
        #: None in the shorthand: the requested model name is sent upstream as is.
        self.upstream_model = upstream_model
        self.id = id or f"{provider.config.name}/{upstream_model or '*'}"
        self.weight = weight
        self.params = params
        self.timeouts = timeouts
        self.breaker = breaker
        self.health = health or ProviderHealth()
        self._clock = clock
        self.in_flight = 0
        self.ewma_secs: float | None = None
        #: Until this clock time the upstream asked us (429) not to send anything.
        self.paused_until = 0.0
        #: The 429 that paused it (what a refusal during the pause reports) and the pause it
        #: asked for (maybe longer than the capped pause taken).
        self.pause_error: ProviderRateLimited | None = None
        self.pause_asked = 0.0

    @property
    def healthy(self) -> bool:
        """False while an active health check of its provider fails."""
        return self.health.healthy

    def selectable(self) -> bool:
        """Usable now: healthy, breaker admitting, not paused by a 429."""
        return self.health.healthy and self.breaker.available() and not self.paused_for()

    def ejected(self) -> bool:
        """Taken out by a fault signal (breaker or health check), as opposed to paused."""
        return not (self.health.healthy and self.breaker.available())

    def ejected_since(self) -> float:
        """Clock time the current ejection began (panic routing picks the oldest)."""
        if not self.breaker.available():
            return self.breaker.opened_at
        return self.health.since

    def paused_for(self) -> float:
        """Seconds left of an upstream 429's pause (0: not paused)."""
        until = self.paused_until
        return 0.0 if not until else max(0.0, until - self._clock())

    def pause(self, secs: float, error: ProviderRateLimited, asked: float) -> None:
        """Backpressure: send nothing here for ``secs`` (never shortens a longer pause)."""
        until = self._clock() + secs
        if until > self.paused_until:
            self.paused_until = until
            self.pause_error = error
            self.pause_asked = asked

    def observe_latency(self, secs: float) -> None:
        prev = self.ewma_secs
        self.ewma_secs = secs if prev is None else prev + _EWMA_ALPHA * (secs - prev)

    def snapshot(self) -> dict[str, Any]:
        ok, failed = self.breaker.window()
        last = self.breaker.last_error
        return {
            "available": self.selectable(),
            "healthy": self.healthy,
            "breaker": self.breaker.current_state(),
            "retry_in_secs": round(self.breaker.retry_in(), 3),
            "paused_secs": round(self.paused_for(), 3),
            "last_error": None if last is None else {"code": last[0], "message": last[1]},
            "window": {"ok": ok, "failed": failed},
            "in_flight": self.in_flight,
            "latency_ewma_ms": None if self.ewma_secs is None else round(self.ewma_secs * 1000, 3),
        }


@dataclass(eq=False)
class Route:
    """A public model name's deployments and how to order them."""

    name: str
    strategy: str
    deployments: list[Deployment]
    fallbacks: tuple[str, ...] = ()
    context_window_fallbacks: tuple[str, ...] = ()
    content_policy_fallbacks: tuple[str, ...] = ()
    #: Operations the configuration declares for this model (None: what providers support).
    capabilities: frozenset[str] | None = None
    _next: int = 0

    @property
    def max_retries(self) -> int:
        return self.deployments[0].config.max_retries

    def ordered(self, rng: random.Random) -> list[Deployment]:
        """This route's deployments: the selectable ones best first per the strategy, then the
        ejected or paused ones (the plan skips those, but panic routing may still need them)."""
        deps: list[Deployment] = []
        out: list[Deployment] = []
        for d in self.deployments:
            (deps if d.selectable() else out).append(d)
        return self._by_strategy(deps, rng) + out if out else self._by_strategy(deps, rng)

    def _by_strategy(self, deps: list[Deployment], rng: random.Random) -> list[Deployment]:
        if len(deps) <= 1:
            return deps
        strategy = self.strategy
        if strategy == "weighted":
            return _weighted_order(deps, rng)
        if strategy == "round_robin":
            start = self._next % len(deps)
            self._next += 1
            return deps[start:] + deps[:start]
        if strategy == "least_busy":
            rng.shuffle(deps)  # ties broken at random, then stable sort by load
            return sorted(deps, key=lambda d: d.in_flight)
        if strategy == "latency":
            # Power of two choices on the EWMA: unmeasured deployments count as fastest, so
            # each gets measured; the rest follow in EWMA order as fallbacks.
            a, b = rng.sample(deps, 2)
            first = a if _latency(a) <= _latency(b) else b
            rest = sorted((d for d in deps if d is not first), key=_latency)
            return [first, *rest]
        return deps  # priority: the configured order

    def available(self) -> bool:
        return any(d.selectable() for d in self.deployments)


def _latency(d: Deployment) -> float:
    return d.ewma_secs if d.ewma_secs is not None else 0.0


def _weighted_order(deps: list[Deployment], rng: random.Random) -> list[Deployment]:
    """Weighted random order without replacement (the first pick follows the weights exactly)."""
    pool = list(deps)
    out: list[Deployment] = []
    while pool:
        total = sum(d.weight for d in pool)
        if total <= 0:
            out.extend(pool)
            break
        point = rng.random() * total
        for i, d in enumerate(pool):
            point -= d.weight
            if point < 0:
                out.append(pool.pop(i))
                break
        else:
            out.append(pool.pop())
    return out


@dataclass(frozen=True, slots=True)
class Candidate:
    """One entry of a request's plan: try ``deployment`` (of ``route``) with this model id."""

    route: Route
    deployment: Deployment
    upstream_model: str


# --- a request's plan ----------------------------------------------------------------------


class Lease:
    """One attempt's hold on a deployment: its in-flight count and, when half-open, the probe
    permit.  ``async with lease:`` releases both on exit, whatever happened inside; an attempt
    that ended without a verdict (the client left, a cancellation) frees the permit unjudged.
    """

    __slots__ = ("candidate", "deployment", "panic", "probe", "settled")

    def __init__(self, candidate: Candidate, *, panic: bool) -> None:
        self.candidate = candidate
        self.deployment = candidate.deployment
        #: Sent although every deployment was ejected (panic routing): no breaker permit held.
        self.panic = panic
        self.probe = not panic
        self.settled = False

    async def __aenter__(self) -> Lease:
        self.deployment.in_flight += 1
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        dep = self.deployment
        dep.in_flight -= 1
        if not self.settled:
            self.settled = True
            dep.breaker.release(probe=self.probe)

    def broke(self, code: str, message: str) -> None:
        """The stream this deployment had started broke: a fault after the verdict."""
        self.deployment.breaker.record_failure(code, message, probe=False)


class MoveListener(Protocol):
    """What a plan reports as it moves between candidates (the metrics implement it)."""

    def retry(self, deployment: str) -> None: ...

    def fallback(self, from_route: str, to_route: str) -> None: ...


class Plan:
    """The attempts of one request: which deployment next, when to wait, when to stop.

    The pipeline walks it (``async for lease in plan``) and reports each outcome back
    (:meth:`failed`, :meth:`succeeded`); the plan owns every rule in between:

    - **order**: a round is the route's deployments in strategy order, then its fallbacks'; a
      typed failure (context length, content policy) switches to the typed fallbacks' routes;
    - **skips**: ejected deployments (breaker open, health check failing) and paused ones (an
      upstream 429's Retry-After) are passed over;
    - **rounds**: after a round failed retryably, wait (backoff with full jitter; or the
      soonest pause's end when every usable deployment is paused) and start another, up to the
      route's ``max_retries`` rounds, within ``routing.max_attempts`` and ``max_time_secs``;
    - **budget**: an attempt on a deployment this request already tried is a retry and is
      spent from the process's retry budget;
    - **panic**: when nothing at all is selectable at the start, one attempt goes to the
      deployment ejected longest ago (``routing.panic``), so the client sees the real error
      and a recovered upstream is used at once; otherwise the refusal names the cause.

    When iteration ends, :meth:`error` is what the client gets, with ``x-should-retry``
    decided: true only where a client retry can get past what stopped the gateway (no gateway
    retries configured, a Retry-After longer than the gateway waits, nothing sent yet).
    """

    def __init__(
        self,
        router: Router,
        route: Route,
        model: str,
        ctx: RequestContext,
        moves: MoveListener,
    ) -> None:
        self.router = router
        self.route = route
        self.model = model
        self.ctx = ctx
        self.moves = moves
        settings = router.settings
        self.limits = settings.routing
        self.retry_after_cap = settings.retry.retry_after_max_secs
        clock = router.clock
        self.clock = clock
        elapsed = time.perf_counter() - ctx.started
        self.deadline = clock() + self.limits.max_time_secs - elapsed
        self.max_rounds = 1 + route.max_retries
        self.round = 0
        self.round_leases = 0
        self._routes: list[Route] = router.plan_routes(route)
        self.tried: list[Deployment] = []
        self.previous: Candidate | None = None
        self.last: GatewayError | None = None
        self.final: GatewayError | None = None
        self.panicked = False
        #: Set where the plan stops for a reason a client retry can get past (no gateway
        #: retries configured, a pause longer than the gateway waits): x-should-retry true.
        self.client_may_retry = False
        self._waits: Iterator[float] | None = None
        self._panic: Candidate | None = None
        self._rescanned = False
        #: Deployments that cannot serve this request at all (the operation is not theirs).
        self.excluded: set[int] = set()
        self.queue: deque[Candidate] = deque(self._candidates())  # the first round
        router.retry_budget.request()

    # --- walking ---------------------------------------------------------------------------

    def __aiter__(self) -> Plan:
        return self

    async def __anext__(self) -> Lease:
        while self.final is None:
            if self.ctx.attempts and not self._limits_allow():
                self._end(self.last)
                break
            lease = self._select()
            if lease is not None:
                return lease
            wait = self._round_over()
            panic = self._panic
            if panic is not None:
                self._panic = None
                return self._lease(panic, panic=True)
            if self.final is None:
                if wait > 0:
                    await self.router.sleep(wait)
                self.round += 1
                self.round_leases = 0
                self.queue = deque(self._candidates())
        raise StopAsyncIteration

    def _limits_allow(self) -> bool:
        return self.ctx.attempts < self.limits.max_attempts and self.clock() < self.deadline

    def _candidates(self) -> list[Candidate]:
        out: list[Candidate] = []
        for route in self._routes:
            self.router.extend(out, route, self.model)
        if self.excluded:
            out = [c for c in out if id(c.deployment) not in self.excluded]
        return out

    def _select(self) -> Lease | None:
        """The next candidate of this round that may be tried now, its permit taken."""
        queue = self.queue
        while queue:
            cand = queue.popleft()
            dep = cand.deployment
            if dep.ejected() or dep.paused_for():
                continue
            retry = dep in self.tried
            if retry and not self.router.retry_budget.try_spend():
                continue
            if not dep.breaker.acquire():  # a half-open breaker's probes are all out
                continue
            return self._lease(cand, panic=False)
        return None

    def _lease(self, cand: Candidate, *, panic: bool) -> Lease:
        dep = cand.deployment
        before = self.previous
        if before is not None:
            if before.deployment is dep:
                self.ctx.retries += 1
                self.moves.retry(dep.id)
            else:
                self.ctx.fallbacks += 1
                self.moves.fallback(before.route.name, cand.route.name)
                self.ctx.log.info("falling back from {} to {}", before.deployment.id, dep.id)
        self.previous = cand
        if dep not in self.tried:
            self.tried.append(dep)
        self.round_leases += 1
        return Lease(cand, panic=panic)

    def _round_over(self) -> float:
        """The round has no candidate left: how long to wait before the next, or end."""
        upcoming = self._candidates()
        if not self.tried:
            return self._nothing_selectable(upcoming)
        if self.round + 1 >= self.max_rounds or not self.round_leases:
            # No retries configured: the client is the retrying layer (one attempt made).
            self.client_may_retry = self.max_rounds == 1 and self.ctx.attempts == 1
            self._end(self.last)
            return 0.0
        usable = [c.deployment for c in upcoming if not c.deployment.ejected()]
        if not usable:
            # Everything this request could use is ejected now: the last error is the cause.
            self._end(self.last)
            return 0.0
        if all(d.paused_for() for d in usable):
            pause = self._waitable_pause(usable)
            if pause is None:
                # The upstream asked for longer than the gateway waits: the client may.
                self.client_may_retry = self.ctx.attempts == 1
                self._end(self.last)
                return 0.0
            wait = pause
        else:
            if self._waits is None:
                self._waits = backoff_waits(self.router.settings.retry)
            wait = next(self._waits)
        if self.clock() + wait >= self.deadline:
            self._end(self.last)
            return 0.0
        return wait

    def _nothing_selectable(self, upcoming: list[Candidate]) -> float:
        """Nothing was tried yet and nothing is selectable: panic, wait out a pause, or refuse."""
        deps = [c.deployment for c in upcoming]
        if not self._rescanned and any(d.selectable() for d in deps):
            # A pause ran out since the round began: one more look takes it (once, so a
            # deployment _select keeps refusing can never spin this loop without awaiting).
            self._rescanned = True
            return 0.0
        ejected = [c for c in upcoming if c.deployment.ejected()]
        if ejected and self.limits.panic and not self.panicked:
            self.panicked = True
            cand = min(ejected, key=lambda c: c.deployment.ejected_since())
            self.ctx.log.warning(
                "every deployment of {} is ejected: panic-routing to {}",
                self.model,
                cand.deployment.id,
            )
            self._panic = cand
            return 0.0
        paused = [d for d in deps if not d.ejected() and d.paused_for()]
        if paused:
            wait = self._waitable_pause(paused)
            if (
                wait is not None
                and self.round + 1 < self.max_rounds
                and self.clock() + wait < self.deadline
            ):
                return wait
            dep = min(paused, key=Deployment.paused_for)
            self.client_may_retry = True  # nothing was sent: after Retry-After it may go
            self._end(_paused_error(dep, dep.paused_for()))
            return 0.0
        self._end(self._refusal(deps))
        return 0.0

    def _waitable_pause(self, paused: list[Deployment]) -> float | None:
        """The shortest pause worth waiting out inside the request: one whose upstream asked
        for no more than ``retry_after_max_secs`` (a longer ask goes back to the client)."""
        cap = self.retry_after_cap
        waits = [d.paused_for() for d in paused if d.pause_asked <= cap]
        return min(waits) if waits else None

    def _refusal(self, deps: list[Deployment]) -> GatewayError:
        """503 naming why nothing is available and when the next probe is due."""
        if not deps:
            return NoDeploymentAvailable(f"No deployment serves model '{self.model}'")
        first = min(deps, key=lambda d: d.breaker.retry_in())
        causes = []
        for d in deps:
            last = d.breaker.last_error
            if last is not None:
                causes.append(f"{d.id}: {last[0]}: {last[1]}")
            elif not d.healthy:
                causes.append(f"{d.id}: health check failing: {d.health.detail}")
        detail = "; ".join(causes) if causes else "circuit breakers open"
        return NoDeploymentAvailable(
            f"No deployment of model '{self.model}' is available now ({detail})",
            retry_after=max(1.0, first.breaker.retry_in()),
        )

    def _end(self, err: GatewayError | None) -> None:
        self.final = err or self._refusal([])

    # --- outcomes --------------------------------------------------------------------------

    def exclude(self, lease: Lease) -> None:
        """This deployment cannot serve the request (e.g. its provider lacks the operation):
        freed without a verdict, skipped for the rest of the plan, not counted as tried."""
        dep = lease.deployment
        self.excluded.add(id(dep))
        if dep in self.tried:
            self.tried.remove(dep)
        self.queue = deque(c for c in self.queue if c.deployment is not dep)

    def succeeded(self, lease: Lease) -> None:
        lease.settled = True
        lease.deployment.breaker.record_success(probe=lease.probe)

    def failed(self, lease: Lease, exc: GatewayError) -> None:
        """Account the failure (breaker, pause) and decide whether the plan goes on."""
        lease.settled = True
        dep = lease.deployment
        self.last = exc
        breaker = dep.breaker
        if isinstance(exc, ProviderRateLimited) and exc.retryable:
            # Backpressure, not a fault: pause exactly as long as the upstream asked.
            asked = exc.retry_after if exc.retry_after is not None else 1.0
            dep.pause(min(asked, self.retry_after_cap), exc, asked)
            breaker.release(probe=lease.probe)
        elif isinstance(exc, ProviderRejected | InvalidRequest):
            breaker.record_success(probe=lease.probe)  # it answered: alive
        elif isinstance(exc, LocalResourceExhausted):
            breaker.release(probe=lease.probe)  # our own shortage, not the upstream's fault
        else:
            breaker.record_failure(exc.code, exc.message, probe=lease.probe)
        if lease.panic:
            self._end(exc)
            return
        if exc.retryable:
            return
        typed = self.router.typed_routes(lease.candidate.route, exc.code)
        if typed:
            self.ctx.log.info("{} on {}: typed fallback", exc.code, dep.id)
            self._routes = typed
            self.queue = deque(self._candidates())
            self.round_leases = 0
            return
        self._end(exc)

    def error(self) -> GatewayError:
        """What the client gets once the plan is exhausted."""
        err = self.final or self.last or self._refusal([])
        if isinstance(err, ProviderRateLimited) and err.retryable:
            # The client's Retry-After is what is left of the pause it ran into.
            pauses = [d.paused_for() for d in self.tried if d.paused_for()]
            if pauses:
                err.retry_after = min(pauses)
        if err.client_retry is None:
            # One retrying layer: where the gateway retried, failed over, routed in panic, ran
            # out of budget or found the deployment ejected, a client retry only multiplies
            # the load (the openai SDK would send it twice more).
            err.client_retry = err.retryable and self.client_may_retry
        return err


def _paused_error(dep: Deployment, remaining: float) -> GatewayError:
    """The 429 for a request that found its deployments paused: the upstream's own error, with
    the time left of the pause as its Retry-After (a fresh object: the stored one is shared)."""
    src = dep.pause_error
    if src is None:
        return ProviderRateLimited(
            f"Deployment {dep.id} is paused by its upstream's rate limit",
            retry_after=remaining,
        )
    return ProviderRateLimited(
        src.message,
        code=src.wire_code,
        param=src.param,
        error_type=src.error_type,
        retry_after=max(remaining, 0.001),
    )


# --- experiments ---------------------------------------------------------------------------


@dataclass(slots=True)
class VariantStats:
    """Per-variant (or shadow) counters, readable at /admin/experiments."""

    requests: int = 0
    errors: int = 0
    latency_sum: float = 0.0
    latency_max: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    recent: list[float] = field(default_factory=list)

    def record(self, secs: float, error: bool, usage: Mapping[str, Any] | None) -> None:
        self.requests += 1
        self.errors += int(error)
        self.latency_sum += secs
        self.latency_max = max(self.latency_max, secs)
        if usage:
            self.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.completion_tokens += int(usage.get("completion_tokens") or 0)
        recent = self.recent
        recent.append(secs)
        if len(recent) > 1024:  # a bounded window for percentiles
            del recent[:512]

    def as_dict(self) -> dict[str, Any]:
        ordered = sorted(self.recent)

        def pct(p: float) -> float | None:
            return (
                round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 3)
                if (ordered)
                else None
            )

        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.errors / self.requests, 4) if self.requests else 0.0,
            "latency_ms": {
                "mean": round(self.latency_sum / self.requests * 1000, 3)
                if self.requests
                else None,
                "p50": pct(0.5),
                "p95": pct(0.95),
                "max": round(self.latency_max * 1000, 3),
            },
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
        }


class Experiment:
    """Sticky weighted assignment of requests to variants, plus per-variant counters."""

    def __init__(self, spec: ExperimentSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.total = sum(v.weight for v in spec.variants)
        self.by_name = {v.name: v for v in spec.variants}
        self.stats = {v.name: VariantStats() for v in spec.variants}
        self.shadow_stats = VariantStats()

    def key_value(self, request: web.Request, body: Mapping[str, Any]) -> str | None:
        key = self.spec.key
        if key == "user":
            user = body.get("user")
            return user if isinstance(user, str) and user else None
        if key == "api_key":
            auth = request.headers.get("Authorization", "")
            return auth[7:] if auth[:7].lower() == "bearer " and len(auth) > 7 else None
        return request.headers.get(key[len("header:") :]) or None

    def assign(
        self, request: web.Request, body: Mapping[str, Any], rng: random.Random
    ) -> tuple[VariantSpec, str]:
        """(variant, how): forced by header when allowed, else by hash of the key, else random."""
        if self.spec.allow_override:
            forced = request.headers.get("x-inference-variant")
            if forced:
                name = forced.split("/", 1)[1] if forced.startswith(f"{self.name}/") else forced
                variant = self.by_name.get(name)
                if variant is None:
                    raise InvalidRequest(
                        f"Unknown variant '{forced}' for experiment '{self.name}' "
                        f"(variants: {', '.join(self.by_name)})",
                        code="UNKNOWN_VARIANT",
                    )
                return variant, "forced"
        value = self.key_value(request, body)
        if value is None:
            return self.pick(rng.random()), "random"
        return self.pick(bucket(self.name, value)), "sticky"

    def pick(self, point: float) -> VariantSpec:
        """The variant at ``point`` in [0, 1) of the cumulative weights."""
        target = point * self.total
        for variant in self.spec.variants:
            target -= variant.weight
            if target < 0:
                return variant
        return self.spec.variants[-1]

    def snapshot(self) -> dict[str, Any]:
        return {
            "model": self.spec.model,
            "key": self.spec.key,
            "variants": {
                v.name: {"model": v.model, "weight": v.weight, **self.stats[v.name].as_dict()}
                for v in self.spec.variants
            },
            "shadow": None
            if self.spec.shadow is None
            else {
                "model": self.spec.shadow.model,
                "fraction": self.spec.shadow.fraction,
                **self.shadow_stats.as_dict(),
            },
        }


def bucket(experiment: str, key: str) -> float:
    """A stable point in [0, 1) for (experiment, key): same in every process and release."""
    # surrogateescape: a header's undecodable bytes still hash (to the same point every time).
    raw = f"{experiment}\x00{key}".encode("utf-8", "surrogateescape")
    digest = hashlib.blake2b(raw, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# --- the router ----------------------------------------------------------------------------


class Router:
    """Routes, aliases, experiments and the deployments behind them."""

    def __init__(
        self,
        settings: Settings,
        providers: Mapping[str, Provider],
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = now,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_breaker: Listener | None = None,
    ) -> None:
        self.settings = settings
        self.providers = providers
        self.rng = rng or random.Random()  # noqa: S311 (load balancing, not crypto)
        #: The one clock of breakers, pauses, budgets and plans (tests pass a fake one).
        self.clock = clock
        self.sleep = sleep
        self.retry_budget = RetryBudget(settings.routing.retry_budget, clock)
        self._allowed = frozenset(settings.allowed_models)
        self.aliases = dict(settings.aliases)
        self.deployments: list[Deployment] = []
        self._breakers: dict[str, CircuitBreaker] = {}
        self._on_breaker = on_breaker
        #: One health flag per provider: an active check speaks for all its deployments.
        self.provider_health = {name: ProviderHealth() for name in providers}
        #: The shorthand's per-model deployments (one breaker per requested model), bounded.
        self._model_deployments: OrderedDict[str, Deployment] = OrderedDict()

        def deployment(spec: DeploymentSpec | None, provider: Provider) -> Deployment:
            upstream = spec.upstream_model if spec else None
            dep = Deployment(
                provider,
                upstream,
                spec.weight if spec else 1.0,
                spec.params if spec else {},
                spec.timeouts if spec else provider.config.timeouts,
                self._breaker(f"{provider.config.name}/{upstream or '*'}"),
                health=self.provider_health[provider.config.name],
                clock=clock,
            )
            self.deployments.append(dep)
            return dep

        self.routes: dict[str, Route] = {}
        if settings.routes:
            for spec in settings.routes.values():
                self.routes[spec.name] = self._route(spec, deployment)
            self.shorthand: Route | None = None
        else:
            first = next(iter(providers.values()))
            self.shorthand = Route(SHORTHAND_ROUTE, "priority", [deployment(None, first)])
        self.experiments = {m: Experiment(e) for m, e in settings.experiments.items()}
        self._created = int(time.time())
        self._models_cache: tuple[float, list[dict[str, Any]]] | None = None

    def _breaker(self, name: str) -> CircuitBreaker:
        b = self._breakers.get(name)
        if b is None:
            b = CircuitBreaker(
                name, self.settings.routing.breaker, clock=self.clock, listener=self._on_breaker
            )
            self._breakers[name] = b
        return b

    def model_deployment(self, model: str) -> Deployment:
        """The shorthand's deployment for one requested model: its own breaker and pause, so
        one model's failures never block another.  At most MAX_TRACKED_MODELS are kept; the
        least recently used idle one with a closed breaker goes first."""
        table = self._model_deployments
        dep = table.get(model)
        if dep is not None:
            table.move_to_end(model)
            return dep
        if len(table) >= MAX_TRACKED_MODELS:
            victim = next(
                (
                    k
                    for k, d in table.items()
                    if not d.in_flight and d.breaker.state == "closed" and not d.paused_for()
                ),
                next(iter(table)),
            )
            del table[victim]
        shorthand = self.shorthand
        if shorthand is None:
            raise RuntimeError("model_deployment() is for the one-provider shorthand only")
        template = shorthand.deployments[0]
        name = f"{template.config.name}/{model}"
        dep = Deployment(
            template.provider,
            None,
            1.0,
            template.params,
            template.timeouts,
            CircuitBreaker(
                name, self.settings.routing.breaker, clock=self.clock, listener=self._on_breaker
            ),
            health=template.health,
            clock=self.clock,
            id=name,
        )
        table[model] = dep
        return dep

    def _route(
        self, spec: RouteSpec, make: Callable[[DeploymentSpec | None, Provider], Deployment]
    ) -> Route:
        return Route(
            name=spec.name,
            strategy=spec.strategy,
            deployments=[make(d, self.providers[d.provider]) for d in spec.deployments],
            fallbacks=spec.fallbacks,
            context_window_fallbacks=spec.context_window_fallbacks,
            content_policy_fallbacks=spec.content_policy_fallbacks,
            capabilities=frozenset(spec.capabilities) if spec.capabilities else None,
        )

    # --- resolution ------------------------------------------------------------------------

    def check_allowed(self, model: str) -> None:
        if self._allowed and model not in self._allowed:
            raise InvalidRequest(
                f"Model '{model}' is not in the allowed list. "
                f"Available models: {', '.join(self.settings.allowed_models)}",
                code="MODEL_NOT_ALLOWED",
                param="model",
            )

    def resolve(self, model: str) -> Route:
        """The route serving public model name ``model`` (aliases followed)."""
        if self.shorthand is not None:
            return self.shorthand
        route = self.named(model)
        if route is None:
            raise ModelNotFound(
                f"The model '{model}' does not exist. Available models: "
                + ", ".join(self.public_names()),
                param="model",
            )
        return route

    def named(self, name: str) -> Route | None:
        """The route a public name or alias stands for, if any."""
        return self.routes.get(self.aliases.get(name, name))

    def _known(self, name: str) -> Route:
        """The route of a name settings validation already checked (fallbacks)."""
        return self.routes[self.aliases.get(name, name)]

    def public_names(self) -> list[str]:
        names = [*self.routes, *self.aliases]
        names.extend(m for m in self.experiments if m not in names)
        return names

    def plan(self, route: Route, model: str, ctx: RequestContext, moves: MoveListener) -> Plan:
        """The attempts of one request for ``model`` on ``route`` (see :class:`Plan`)."""
        return Plan(self, route, model, ctx, moves)

    def candidates(self, route: Route, model: str) -> list[Candidate]:
        """Deployments in order: the route's (per strategy), then its fallbacks', each once;
        selectable ones first within each route."""
        out: list[Candidate] = []
        self.extend(out, route, model)
        for name in route.fallbacks:
            self.extend(out, self._known(name), model)
        return out

    def typed_routes(self, route: Route, code: str) -> list[Route]:
        """The typed fallback routes for an error code (context window, content policy)."""
        lowered = code.lower()
        if lowered in CONTEXT_CODES:
            names = route.context_window_fallbacks
        elif lowered in CONTENT_POLICY_CODES:
            names = route.content_policy_fallbacks
        else:
            return []
        return [self._known(name) for name in names]

    def extend(self, out: list[Candidate], route: Route, model: str) -> None:
        """Append ``route``'s deployments for ``model`` to ``out`` (skipping ones already in)."""
        if route is self.shorthand:
            dep = self.model_deployment(model)
            if not any(c.deployment is dep for c in out):
                out.append(Candidate(route, dep, model))
            return
        for dep in route.ordered(self.rng):
            if not any(c.deployment is dep for c in out):
                out.append(Candidate(route, dep, dep.upstream_model or model))

    def plan_routes(self, route: Route) -> list[Route]:
        """The route and its fallback routes."""
        return [route, *(self._known(n) for n in route.fallbacks)]

    def route_deployments(self, route: Route) -> list[Deployment]:
        """What /health reports for a route: the shorthand's per-model deployments once any
        model was requested, else the route's own."""
        if route is self.shorthand and self._model_deployments:
            return list(self._model_deployments.values())
        return route.deployments

    def set_provider_health(self, name: str, healthy: bool, detail: str) -> None:
        """An active health check's verdict for every deployment of provider ``name`` (the
        health monitor logs the change)."""
        flag = self.provider_health.get(name)
        if flag is None:
            return
        if flag.healthy != healthy:
            flag.since = self.clock()
        flag.healthy, flag.detail = healthy, detail

    def routes_status(self) -> dict[str, Route]:
        if self.shorthand is not None:
            return {SHORTHAND_ROUTE: self.shorthand}
        return self.routes

    # --- /v1/models ------------------------------------------------------------------------

    def _entry(self, model_id: str, owned_by: str, created: int | None = None) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": created if created is not None else self._created,
            "owned_by": owned_by,
            "capabilities": self.capabilities(model_id),
        }

    def capabilities(self, name: str) -> list[str]:
        """What a public model serves (chat, completions, embeddings, responses): its declared
        ``capabilities``, else what any provider of its routes (fallbacks too) supports."""
        if self.shorthand is not None:
            routes = [self.shorthand]
        else:
            experiment = self.experiments.get(name)
            names = [v.model for v in experiment.spec.variants] if experiment else [name]
            routes = [r for r in (self.named(n) for n in names) if r is not None]
            if len(routes) == 1 and routes[0].capabilities is not None:
                return [op for op in OPERATIONS if op in routes[0].capabilities]
            routes = [p for r in routes for p in self.plan_routes(r)]
        providers = {id(d.provider): d.provider for r in routes for d in r.deployments}
        return [op for op in OPERATIONS if any(p.supports(op) for p in providers.values())]

    def _owner(self, name: str) -> str:
        if name in self.experiments:
            return "experiment"
        route = self.named(name)
        return route.deployments[0].config.name if route else "local"

    async def list_models(self) -> list[dict[str, Any]]:
        """The allowed list, else the model table, else the provider's own list (cached)."""
        if self.settings.allowed_models:
            if self.shorthand is None:
                names = [m for m in self.settings.allowed_models if m in self.public_names()]
            else:
                names = list(self.settings.allowed_models)
            owner = self.shorthand.deployments[0].config.name if self.shorthand else None
            return [self._entry(m, owner or self._owner(m)) for m in names]
        if self.shorthand is None:
            return [self._entry(name, self._owner(name)) for name in self.public_names()]
        now = time.monotonic()
        cached = self._models_cache
        if cached is not None and now - cached[0] < self.settings.models_cache_secs:
            return cached[1]
        provider = self.shorthand.deployments[0].provider
        infos = await provider.list_models()
        models = [self._entry(i.id, provider.config.name, i.created) for i in infos]
        self._models_cache = (time.monotonic(), models)
        return models

    async def get_model(self, model_id: str) -> dict[str, Any]:
        for entry in await self.list_models():
            if entry["id"] == model_id:
                return entry
        raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()

    # --- hot reload (issue 16) -------------------------------------------------------------

    def adopt(self, old: Router) -> list[str]:
        """Carry the runtime state of ``old`` (the router a reload replaces) into this one, for
        what did not change; the ids of the deployments whose state was carried.

        A deployment keeps its breaker, 429 pause and latency average when it has the same id,
        the *same provider object* (a reload reuses a provider only when its settings are
        equal) and the same upstream model, weight, parameters and timeouts, and the breaker
        settings are unchanged; a breaker shared by several deployments is carried only when
        all of them are unchanged.  A reused provider keeps its active-check verdict, the
        shorthand keeps its per-model deployments, an unchanged experiment its counters, and
        unchanged retry-budget settings the budget's window.  Anything else starts fresh: its
        configuration changed, so what was learned about it may not hold.
        """
        for name, provider in self.providers.items():
            flag = old.provider_health.get(name)
            if flag is not None and old.providers.get(name) is provider:
                self.provider_health[name] = flag
        previous = {dep.id: dep for dep in old.deployments}
        same_breakers = old.settings.routing.breaker == self.settings.routing.breaker
        unchanged: dict[str, bool] = {}
        for dep in self.deployments:
            prev = previous.get(dep.id)
            unchanged[dep.id] = unchanged.get(dep.id, True) and (
                prev is not None
                and prev.provider is dep.provider
                and prev.upstream_model == dep.upstream_model
                and prev.weight == dep.weight
                and dict(prev.params) == dict(dep.params)
                and prev.timeouts == dep.timeouts
            )
        carried: list[str] = []
        for dep in self.deployments:
            dep.health = self.provider_health.get(dep.config.name, dep.health)
            if not unchanged[dep.id]:
                continue
            prev = previous[dep.id]
            if same_breakers:
                dep.breaker = self._breakers[dep.id] = prev.breaker
            dep.paused_until, dep.pause_error = prev.paused_until, prev.pause_error
            dep.pause_asked, dep.ewma_secs = prev.pause_asked, prev.ewma_secs
            if dep.id not in carried:
                carried.append(dep.id)
        shorthand, old_shorthand = self.shorthand, old.shorthand
        if (
            shorthand is not None
            and old_shorthand is not None
            and same_breakers
            and unchanged.get(shorthand.deployments[0].id, False)
        ):
            self._model_deployments = OrderedDict(old._model_deployments)
        for model, experiment in self.experiments.items():
            was = old.experiments.get(model)
            if was is not None and was.spec == experiment.spec:
                self.experiments[model] = was
        if old.settings.routing.retry_budget == self.settings.routing.retry_budget:
            self.retry_budget = old.retry_budget
        return carried
