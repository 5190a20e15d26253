"""Access control, rate limits, usage and budgets on the request path; CORS for browsers.

Three hooks, each a no-op unless configured (the default costs nothing per request):

- :func:`access_middleware` (installed only with ``auth.enabled`` or CORS origins): answers
  CORS preflights on ``/v1/*`` and authenticates every ``/v1/*`` request before its body is
  read (401 ``INVALID_API_KEY``);
- :func:`admit` (``pipeline.chat_completions``' admit step, once the model is known): the key's
  model list (403), its budget (429 ``BUDGET_EXCEEDED``), then every applicable rate limit in
  one atomic step (429 ``RATE_LIMITED``), reserving the token estimate; the returned
  :class:`Admission` is settled in the pipeline's ``finally`` to the real usage;
- :func:`on_prepare` (``on_response_prepare``): the six ``x-ratelimit-*`` headers of a keyed
  request and the CORS headers, on every response including errors and streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from math import ceil
from typing import Any, Final, NoReturn

from aiohttp import web
from loguru import logger
from multidict import istr
from redis.exceptions import RedisError

from inference_server.auth import KeyStore, check_model
from inference_server.context import RequestContext
from inference_server.errors import BudgetExceeded, RateLimited, ServiceUnavailable
from inference_server.keys import CTX, METRICS, SETTINGS
from inference_server.limits import (
    SETTLE_EVERY_SECS,
    Bound,
    Decision,
    MemoryLimiter,
    Plan,
    RedisLimiter,
    Scope,
    compile_plan,
    fmt_duration,
    peek,
)
from inference_server.metrics import Metrics
from inference_server.redis_link import RedisLink
from inference_server.settings import Settings
from inference_server.state import REDIS, REDIS_HEALTH
from inference_server.streaming import estimate_prompt_tokens
from inference_server.tenancy_config import KeySpec, Limit, TenancySettings
from inference_server.usage import ANONYMOUS, Ledger
from inference_server.websocket_auth import subprotocol_authorization

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: What a failing Redis command raises (the client's own errors, sockets, our timeouts).
STATE_ERRORS = (RedisError, OSError, TimeoutError)
EXPOSE_HEADERS = ", ".join(
    (
        "x-request-id",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
        "retry-after",
        "retry-after-ms",
        "x-should-retry",
    )
)
ALLOW_METHODS = "GET, POST, OPTIONS"
#: Request headers a browser may send (matched case-insensitively; ``*`` ends a prefix).
ALLOW_HEADERS = ("authorization", "content-type", "x-request-id", "openai-*", "x-stainless-*")
MAX_PREFLIGHT_HEADERS = 64


class TenantMetrics:
    """admissions by outcome, headroom, tokens per key (budget spend), Redis latency and errors.

    Label ``key`` is a key's name: the configured names, then virtual keys' names up to
    ``metrics.max_label_values``; any other name counts as "other".
    """

    def __init__(self, metrics: Metrics, max_names: int) -> None:
        self.enabled = metrics.enabled
        self.max_names = max_names
        self.names: dict[str, str] = {ANONYMOUS: ANONYMOUS}
        self.children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.by_key: dict[str, KeyChildren] = {}
        Counter, Gauge, Histogram = metrics.classes
        r = metrics.registry
        self.admissions = Counter(
            "inference_admissions",
            "Admission decisions on /v1/* by key name and outcome (admitted, unchecked, rpm, "
            "tpm, max_parallel, budget, invalid_key, model_not_allowed).",
            ("key", "outcome"),
            registry=r,
        )
        self.headroom = Gauge(
            "inference_limit_headroom_ratio",
            "Remaining / limit of the tightest limit a key met at its last admission.",
            ("key", "dimension"),
            multiprocess_mode="livemin",
            registry=r,
        )
        self.key_tokens = Counter(
            "inference_key_tokens",
            "Tokens used per key name (prompt, completion): what budgets count.",
            ("key", "kind"),
            registry=r,
        )
        self.redis_seconds = Histogram(
            "inference_state_redis_seconds",
            "Round trip of the tenancy Redis operations (admit, settle, flush, keys).",
            ("op",),
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5),
            registry=r,
        )
        self.redis_errors = Counter(
            "inference_state_redis_errors",
            "Tenancy Redis operations that failed (state.on_error applied).",
            ("op",),
            registry=r,
        )

    def know(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self.names and len(self.names) < self.max_names:
                self.names[name] = name[:64]

    def for_key(self, name: str | None) -> KeyChildren | None:
        """The label children of one key (resolved once per key label)."""
        if not self.enabled:
            return None
        label = self.label(name)
        children = self.by_key.get(label)
        if children is None:
            children = self.by_key[label] = KeyChildren(
                admitted=self.admissions.labels(label, "admitted"),
                headroom_requests=self.headroom.labels(label, "requests"),
                headroom_tokens=self.headroom.labels(label, "tokens"),
                prompt=self.key_tokens.labels(label, "prompt"),
                completion=self.key_tokens.labels(label, "completion"),
            )
        return children

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        key = (id(metric), labels)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = metric.labels(*labels)
        return child

    def publish(self) -> None:
        """Export what requests accumulated (called with every ledger flush)."""
        for children in self.by_key.values():
            children.publish()

    def label(self, name: str | None) -> str:
        return self.names.get(name or ANONYMOUS, "other")

    def admission(self, key: str | None, outcome: str) -> None:
        if not self.enabled:
            return
        if outcome == "admitted":
            children = self.for_key(key)
            if children is not None:
                children.admitted.inc()
            return
        self._child(self.admissions, (self.label(key), outcome)).inc()

    def decision(self, key: str | None, decision: Decision) -> None:
        children = self.for_key(key)
        if children is not None:
            children.decision(decision)

    def tokens(self, key: str | None, usage: dict[str, Any] | None) -> None:
        children = self.for_key(key)
        if children is not None and usage:
            children.tokens(usage)

    def redis(self, op: str, secs: float | None) -> None:
        if not self.enabled:
            return
        if secs is None:
            self._child(self.redis_errors, (op,)).inc()
        else:
            self._child(self.redis_seconds, (op,)).observe(secs)


@dataclass(slots=True)
class KeyChildren:
    """One key label's metric children: a request costs a few calls, no lookups by labels."""

    admitted: Any
    headroom_requests: Any
    headroom_tokens: Any
    prompt: Any
    completion: Any
    #: What :meth:`publish` exports (per request: an assignment or an addition, no metric call).
    last: Decision | None = None
    pending_prompt: int = 0
    pending_completion: int = 0

    def decision(self, decision: Decision) -> None:
        self.last = decision

    def tokens(self, usage: dict[str, Any]) -> None:
        n = usage.get("prompt_tokens")
        if isinstance(n, int) and n > 0:
            self.pending_prompt += n
        n = usage.get("completion_tokens")
        if isinstance(n, int) and n > 0:
            self.pending_completion += n

    def publish(self) -> None:
        """Headroom at the last admission and the tokens since the last call (ledger flush)."""
        last, self.last = self.last, None
        if last is not None:
            if last.requests is not None:
                self.headroom_requests.set(last.requests.remaining / last.requests.limit)
            if last.tokens is not None:
                self.headroom_tokens.set(last.tokens.remaining / last.tokens.limit)
        if self.pending_prompt:
            self.prompt.inc(self.pending_prompt)
            self.pending_prompt = 0
        if self.pending_completion:
            self.completion.inc(self.pending_completion)
            self.pending_completion = 0


@dataclass(slots=True)
class Gate:
    """What the admission of one (key, model) pair needs, resolved once (not per request):
    its compiled limits, its key's budget (this process's share) and its metric children."""

    plan: Plan
    #: The plan on the memory limiter's cells (None with Redis).
    bound: Bound | None
    key: KeySpec | None
    #: The ledger's name of the key (its id, or ``ANONYMOUS``).
    key_id: str
    #: The key's budget in tokens, divided by the worker share (None: no budget).
    budget_tokens: int | None
    budget_period: str | None
    children: KeyChildren | None
    #: No limit and no budget: the admission only counts the request.
    free: bool


@dataclass(slots=True)
class Tenancy:
    """Everything the tenancy hooks need, one per app (i.e. per worker process)."""

    settings: TenancySettings
    keys: KeyStore
    limiter: MemoryLimiter
    redis_limiter: RedisLimiter | None
    ledger: Ledger
    metrics: TenantMetrics
    #: Memory backend with --workers N: every limit is divided by this.
    share: int
    on_error: str
    failed: Callable[[str, BaseException], None]
    app: web.Application
    #: Compiled gates per (key id, limited model or ""): bounded by keys × configured models.
    plans: dict[tuple[str, str], Gate] = field(default_factory=dict)
    #: ``settings.active``, read once (a property of the settings, on every request).
    active: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.active = self.settings.active

    def gate(self, key: KeySpec | None, model: str) -> Gate:
        """The limits, budget and metric children of this key and model, compiled on first
        use (a key's limits changed through the admin API make a new KeySpec, whose gate is
        compiled again)."""
        cache_key = (
            key.id if key is not None else "",
            model if model in self.settings.model_limits else "",
        )
        gate = self.plans.get(cache_key)
        if gate is None or gate.key is not key:
            gate = self.compile_gate(key, cache_key)
        return gate

    def compile_gate(self, key: KeySpec | None, cache_key: tuple[str, str]) -> Gate:
        if len(self.plans) >= MAX_PLANS:
            self.plans.clear()
        plan = compile_plan(self.scopes(key, cache_key[1]))
        budget = key.budget if key is not None else None
        gate = self.plans[cache_key] = Gate(
            plan=plan,
            bound=self.limiter.bind(plan) if self.redis_limiter is None else None,
            key=key,
            key_id=key.id if key is not None else ANONYMOUS,
            budget_tokens=budget.tokens // self.share if budget is not None else None,
            budget_period=budget.period if budget is not None else None,
            children=self.metrics.for_key(key.name if key is not None else None),
            free=plan.empty and budget is None,
        )
        return gate

    def plan(self, key: KeySpec | None, model: str) -> Plan:
        """The limits of this key and model (see :meth:`gate`)."""
        return self.gate(key, model).plan

    def scopes(self, key: KeySpec | None, model: str) -> list[Scope]:
        t = self.settings
        scopes: list[Scope] = []
        if t.global_limit:
            scopes.append(Scope("global", t.global_limit))
        model_limit = t.model_limits.get(model) if model else None
        if model_limit is not None:
            scopes.append(Scope(f"model:{model}", model_limit))
        if key is not None:
            limit: Limit = key.limit or t.default_key_limit
            if limit:
                scopes.append(Scope(f"key:{key.id}", limit))
        if self.share > 1:
            scopes = [Scope(s.name, s.limit.divided(self.share)) for s in scopes]
        return scopes


#: Plans kept at most (then the cache starts over): far above keys × limited models.
MAX_PLANS = 100_000
TENANCY = web.AppKey("tenancy", Tenancy)


class Admission:
    """One admitted request's reservation; :meth:`settle` once, when the response ended."""

    __slots__ = ("gate", "member", "model", "reserved", "slots", "tenancy")

    def __init__(
        self,
        tenancy: Tenancy | None = None,
        gate: Gate | None = None,
        model: str = "",
        reserved: int = 0,
        slots: tuple[str, ...] = (),
        member: str = "",
    ) -> None:
        self.tenancy = tenancy
        #: The key's limits, budget and metric children (resolved once per key and model).
        self.gate = gate
        self.model = model
        self.reserved = reserved
        self.slots = slots
        self.member = member

    def settle(self, ctx: RequestContext) -> None:
        """Settle the token reservation to the real usage, free concurrency slots, record usage.

        Usage known: the reservation moves to it.  No usage and nothing delivered (an error
        before the answer): refunded.  A stream cut without usage keeps the reservation.
        Every keyed request ends here, so the usage is read once, inline, for the ledger,
        the key's token metrics and the settlement.
        """
        t = self.tenancy
        gate = self.gate
        if t is None or gate is None:
            return
        usage = ctx.usage
        if type(usage) is dict and usage:
            prompt = usage.get("prompt_tokens")
            if type(prompt) is not int or prompt < 0:  # bool is not int here
                prompt = 0
            completion = usage.get("completion_tokens")
            if type(completion) is not int or completion < 0:
                completion = 0
            delta = prompt + completion - self.reserved
            children = gate.children
            if children is not None:
                children.pending_prompt += prompt
                children.pending_completion += completion
        else:
            prompt = completion = 0
            # {}: usage known, and nothing was used; no usage: refunded unless delivered
            if type(usage) is dict or ctx.status is None or ctx.status >= 400:
                delta = -self.reserved
            else:
                delta = 0
        t.ledger.add(
            gate.key_id, self.model, prompt, completion, ctx.usage_estimated, gate.budget_period
        )
        if gate.free:
            return
        if t.redis_limiter is None:
            t.limiter.settle(gate.plan, delta, self.slots, gate.bound)
        elif delta or self.slots:
            # Queued: one script call every few ms carries every request's settlement.
            t.redis_limiter.settle(gate.plan, delta, self.slots, self.member)


#: Returned when tenancy is off: settling it does nothing.
NO_ADMISSION = Admission()
_members = itertools.count()


async def admit(request: web.Request, ctx: RequestContext, body: dict[str, Any]) -> Admission:
    """The admit step: model permission, budget, rate limits (raises 403 / 429 / 503).

    Every keyed request runs this: what depends only on the key and the model comes from its
    cached :class:`Gate`, and the small helpers are inlined (each Python call costs more than
    the arithmetic it does here).
    """
    t = ctx.runtime.tenancy  # the request's runtime snapshot (issue 16: reloadable)
    if t is None or not t.active:  # off, or CORS only
        return NO_ADMISSION
    key: KeySpec | None = ctx.api_key
    model = ctx.model or ""
    if key is not None and key.models:
        try:
            check_model(key, model)
        except Exception:
            t.metrics.admission(key.name, "model_not_allowed")
            raise
    gate = t.plans.get(
        (key.id if key is not None else "", model if model in t.settings.model_limits else "")
    )
    if gate is None or gate.key is not key:
        gate = t.gate(key, model)
    children = gate.children
    if gate.free:
        if children is not None:
            children.admitted.inc()
        return Admission(t, gate, model)
    # The reservation: the prompt estimate plus the completion's bound.
    out = body.get("max_completion_tokens") or body.get("max_tokens")
    if type(out) is not int or out <= 0:  # bool is not int here
        out = t.settings.default_max_tokens
    reserved = estimate_prompt_tokens(body) + out
    member = ""  # Redis: this request's slot member (unique across processes)
    if t.redis_limiter is None:
        left = None
        if gate.budget_tokens is not None:
            left = gate.budget_tokens - t.ledger.spent_now(gate.key_id, gate.budget_period or "")
        decision = t.limiter.admit(gate.plan, reserved, left, gate.bound)
    else:
        member = f"{os.getpid()}:{next(_members)}"
        decision = await _admit_redis(t, t.redis_limiter, gate.plan, reserved, key, member)
    ctx.rate = decision
    if not decision.ok:
        refused(t, key, decision)
    if decision.unchecked:
        name = key.name if key is not None else None
        t.metrics.admission(name, "unchecked")
        t.metrics.decision(name, decision)
    elif children is not None:
        children.admitted.inc()
        children.last = decision
    return Admission(t, gate, model, reserved, decision.slots, member)


def refused(t: Tenancy, key: KeySpec | None, decision: Decision) -> NoReturn:
    """Count a refusal and raise its error: 429 ``BUDGET_EXCEEDED`` or ``RATE_LIMITED``."""
    name = key.name if key is not None else None
    t.metrics.admission(name, decision.reason)
    t.metrics.decision(name, decision)
    budget = key.budget if key is not None else None
    if decision.reason == "budget" and budget is not None:
        raise BudgetExceeded(
            f"The API key '{name}' spent its budget of {budget.tokens} tokens this "
            f"{budget.period} (UTC)",
        )
    err = RateLimited(
        f"Rate limit reached ({decision.reason}): retry in {decision.retry_after:.2f}s",
        retry_after=decision.retry_after,
    )
    err.client_retry = True
    raise err


async def _admit_redis(
    t: Tenancy,
    limiter: RedisLimiter,
    plan: Plan,
    reserved: int,
    key: KeySpec | None,
    member: str,
) -> Decision:
    budget = None
    if key is not None and key.budget is not None:
        budget = (t.ledger.spent_key(key.id, key.budget.period), key.budget.tokens)
    started = time.perf_counter()
    try:
        decision = await limiter.admit(plan, reserved, budget, member)
    except STATE_ERRORS as exc:
        t.metrics.redis("admit", None)
        t.failed("rate limits", exc)
        if t.on_error == "deny":
            raise ServiceUnavailable(
                "Rate-limit state is unreachable and state.on_error is deny; try again shortly",
                retry_after=1,
            ) from None
        return Decision(unchecked=True)
    t.metrics.redis("admit", time.perf_counter() - started)
    return decision


# --- HTTP hooks -------------------------------------------------------------------------------


#: The paths the tenancy hooks act on (a prefix test, inline: the hooks run on every request).
API_PREFIX: Final = "/v1/"


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CORS preflight and authentication for /v1/* (installed only when configured)."""
    if not request.path.startswith(API_PREFIX):
        return await handler(request)
    ctx = request[CTX]  # request_context (outermost) made it
    t = ctx.runtime.tenancy or request.app[TENANCY]  # issue 16: reloadable
    settings = t.settings
    if request.method == "OPTIONS" and settings.cors_origins:
        return preflight(request, settings.cors_origins)
    if settings.auth_enabled:
        headers = request.headers
        try:
            key = t.keys.authenticate(
                headers.get("Authorization")
                or subprotocol_authorization(headers)  # issue 15: WebSocket, browsers
            )
        except Exception:
            t.metrics.admission(None, "invalid_key")
            raise
        ctx.api_key, ctx.key_name = key, key.name
    return await handler(request)


def _allowed_origin(origin: str | None, origins: tuple[str, ...]) -> str | None:
    if not origin or len(origin) > 512:
        return None
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


def _header_allowed(name: str) -> bool:
    name = name.strip().lower()
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in ALLOW_HEADERS)


def preflight(request: web.Request, origins: tuple[str, ...]) -> web.Response:
    """``OPTIONS`` on /v1/*: 204 with what a page may send (headers only the allowed ones)."""
    response = web.Response(status=204)
    origin = _allowed_origin(request.headers.get("Origin"), origins)
    if origin is None:
        return response  # no CORS headers: the browser refuses, as it should
    asked = request.headers.get("Access-Control-Request-Headers", "")[:4096]
    names = [h.strip() for h in asked.split(",") if h.strip()][:MAX_PREFLIGHT_HEADERS]
    allowed = [h for h in names if _header_allowed(h)] or [
        "Authorization",
        "Content-Type",
        "x-request-id",
    ]
    response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
    response.headers["Access-Control-Allow-Headers"] = ", ".join(allowed)
    response.headers["Access-Control-Max-Age"] = "600"
    return response


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Rate-limit and CORS headers on every /v1/* response (errors and streams too)."""
    if not request.path.startswith(API_PREFIX):
        return
    try:
        ctx: RequestContext | None = request[CTX]
    except KeyError:  # only for a protocol error no middleware saw
        ctx = None
    t = (ctx.runtime.tenancy if ctx is not None else None) or request.app[TENANCY]
    if t.settings.cors_origins:
        origin = _allowed_origin(request.headers.get("Origin"), t.settings.cors_origins)
        if origin is not None:
            headers = response.headers
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
            if origin != "*":
                headers["Vary"] = "Origin"
    decision = ctx.rate if ctx is not None else None
    if decision is None or (decision.requests is None and decision.tokens is None):
        decision = current_limits(ctx, t)  # issue 12: every keyed response has them
        if decision is None:
            return
    # The x-ratelimit-* headers of the tightest requests and tokens limits.  About a quarter
    # of what a key costs a request was building these, so the limit headers are cached per
    # value, a reset under a second is looked up, numbers are formatted with f-strings.
    out: list[tuple[istr, str]] = []
    dim = decision.requests
    if dim is not None:
        secs = dim.reset_secs
        out += (
            _REQUEST_LIMITS.get(dim.limit) or _limit_header(_REQUEST_LIMITS, _REQ_LIMIT, dim.limit),
            (_REQ_REMAINING, f"{dim.remaining}"),
            (
                _REQ_RESET,
                _MS_TEXT[ceil(secs * 1000.0)] if 0.0 <= secs < 1.0 else fmt_duration(secs),
            ),
        )
    dim = decision.tokens
    if dim is not None:
        secs = dim.reset_secs
        out += (
            _TOKEN_LIMITS.get(dim.limit) or _limit_header(_TOKEN_LIMITS, _TOK_LIMIT, dim.limit),
            (_TOK_REMAINING, f"{dim.remaining}"),
            (
                _TOK_RESET,
                _MS_TEXT[ceil(secs * 1000.0)] if 0.0 <= secs < 1.0 else fmt_duration(secs),
            ),
        )
    response.headers.extend(out)


#: OpenAI's rate-limit header names, made case-insensitive strings once (not per response).
_REQUESTS_HEADERS: Final = tuple(
    istr(f"x-ratelimit-{what}-requests") for what in ("limit", "remaining", "reset")
)
_TOKENS_HEADERS: Final = tuple(
    istr(f"x-ratelimit-{what}-tokens") for what in ("limit", "remaining", "reset")
)
_REQ_LIMIT, _REQ_REMAINING, _REQ_RESET = _REQUESTS_HEADERS
_TOK_LIMIT, _TOK_REMAINING, _TOK_RESET = _TOKENS_HEADERS
#: "0ms" … "1000ms": the usual reset (under a second, ``fmt_duration``'s form) by index.
_MS_TEXT: Final = tuple(f"{ms}ms" for ms in range(1001))
#: The ``*-limit-*`` header per limit value (limits come from settings and keys): the same
#: tuple every time, not a number formatted per response.
_REQUEST_LIMITS: dict[int, tuple[istr, str]] = {}
_TOKEN_LIMITS: dict[int, tuple[istr, str]] = {}
MAX_LIMIT_HEADERS = 10_000


def _limit_header(cache: dict[int, tuple[istr, str]], name: istr, limit: int) -> tuple[istr, str]:
    header = (name, f"{limit}")
    if len(cache) < MAX_LIMIT_HEADERS:
        cache[limit] = header
    return header


def current_limits(ctx: RequestContext | None, t: Tenancy) -> Decision | None:
    """The limits of a response that had no admission (``/v1/models``, a 400 before the model
    was known, a 403, a budget refusal, Redis unreachable): read from this process's view of
    the state, never a Redis call.  None for a request without a valid key when auth is on."""
    if not t.settings.active:
        return None
    key = ctx.api_key if ctx is not None else None
    if key is None and t.settings.auth_enabled:
        return None
    plan = t.plan(key, (ctx.model if ctx is not None else None) or "")
    if t.redis_limiter is None:
        return peek(plan, t.limiter.tats, t.limiter.clock())
    return peek(plan, t.redis_limiter.known, time.monotonic())


def install(app: web.Application, settings: Settings) -> None:
    """create_app's hook: middleware, response hook and the cleanup context, when configured."""
    public_bind_warning(settings)
    t = settings.tenancy
    if not (t.active or t.cors_origins):
        return
    app.middlewares.append(access_middleware)
    app.on_response_prepare.append(on_prepare)
    app.cleanup_ctx.append(tenancy_ctx)


async def tenancy_ctx(app: web.Application) -> AsyncIterator[None]:
    """Build the app's :class:`Tenancy` after the Redis client exists; background loops."""
    settings = app[SETTINGS]
    t = settings.tenancy
    redis = app[REDIS]
    health = app[REDIS_HEALTH]
    metrics = TenantMetrics(app[METRICS], settings.metrics.max_label_values)
    metrics.know(k.name for k in t.keys)
    store = KeyStore(t.keys, redis)
    store.on_names = metrics.know
    share = settings.server.workers if redis is None else 1
    # The admission's own connection (redis_link.py): None with no Redis or a URL it declines.
    link = None
    if redis is not None:
        link = RedisLink.from_url(settings.state.redis_url, settings.state.timeout_secs)

    def failed(what: str, exc: BaseException) -> None:
        health.failed(what, exc)

    tenancy = Tenancy(
        settings=t,
        keys=store,
        limiter=MemoryLimiter(),
        redis_limiter=RedisLimiter(redis, link) if redis is not None else None,
        ledger=Ledger(redis),
        metrics=metrics,
        share=share,
        on_error=settings.state.on_error,
        failed=failed,
        app=app,
    )
    app[TENANCY] = tenancy
    startup_notes(settings)
    # The loops stop at the event, between Redis commands: cancelling one mid-command can
    # leave redis-py's connection waiting to close (see stop_loops).
    stop = asyncio.Event()

    async def pause(secs: float) -> bool:
        """Wait ``secs``; True once the app is stopping."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(secs):
                await stop.wait()
        return stop.is_set()

    tasks: list[asyncio.Task[None]] = []
    if t.active:
        tasks.append(
            asyncio.create_task(tenancy.ledger.run(t.flush_secs, failed, metrics.publish, pause))
        )
        if tenancy.redis_limiter is not None:
            tasks.append(asyncio.create_task(settle_loop(tenancy, tenancy.redis_limiter, pause)))
        if redis is not None and t.auth_enabled:
            try:
                await store.refresh()
            except STATE_ERRORS as exc:
                failed("virtual keys", exc)
            tasks.append(asyncio.create_task(store.run(t.key_refresh_secs, failed, pause)))
    yield
    await stop_loops(stop, tasks)
    if tenancy.redis_limiter is not None:
        with contextlib.suppress(*STATE_ERRORS):
            await tenancy.redis_limiter.flush()
    if link is not None:
        await link.close()
    await tenancy.ledger.close()
    metrics.publish()


async def settle_loop(
    t: Tenancy, limiter: RedisLimiter, pause: Callable[[float], Awaitable[bool]]
) -> None:
    """Send queued settlements every ``SETTLE_EVERY_SECS`` (nothing when none are queued)."""
    while not await pause(SETTLE_EVERY_SECS):
        if not (limiter.pending_tokens or limiter.pending_slots):
            continue
        started = time.perf_counter()
        try:
            await limiter.flush()
        except STATE_ERRORS as exc:
            t.metrics.redis("settle", None)
            t.failed("rate-limit settle", exc)
            if await pause(1.0):  # Redis away: try again in a second, not every 5 ms
                return
            continue
        t.metrics.redis("settle", time.perf_counter() - started)


async def stop_loops(stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    """End the background loops between commands (each command is bounded by
    ``state.timeout_secs``), cancelling only one that did not end within 5 s."""
    stop.set()
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=5.0)
    for task in late:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def startup_notes(settings: Settings) -> None:
    """Say once what the operator must know about this configuration."""
    t = settings.tenancy
    memory = settings.state.backend != "redis"
    if t.auth_enabled and memory:
        logger.warning(
            "auth: virtual keys are kept in this process (state.backend: memory) and are lost "
            "at restart; use state.backend: redis to keep them"
        )
    if t.active and memory and settings.server.workers > 1:
        logger.warning(
            "limits: state.backend is memory with {} workers: each worker enforces 1/{} of "
            "every limit and budget, so limits are approximate; use state.backend: redis for "
            "exact limits",
            settings.server.workers,
            settings.server.workers,
        )


def public_bind_warning(settings: Settings) -> None:
    """auth off on a non-loopback address: anyone who reaches the port spends upstream keys."""
    host = settings.server.host
    if settings.tenancy.auth_enabled or host in ("127.0.0.1", "localhost", "::1"):
        return
    if host.startswith("127."):
        return
    logger.warning(
        "auth.enabled is false and the server binds {}: anyone who can reach this port "
        "spends the upstream keys (turn on auth.enabled and add keys)",
        host,
    )
