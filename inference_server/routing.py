"""Routing: public model name → an ordered plan of deployments to try.

A :class:`Route` holds deployments (provider + upstream model + defaults + timeouts + breaker) and
a strategy that orders the available ones for each request; fallback routes are appended to the
plan.  Without a model table (the seed's one-provider shorthand) every model name goes to the one
provider through a single implicit route ``*``.  Experiments pick a variant (another public
model name plus parameter overrides) sticky by a hash of a request key.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from inference_server.breaker import CircuitBreaker, Listener
from inference_server.errors import InvalidRequest, ModelNotFound
from inference_server.providers.base import Provider, ProviderConfig, Timeouts
from inference_server.routing_config import DeploymentSpec, ExperimentSpec, RouteSpec, VariantSpec
from inference_server.settings import Settings

SHORTHAND_ROUTE = "*"
_EWMA_ALPHA = 0.3
CONTEXT_CODES = frozenset({"CONTEXT_LENGTH_EXCEEDED"})
CONTENT_POLICY_CODES = frozenset({"CONTENT_POLICY_VIOLATION", "CONTENT_FILTER"})


class Deployment:
    """Runtime state of one deployment: breaker, in-flight count, latency EWMA, health."""

    __slots__ = (
        "breaker",
        "config",
        "ewma_secs",
        "healthy",
        "id",
        "in_flight",
        "params",
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
    ) -> None:
        self.provider = provider
        self.config: ProviderConfig = provider.config
        #: None in the shorthand: the requested model name is sent upstream as is.
        self.upstream_model = upstream_model
        self.id = f"{provider.config.name}/{upstream_model or '*'}"
        self.weight = weight
        self.params = params
        self.timeouts = timeouts
        self.breaker = breaker
        self.in_flight = 0
        self.ewma_secs: float | None = None
        #: False while an active health check of its provider fails.
        self.healthy = True

    def selectable(self) -> bool:
        return self.healthy and self.breaker.available()

    def observe_latency(self, secs: float) -> None:
        prev = self.ewma_secs
        self.ewma_secs = secs if prev is None else prev + _EWMA_ALPHA * (secs - prev)

    def snapshot(self) -> dict[str, Any]:
        ok, failed = self.breaker.window()
        return {
            "available": self.selectable(),
            "healthy": self.healthy,
            "breaker": self.breaker.current_state(),
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
    _next: int = 0

    @property
    def max_retries(self) -> int:
        return self.deployments[0].config.max_retries

    def ordered(self, rng: random.Random) -> list[Deployment]:
        """This route's selectable deployments, best first, per the strategy."""
        deps = [d for d in self.deployments if d.selectable()]
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
    digest = hashlib.blake2b(f"{experiment}\x00{key}".encode(), digest_size=8).digest()
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
        clock: Callable[[], float] = time.monotonic,
        on_breaker: Listener | None = None,
    ) -> None:
        self.settings = settings
        self.providers = providers
        self.rng = rng or random.Random()  # noqa: S311 (load balancing, not crypto)
        self._allowed = frozenset(settings.allowed_models)
        self.aliases = dict(settings.aliases)
        self.deployments: list[Deployment] = []
        self._breakers: dict[str, CircuitBreaker] = {}

        def breaker(name: str) -> CircuitBreaker:
            b = self._breakers.get(name)
            if b is None:
                b = CircuitBreaker(name, settings.routing.breaker, clock=clock, listener=on_breaker)
                self._breakers[name] = b
            return b

        def deployment(spec: DeploymentSpec | None, provider: Provider) -> Deployment:
            upstream = spec.upstream_model if spec else None
            dep = Deployment(
                provider,
                upstream,
                spec.weight if spec else 1.0,
                spec.params if spec else {},
                spec.timeouts if spec else provider.config.timeouts,
                breaker(f"{provider.config.name}/{upstream or '*'}"),
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

    def plan(self, route: Route, model: str) -> list[Candidate]:
        """Deployments to try in order: the route's (per strategy), then its fallbacks'."""
        out: list[Candidate] = []
        self._extend(out, route, model, {route.name})
        for name in route.fallbacks:
            self._extend(out, self._known(name), model, {route.name})
        return out

    def typed_plan(self, route: Route, code: str, model: str) -> list[Candidate]:
        """The plan for a typed fallback (context window, content policy), or [] if none."""
        if code in CONTEXT_CODES:
            names = route.context_window_fallbacks
        elif code in CONTENT_POLICY_CODES:
            names = route.content_policy_fallbacks
        else:
            return []
        out: list[Candidate] = []
        for name in names:
            self._extend(out, self._known(name), model, {route.name})
        return out

    def _extend(self, out: list[Candidate], route: Route, model: str, seen: set[str]) -> None:
        for dep in route.ordered(self.rng):
            if not any(c.deployment is dep for c in out):
                out.append(Candidate(route, dep, dep.upstream_model or model))

    def plan_routes(self, route: Route) -> list[Route]:
        """The route and its fallback routes (for Retry-After hints)."""
        return [route, *(self._known(n) for n in route.fallbacks)]

    def routes_status(self) -> dict[str, Route]:
        if self.shorthand is not None:
            return {SHORTHAND_ROUTE: self.shorthand}
        return self.routes

    def deployments_of(self, provider: str) -> Iterable[Deployment]:
        return (d for d in self.deployments if d.config.name == provider)

    # --- /v1/models ------------------------------------------------------------------------

    def _entry(self, model_id: str, owned_by: str, created: int | None = None) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": created if created is not None else self._created,
            "owned_by": owned_by,
        }

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
