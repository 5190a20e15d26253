"""Rate limits (GCRA for requests and tokens per minute, a counter for concurrency) and budgets,
in this process (``memory``) or in Redis (one atomic Lua script per admission).

GCRA keeps one number per limit: the theoretical arrival time (TAT).  A request costing ``q``
moves it by ``q × T`` (T = 60 s / limit) and is admitted iff the new TAT is at most one period
(τ = 60 s) ahead of now, so at most ``limit`` units go at once and then one per T: no window
edge where twice the limit gets through.  Tokens are reserved at admission (the prompt estimate
plus ``max_tokens`` or ``limits.default_max_tokens``, at most the limit itself) and settled to
the real usage when the response ends: the TAT moves back (or further) by the difference.

With Redis, every worker and replica shares the state and Redis's own clock (``TIME`` inside
the script): one clock, exact limits.  Concurrency slots are members of a sorted set scored by
their expiry, so a process that dies mid-request leaks nothing for longer than ``SLOT_TTL``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from redis.asyncio import Redis

from inference_server.tenancy_config import Limit

PERIOD_SECS = 60.0
#: A concurrency slot held by a process that died is freed after this long.
SLOT_TTL_SECS = 900.0
PREFIX = "isv:"


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of limits that applies to a request: a key's, a model's or the global one."""

    name: str  # "key:<id>", "model:<name>", "global"
    limit: Limit


@dataclass(slots=True)
class Dimension:
    """What the client is told about one dimension (requests or tokens): the tightest scope."""

    limit: int
    remaining: int
    reset_secs: float


@dataclass(slots=True)
class Decision:
    ok: bool = True
    #: Why not: "rpm", "tpm", "max_parallel", "budget"; "" when admitted.
    reason: str = ""
    retry_after: float = 0.0
    requests: Dimension | None = None
    tokens: Dimension | None = None
    #: Limits were not applied (shared state unreachable, ``state.on_error: allow``).
    unchecked: bool = False
    #: Scope names whose concurrency slot this request holds.
    slots: list[str] = field(default_factory=list)


def fmt_duration(secs: float) -> str:
    """OpenAI's reset format: "1s", "6m0s", "12ms"."""
    if secs < 1:
        return f"{max(0, math.ceil(secs * 1000))}ms"
    secs = math.ceil(secs)
    minutes, s = divmod(secs, 60)
    return f"{minutes}m{s}s" if minutes else f"{s}s"


def _interval(limit: int) -> float:
    return PERIOD_SECS / limit


def _tighter(current: Dimension | None, new: Dimension) -> Dimension:
    return new if current is None or new.remaining < current.remaining else current


def _dimension(limit: int, tat: float, now: float) -> Dimension:
    interval = _interval(limit)
    remaining = math.floor((now + PERIOD_SECS - max(tat, now)) / interval + 1e-9)
    return Dimension(limit, max(0, min(limit, remaining)), max(0.0, tat - now))


def report(decision: Decision, dim: str, limit: int, tat: float, now: float) -> None:
    """Fold one limit's state into what the response headers say (the tightest one wins)."""
    d = _dimension(limit, tat, now)
    if dim == "rpm":
        decision.requests = _tighter(decision.requests, d)
    else:
        decision.tokens = _tighter(decision.tokens, d)


class MemoryLimiter:
    """This process's limits.  Tables are keyed by scope names, which come from configuration
    and keys (never from a client's string), so they stay bounded."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.tats: dict[str, float] = {}
        self.inflight: dict[str, int] = {}

    def admit(
        self, scopes: Sequence[Scope], tokens: int, budget_left: int | None, member: str
    ) -> Decision:
        now = self.clock()
        if budget_left is not None and budget_left <= 0:
            return Decision(ok=False, reason="budget")
        decision = Decision()
        updates: list[tuple[str, float, int, str]] = []
        for scope in scopes:
            lim = scope.limit
            for dim, limit, cost in (("rpm", lim.rpm, 1), ("tpm", lim.tpm, tokens)):
                if limit is None:
                    continue
                key = f"{scope.name}:{dim}"
                tat = max(self.tats.get(key, now), now)
                new = tat + min(cost, limit) * _interval(limit)
                wait = new - PERIOD_SECS - now
                if wait > 1e-9:
                    decision.ok = False
                    if wait > decision.retry_after:
                        decision.retry_after, decision.reason = wait, dim
                    report(decision, dim, limit, tat, now)
                else:
                    updates.append((key, new, limit, dim))
            if (
                lim.max_parallel is not None
                and self.inflight.get(scope.name, 0) >= lim.max_parallel
            ):
                decision.ok = False
                if decision.retry_after < 1.0:
                    decision.retry_after, decision.reason = 1.0, "max_parallel"
        if not decision.ok:
            return decision
        for key, new, limit, dim in updates:
            self.tats[key] = new
            report(decision, dim, limit, new, now)
        for scope in scopes:
            if scope.limit.max_parallel is not None:
                self.inflight[scope.name] = self.inflight.get(scope.name, 0) + 1
                decision.slots.append(scope.name)
        return decision

    def settle(self, scopes: Sequence[Scope], delta_tokens: int, slots: Sequence[str]) -> None:
        """Move each token TAT by the difference between real and reserved usage; free slots."""
        now = self.clock()
        if delta_tokens:
            for scope in scopes:
                limit = scope.limit.tpm
                if limit is None:
                    continue
                key = f"{scope.name}:tpm"
                tat = self.tats.get(key)
                if tat is not None:
                    self.tats[key] = max(now, tat + delta_tokens * _interval(limit))
        for name in slots:
            left = self.inflight.get(name, 0) - 1
            if left > 0:
                self.inflight[name] = left
            else:
                self.inflight.pop(name, None)


# --- Redis ----------------------------------------------------------------------------------

#: KEYS: gcra keys…, slot keys…, [budget key].  ARGV: n_gcra, n_slots, budget_limit (-1: none),
#: then per gcra key: interval_us, tau_us, cost; per slot key: limit, member, ttl_us.
#: Returns {status (0 ok, 1 gcra, 2 slots, 3 budget), retry_us, now_us, worst gcra index, tat_us…}.
ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ng, ns, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if budget >= 0 then
  local spent = tonumber(redis.call('GET', KEYS[ng + ns + 1]) or '0')
  if spent >= budget then return {3, 0, now, 0} end
end
local status, retry, worst = 0, 0, 0
local tats, news = {}, {}
local a = 4
for i = 1, ng do
  local interval, tau, cost = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  local new = tat + cost * interval
  local wait = new - tau - now
  if wait > 0 then
    status = 1
    if wait > retry then retry = wait end
    tats[i] = tat
  else
    tats[i] = new
  end
  news[i] = new
end
for j = 1, ns do
  local key, limit = KEYS[ng + j], tonumber(ARGV[a])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= limit then
    if status == 0 then status = 2 end
    if retry < 1000000 then retry = 1000000 end
  end
  a = a + 3
end
local out = {status, math.floor(retry), now, worst}
if status ~= 0 then
  for i = 1, ng do out[#out + 1] = math.floor(tats[i]) end
  return out
end
a = 4
for i = 1, ng do
  local ttl = math.ceil((news[i] - now) / 1000) + 1000
  redis.call('SET', KEYS[i], string.format('%.0f', news[i]), 'PX', ttl)
  out[#out + 1] = math.floor(news[i])
  a = a + 3
end
for j = 1, ns do
  local member, ttl = ARGV[a + 1], tonumber(ARGV[a + 2])
  redis.call('ZADD', KEYS[ng + j], now + ttl, member)
  redis.call('PEXPIRE', KEYS[ng + j], math.ceil(ttl / 1000))
  a = a + 3
end
return out
"""

#: KEYS: token gcra keys…, slot keys….  ARGV: n_tok, n_slots, then per token key: interval_us,
#: delta tokens; per slot key: member.
SETTLE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local nt, ns = tonumber(ARGV[1]), tonumber(ARGV[2])
local a = 3
for i = 1, nt do
  local interval, delta = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat > 0 and delta ~= 0 then
    local new = tat + delta * interval
    if new <= now then
      redis.call('DEL', KEYS[i])
    else
      local ttl = math.ceil((new - now) / 1000) + 1000
      redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', ttl)
    end
  end
end
for j = 1, ns do
  redis.call('ZREM', KEYS[nt + j], ARGV[a])
  a = a + 1
end
return 1
"""

_US = 1_000_000


class RedisLimiter:
    """The same limits in Redis: one script call per admission, one per settlement."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        # register_script: EVALSHA, and EVAL again after NOSCRIPT (a restarted Redis).
        self._admit = redis.register_script(ADMIT_LUA)
        self._settle = redis.register_script(SETTLE_LUA)

    async def admit(
        self,
        scopes: Sequence[Scope],
        tokens: int,
        budget: tuple[str, int] | None,
        member: str,
    ) -> Decision:
        gcra: list[str] = []
        gargs: list[int] = []
        dims: list[tuple[str, int]] = []
        slot_keys: list[str] = []
        sargs: list[int | str] = []
        slot_names: list[str] = []
        for scope in scopes:
            lim = scope.limit
            for dim, limit, cost in (("rpm", lim.rpm, 1), ("tpm", lim.tpm, tokens)):
                if limit is None:
                    continue
                gcra.append(f"{PREFIX}rl:{scope.name}:{dim}")
                gargs += [round(_interval(limit) * _US), round(PERIOD_SECS * _US), min(cost, limit)]
                dims.append((dim, limit))
            if lim.max_parallel is not None:
                slot_keys.append(f"{PREFIX}par:{scope.name}")
                sargs += [lim.max_parallel, member, round(SLOT_TTL_SECS * _US)]
                slot_names.append(scope.name)
        keys = [*gcra, *slot_keys]
        if budget is not None:
            keys.append(budget[0])
        argv: list[int | str] = [
            len(gcra),
            len(slot_keys),
            -1 if budget is None else budget[1],
            *gargs,
            *sargs,
        ]
        reply = await self._admit(keys=keys, args=argv)
        status, retry_us, now_us = int(reply[0]), int(reply[1]), int(reply[2])
        if status == 3:
            return Decision(ok=False, reason="budget")
        decision = Decision(ok=status == 0, retry_after=retry_us / _US)
        now = now_us / _US
        for (dim, limit), tat in zip(dims, reply[4:], strict=False):
            report(decision, dim, limit, int(tat) / _US, now)
        if status == 1:
            # the dimension that waits longest names the reason
            decision.reason = dims[int(reply[3]) - 1][0]
        elif status == 2:
            decision.reason = "max_parallel"
        else:
            decision.slots = slot_names
        return decision

    async def settle(
        self, scopes: Sequence[Scope], delta_tokens: int, slots: Sequence[str], member: str
    ) -> None:
        tok_keys: list[str] = []
        targs: list[int | str] = []
        if delta_tokens:
            for scope in scopes:
                if scope.limit.tpm is not None:
                    tok_keys.append(f"{PREFIX}rl:{scope.name}:tpm")
                    targs += [round(_interval(scope.limit.tpm) * _US), delta_tokens]
        slot_keys = [f"{PREFIX}par:{name}" for name in slots]
        if not tok_keys and not slot_keys:
            return
        await self._settle(
            keys=[*tok_keys, *slot_keys],
            args=[len(tok_keys), len(slot_keys), *targs, *([member] * len(slot_keys))],
        )
