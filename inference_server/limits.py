"""Rate limits (GCRA for requests and tokens per minute, a counter for concurrency) and budgets,
in this process (``memory``) or in Redis (one atomic Lua script per admission).

GCRA keeps one number per limit: the theoretical arrival time (TAT).  A request costing ``q``
moves it by ``q × T`` (T = 60 s / limit) and is admitted iff the new TAT is at most one period
(τ = 60 s) ahead of now, so at most ``limit`` units go at once and then one per T: no window
edge where twice the limit gets through.  Tokens are reserved at admission (the prompt estimate
plus ``max_tokens`` or ``limits.default_max_tokens``, at most the limit itself) and settled to
the real usage when the response ends: the TAT moves back (or further) by the difference.

What limits a (key, model) pair is compiled once into a :class:`Plan` (keys, intervals, the
packed script argument), so an admission is arithmetic over a short tuple.  With Redis, every
worker and replica shares the state and Redis's own clock (``TIME`` inside the script): one
clock, exact limits.  Concurrency slots are members of a sorted set scored by their expiry, so
a process that dies mid-request leaks a slot for at most ``SLOT_TTL_SECS`` (expired members
are dropped when a set is full).  Settlements are queued and sent in one script call per
``SETTLE_EVERY_SECS`` (off the request path).  The scripts go over :mod:`redis_link`'s own
connection: the request path's one round trip costs ~10 µs of client CPU there, not ~30.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import orjson
from redis.asyncio import Redis

from inference_server.redis_link import RedisLink, Script, pack
from inference_server.tenancy_config import Limit

PERIOD_SECS = 60.0
#: A concurrency slot held by a process that died is freed after this long.
SLOT_TTL_SECS = 900.0
#: Queued settlements (token corrections, freed slots) go to Redis this often.
SETTLE_EVERY_SECS = 0.005
PREFIX = "isv:"
_US = 1_000_000


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of limits that applies to a request: a key's, a model's or the global one."""

    name: str  # "key:<id>", "model:<name>", "global"
    limit: Limit


@dataclass(frozen=True, slots=True)
class Gcra:
    """One GCRA limit: its state key, emission interval, limit and whether it counts tokens."""

    key: str
    interval: float
    limit: int
    tokens: bool


@dataclass(frozen=True, slots=True)
class Plan:
    """Every limit one (key, model) pair is subject to, compiled once."""

    gcra: tuple[Gcra, ...] = ()
    #: (state key, max_parallel) per scope with a concurrency limit.
    slots: tuple[tuple[str, int], ...] = ()
    #: The token limits (what settlement moves).
    tpm: tuple[Gcra, ...] = ()
    #: Redis: the script's KEYS (gcra keys, then slot keys) and its static arguments
    #: (n_gcra, n_slots, then interval_us, limit, is_tokens per gcra key, then max per slot key).
    keys: tuple[str, ...] = ()
    argv: tuple[int, ...] = (0, 0)
    #: ``keys`` and ``argv`` packed for the wire once (redis_link.pack), not per admission.
    packed_keys: bytes = b""
    packed_argv: bytes = pack((0, 0))
    #: The slot keys alone (what an admitted request holds).
    slot_keys: tuple[str, ...] = ()
    #: The memory limiter's loops: (state key, emission interval, limit) per rpm limit and
    #: per tpm limit (plain tuples, unpacked: no attribute reads, no branch on the kind).
    rpm_rows: tuple[tuple[str, float, int], ...] = ()
    tpm_rows: tuple[tuple[str, float, int], ...] = ()
    #: The state keys of ``rpm_rows`` then ``tpm_rows``: the new TATs go in with one update.
    row_keys: tuple[str, ...] = ()

    #: No limit at all (no GCRA state, no concurrency slot): a plain field, read per request.
    empty: bool = True


def compile_plan(scopes: Sequence[Scope]) -> Plan:
    gcra: list[Gcra] = []
    slots: list[tuple[str, int]] = []
    for scope in scopes:
        lim = scope.limit
        for dim, limit in (("rpm", lim.rpm), ("tpm", lim.tpm)):
            if limit is not None:
                # The limit is part of the key (issue 16): a GCRA state is a time debt measured
                # in the old limit's intervals, so a limit changed by a hot reload starts over
                # instead of inheriting up to a minute of the old one's debt.
                key = f"{PREFIX}rl:{scope.name}:{dim}:{limit}"
                gcra.append(Gcra(key, PERIOD_SECS / limit, limit, dim == "tpm"))
        if lim.max_parallel is not None:
            slots.append((f"{PREFIX}par:{scope.name}", lim.max_parallel))
    spec: list[int] = [len(gcra), len(slots)]
    for g in gcra:
        spec += [round(g.interval * _US), g.limit, int(g.tokens)]
    spec += [n for _, n in slots]
    keys = (*(g.key for g in gcra), *(k for k, _ in slots))
    return Plan(
        gcra=tuple(gcra),
        slots=tuple(slots),
        tpm=tuple(g for g in gcra if g.tokens),
        keys=keys,
        argv=tuple(spec),
        packed_keys=pack(keys),
        packed_argv=pack(spec),
        slot_keys=tuple(k for k, _ in slots),
        rpm_rows=tuple((g.key, g.interval, g.limit) for g in gcra if not g.tokens),
        tpm_rows=tuple((g.key, g.interval, g.limit) for g in gcra if g.tokens),
        row_keys=(*(g.key for g in gcra if not g.tokens), *(g.key for g in gcra if g.tokens)),
        empty=not gcra and not slots,
    )


@dataclass(slots=True)
class Dimension:
    """What the client is told about one dimension (requests or tokens): the tightest limit."""

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
    #: Slot keys this request holds.
    slots: tuple[str, ...] = ()


def fmt_duration(secs: float) -> str:
    """OpenAI's reset format: "1s", "6m0s", "12ms"."""
    if secs < 1:
        return f"{max(0, math.ceil(secs * 1000))}ms"
    secs = math.ceil(secs)
    minutes, s = divmod(secs, 60)
    return f"{minutes}m{s}s" if minutes else f"{s}s"


def headers_for(decision: Decision, plan: Plan, tats: Sequence[float], now: float) -> None:
    """The tightest requests and tokens limits, from each limit's TAT after this request."""
    best_r = best_t = None
    rem_r = rem_t = 0
    reset_r = reset_t = 0.0
    horizon = now + PERIOD_SECS
    for g, tat in zip(plan.gcra, tats, strict=False):
        # (+1e-6: TATs come back from Redis as whole microseconds)
        remaining = int((horizon - (tat if tat > now else now)) / g.interval + 1e-6)
        if remaining > g.limit:
            remaining = g.limit
        elif remaining < 0:
            remaining = 0
        if g.tokens:
            if best_t is None or remaining < rem_t:
                best_t, rem_t, reset_t = g, remaining, tat - now
        elif best_r is None or remaining < rem_r:
            best_r, rem_r, reset_r = g, remaining, tat - now
    if best_r is not None:
        decision.requests = Dimension(best_r.limit, rem_r, reset_r if reset_r > 0.0 else 0.0)
    if best_t is not None:
        decision.tokens = Dimension(best_t.limit, rem_t, reset_t if reset_t > 0.0 else 0.0)


def peek(plan: Plan, tats: Mapping[str, float], now: float) -> Decision | None:
    """The ``x-ratelimit-*`` values of ``plan`` at ``now``, admitting nothing: for a keyed
    response without an admission of its own (``/v1/models``, an error before or instead of
    one, a budget refusal).  None when the plan has no rpm or tpm limit."""
    if not plan.gcra:
        return None
    decision = Decision()
    headers_for(decision, plan, [tats.get(g.key, now) for g in plan.gcra], now)
    return decision


#: A GCRA cell that no admission has set yet (below every clock reading).
NEVER = -math.inf


@dataclass(frozen=True, slots=True)
class Bound:
    """A :class:`Plan` bound to one :class:`MemoryLimiter`'s state cells.

    Each limit's state is a one-element list (a cell) shared by every plan with that limit, so
    an admission reads and writes ``cell[0]`` instead of looking each key up in a dict (the
    lookups were most of an admission's cost).  Bound once per compiled plan (a
    ``tenancy.Gate`` keeps it)."""

    #: (TAT cell, emission interval, limit) per rpm limit, then per tpm limit.
    rpm: tuple[tuple[list[float], float, int], ...]
    tpm: tuple[tuple[list[float], float, int], ...]
    #: The TAT cells of ``rpm`` then ``tpm`` (the order an admission's new TATs come in).
    cells: tuple[list[float], ...]
    #: (in-flight count cell, max_parallel) per concurrency limit.
    slots: tuple[tuple[list[int], int], ...]


class TatView(Mapping[str, float]):
    """The TATs a :class:`MemoryLimiter` holds, by state key (what :func:`peek` reads)."""

    def __init__(self, cells: dict[str, list[float]]) -> None:
        self.cells = cells

    def __getitem__(self, key: str) -> float:
        tat = self.cells[key][0]
        if tat == NEVER:
            raise KeyError(key)
        return tat

    def __iter__(self) -> Iterator[str]:
        return (key for key, cell in self.cells.items() if cell[0] != NEVER)

    def __len__(self) -> int:
        return sum(1 for cell in self.cells.values() if cell[0] != NEVER)


class MemoryLimiter:
    """This process's limits.  Cells are keyed by scope names, which come from configuration
    and keys (never from a client's string), so they stay bounded."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        #: One TAT cell per GCRA state key; one in-flight count cell per concurrency key.
        self.cells: dict[str, list[float]] = {}
        self.slot_cells: dict[str, list[int]] = {}
        self.tats = TatView(self.cells)

    def bind(self, plan: Plan) -> Bound:
        """The plan's limits as this limiter's cells (made on first use, then shared)."""
        cells, slot_cells = self.cells, self.slot_cells
        rpm = tuple((cells.setdefault(k, [NEVER]), i, n) for k, i, n in plan.rpm_rows)
        tpm = tuple((cells.setdefault(k, [NEVER]), i, n) for k, i, n in plan.tpm_rows)
        return Bound(
            rpm=rpm,
            tpm=tpm,
            cells=tuple(cell for cell, _, _ in (*rpm, *tpm)),
            slots=tuple((slot_cells.setdefault(k, [0]), most) for k, most in plan.slots),
        )

    def admit(
        self,
        plan: Plan,
        tokens: int,
        budget_left: int | None = None,
        bound: Bound | None = None,
    ) -> Decision:
        """Admit a request costing ``tokens`` (and one request) against every limit of ``plan``
        (``bound``: the plan's cells, from :meth:`bind`; bound here when not given).

        Every keyed request runs this, so each kind of limit is one tight loop over plain
        tuples: each limit's new TAT, whether it is late, and the tightest remaining, the same
        arithmetic as :func:`headers_for`.  A refusal (the rare case) is worked out again by
        :meth:`late` in the plan's order, on the untouched TATs.
        """
        if budget_left is not None and budget_left <= 0:
            return Decision(ok=False, reason="budget")
        if bound is None:
            bound = self.bind(plan)
        now = self.clock()
        horizon = now + PERIOD_SECS
        # Each new TAT is written at once (the old ones kept, to put back on a refusal).
        olds: list[float] = []
        # Any limit within EDGE_SECS of its period: the exact, plan-order path decides.
        edge = False
        # The tightest limit per dimension: its limit (-1: none), remaining, new TAT.
        # ``slack`` ≥ EDGE_SECS here, so the floor of ``remaining`` is headers_for's int();
        # its clamp to [0, limit] cannot bind (new > now, limits ≤ MAX_LIMIT) and is applied
        # to the tightest only, as a guard.
        r_limit, r_rem, r_new = -1, _UNSET, 0.0
        for cell, interval, limit in bound.rpm:
            tat = cell[0]
            olds.append(tat)
            new = cell[0] = (tat if tat > now else now) + interval
            slack = horizon - new
            if slack < EDGE_SECS:
                edge = True
            remaining = (slack / interval + 1e-6) // 1.0
            if remaining < r_rem:
                r_limit, r_rem, r_new = limit, remaining, new
        t_limit, t_rem, t_new = -1, _UNSET, 0.0
        for cell, interval, limit in bound.tpm:
            tat = cell[0]
            olds.append(tat)
            new = cell[0] = (tat if tat > now else now) + (
                tokens if tokens < limit else limit
            ) * interval
            slack = horizon - new
            if slack < EDGE_SECS:
                edge = True
            remaining = (slack / interval + 1e-6) // 1.0
            if remaining < t_rem:
                t_limit, t_rem, t_new = limit, remaining, new
        if not edge:
            for count, most in bound.slots:
                if count[0] >= most:
                    edge = True
                    break
        if edge:
            for cell, old in zip(bound.cells, olds, strict=True):
                cell[0] = old
            return self.exact(plan, tokens, now, bound)
        for count, _ in bound.slots:
            count[0] += 1
        requests = tokens_dim = None
        if r_limit >= 0:
            n = int(r_rem)
            requests = Dimension(r_limit, r_limit if n > r_limit else n, r_new - now)
        if t_limit >= 0:
            n = int(t_rem)
            tokens_dim = Dimension(t_limit, t_limit if n > t_limit else n, t_new - now)
        return Decision(True, "", 0.0, requests, tokens_dim, False, plan.slot_keys)

    def exact(self, plan: Plan, tokens: int, now: float, bound: Bound) -> Decision:
        """An admission near a limit's edge (or at a full concurrency limit), limit by limit
        in the plan's order: the reference the fast path of :meth:`admit` agrees with."""
        tats = self.tats
        news: list[float] = []
        wait, worst = 0.0, None
        for g in plan.gcra:
            tat = tats.get(g.key, now)
            if tat < now:
                tat = now
            new = tat + ((tokens if tokens < g.limit else g.limit) if g.tokens else 1) * g.interval
            late = new - PERIOD_SECS - now
            if late > 1e-9 and late > wait:
                wait, worst = late, g
            news.append(new)
        if worst is not None:
            return self.refused(plan, "tpm" if worst.tokens else "rpm", wait, now)
        for count, most in bound.slots:
            if count[0] >= most:
                return self.refused(plan, "max_parallel", 1.0, now)
        for g, new in zip(plan.gcra, news, strict=True):
            self.cells[g.key][0] = new
        for count, _ in bound.slots:
            count[0] += 1
        decision = Decision(slots=plan.slot_keys)
        headers_for(decision, plan, news, now)
        return decision

    def refused(self, plan: Plan, reason: str, retry_after: float, now: float) -> Decision:
        """A refusal, with the headers of the limits as they stand (nothing was taken)."""
        decision = Decision(False, reason, retry_after)
        headers_for(decision, plan, [self.tats.get(g.key, now) for g in plan.gcra], now)
        return decision

    def settle(
        self, plan: Plan, delta_tokens: int, slots: Sequence[str], bound: Bound | None = None
    ) -> None:
        """Move each token TAT by the difference between real and reserved usage; free the
        slots an admission took (``slots``: its :attr:`Decision.slots`)."""
        if bound is None:
            bound = self.bind(plan)
        if delta_tokens:
            now = self.clock()
            for cell, interval, _ in bound.tpm:
                tat = cell[0]
                if tat != NEVER:
                    tat += delta_tokens * interval
                    cell[0] = tat if tat > now else now
        if slots:
            for count, _ in bound.slots:
                left = count[0] - 1
                count[0] = left if left > 0 else 0


#: Above any remaining count: the first limit of a loop is the tightest so far.
_UNSET = float(1 << 62)
#: A limit whose new TAT comes this close to (or past) one period ahead sends the admission
#: down the exact path (:meth:`MemoryLimiter.exact`): only a limit about to refuse gets there.
EDGE_SECS = 1e-6


# --- Redis ----------------------------------------------------------------------------------

#: KEYS: gcra keys…, slot keys…, budget key.  ARGV: tokens, member, budget limit (-1: none),
#: then :attr:`Plan.argv` (n_gcra, n_slots, interval_us, limit, is_tokens per gcra key, max per
#: slot key): plain numbers, no JSON to decode.  Returns {status (0 ok, 1 gcra, 2 slots,
#: 3 budget), retry_us, now_us, worst gcra index, tat_us per gcra key}.  Every GCRA state is read
#: in one MGET.
ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tokens, member, budget = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local ng, ns = tonumber(ARGV[4]), tonumber(ARGV[5])
if budget >= 0 then
  local spent = tonumber(redis.call('GET', KEYS[ng + ns + 1]) or '0')
  if spent >= budget then return {3, 0, now, 0} end
end
local status, retry, worst = 0, 0, 0
local tats, news = {}, {}
if ng > 0 then tats = redis.call('MGET', unpack(KEYS, 1, ng)) end
for i = 1, ng do
  local b = 3 + 3 * i
  local interval, limit = tonumber(ARGV[b]), tonumber(ARGV[b + 1])
  local cost = 1
  if ARGV[b + 2] == '1' then cost = math.min(tokens, limit) end
  local tat = tonumber(tats[i]) or 0
  if tat < now then tat = now end
  local new = tat + cost * interval
  local wait = new - 60000000 - now
  if wait > retry then
    status, retry, worst = 1, wait, i
  end
  tats[i] = tat
  news[i] = new
end
if status == 0 then
  for j = 1, ns do
    local key, most = KEYS[ng + j], tonumber(ARGV[5 + 3 * ng + j])
    redis.call('ZADD', key, now + SLOT_TTL_US, member)
    if redis.call('ZCARD', key) > most then
      -- full: drop the slots of holders that died (expired scores), then count again
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
      if redis.call('ZCARD', key) > most then
        status, retry = 2, 1000000
        for k = 1, j do redis.call('ZREM', KEYS[ng + k], member) end
        break
      end
    end
    redis.call('PEXPIRE', key, SLOT_TTL_MS)
  end
end
local out = {status, math.floor(retry), now, worst}
if status ~= 0 then
  for i = 1, ng do out[4 + i] = math.floor(tats[i]) end
  return out
end
for i = 1, ng do
  local new = news[i]
  redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1000)
  out[4 + i] = math.floor(new)
end
return out
""".replace("SLOT_TTL_US", str(int(SLOT_TTL_SECS * _US))).replace(
    "SLOT_TTL_MS", str(int(SLOT_TTL_SECS * 1000))
)

#: KEYS: token gcra keys…, slot keys….  ARGV: JSON [n_tok, n_slots, interval_us, delta per
#: token key…, [members…] per slot key].
SETTLE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local spec = cjson.decode(ARGV[1])
local nt, ns = spec[1], spec[2]
for i = 1, nt do
  local interval, delta = spec[1 + 2 * i], spec[2 + 2 * i]
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat > 0 and delta ~= 0 then
    local new = tat + delta * interval
    if new <= now then
      redis.call('DEL', KEYS[i])
    else
      redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1000)
    end
  end
end
for j = 1, ns do
  redis.call('ZREM', KEYS[nt + j], unpack(spec[2 + 2 * nt + j]))
end
return 1
"""


class RedisLimiter:
    """The same limits in Redis: one script call per admission; settlements batched.

    Scripts go over ``link`` (:class:`~inference_server.redis_link.RedisLink`: one pipelined
    connection, a third of the client's per-call CPU) when the URL allows one, else through
    the ``redis.asyncio`` client; both send ``EVALSHA`` and load the script again after
    ``NOSCRIPT`` (a restarted Redis).
    """

    def __init__(self, redis: Redis, link: RedisLink | None = None) -> None:
        self.redis = redis
        self.link = link
        self.admit_script = Script(ADMIT_LUA)
        self.settle_script = Script(SETTLE_LUA)
        self._admit = redis.register_script(ADMIT_LUA)
        self._settle = redis.register_script(SETTLE_LUA)
        #: Queued settlements: token key → (interval, delta); slot key → members.
        self.pending_tokens: dict[str, list[float]] = {}
        self.pending_slots: dict[str, list[str]] = {}
        #: A flush is on its way to Redis (its settlements are not applied yet).
        self.flushing = False
        #: The last TAT this process saw per GCRA key, on this process's monotonic clock: what
        #: :func:`peek` reports on responses without an admission (no Redis call for them).
        #: Keys come from plans (configuration and keys), so it stays bounded.
        self.known: dict[str, float] = {}

    async def admit(
        self, plan: Plan, tokens: int, budget: tuple[str, int] | None, member: str
    ) -> Decision:
        link = self.link
        if link is not None:
            # The plan's keys and static arguments were packed when it was compiled.
            n = len(plan.keys)
            if budget is None:
                head, count = pack((n,)), n + 4 + len(plan.argv)
                dynamic = pack((tokens, member, -1))
            else:
                head, count = pack((n + 1,)), n + 5 + len(plan.argv)
                dynamic = pack((budget[0], tokens, member, budget[1]))
            body = b"".join((head, plan.packed_keys, dynamic, plan.packed_argv))
            reply = await link.run(self.admit_script, count, body)
        else:
            keys = plan.keys
            args: tuple[int | str, ...]
            if budget is None:
                args = (tokens, member, -1, *plan.argv)
            else:
                keys, args = (*keys, budget[0]), (tokens, member, budget[1], *plan.argv)
            reply = await self._admit(keys=keys, args=args)
        status = int(reply[0])
        if status == 3:
            return Decision(ok=False, reason="budget")
        now = int(reply[2]) / _US
        tats = [int(x) / _US for x in reply[4:]]
        offset = time.monotonic() - now  # Redis's clock → this process's
        known = self.known
        for g, tat in zip(plan.gcra, tats, strict=False):
            known[g.key] = tat + offset
        if status == 0:
            decision = Decision(slots=plan.slot_keys)
        elif status == 1:
            worst = plan.gcra[int(reply[3]) - 1]
            decision = Decision(False, "tpm" if worst.tokens else "rpm", int(reply[1]) / _US)
        else:
            decision = Decision(False, "max_parallel", 1.0)
        headers_for(decision, plan, tats, now)
        return decision

    def settle(self, plan: Plan, delta_tokens: int, slots: Sequence[str], member: str) -> None:
        """Queue a settlement (sent by :meth:`flush`)."""
        if delta_tokens:
            for g in plan.tpm:
                tat = self.known.get(g.key)
                if tat is not None:
                    self.known[g.key] = tat + delta_tokens * g.interval
                entry = self.pending_tokens.get(g.key)
                if entry is None:
                    self.pending_tokens[g.key] = [g.interval, float(delta_tokens)]
                else:
                    entry[1] += delta_tokens
        for key in slots:
            self.pending_slots.setdefault(key, []).append(member)

    @property
    def pending(self) -> bool:
        """Settlements queued or being sent."""
        return self.flushing or bool(self.pending_tokens or self.pending_slots)

    async def flush(self) -> None:
        """Send every queued settlement in one script call (requeued if it fails)."""
        tokens, slots = self.pending_tokens, self.pending_slots
        if not tokens and not slots:
            return
        self.pending_tokens, self.pending_slots = {}, {}
        spec: list[object] = [len(tokens), len(slots)]
        for interval, delta in tokens.values():
            spec += [round(interval * _US), round(delta)]
        spec += list(slots.values())
        self.flushing = True
        try:
            keys, args = (*tokens, *slots), (orjson.dumps(spec),)
            if self.link is not None:
                await self.link.evalsha(self.settle_script, keys, args)
            else:
                await self._settle(keys=keys, args=args)
        except BaseException:
            for key, (interval, delta) in tokens.items():
                entry = self.pending_tokens.setdefault(key, [interval, 0.0])
                entry[1] += delta
            for key, members in slots.items():
                self.pending_slots.setdefault(key, []).extend(members)
            raise
        finally:
            self.flushing = False
