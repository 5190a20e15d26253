"""The exact-match response cache: key, stores, Cache-Control, coalescing, JSON and SSE replay.

The pipeline makes one call, :meth:`ResponseCache.lookup`, once the request is validated and its
route is known (the key holds the route: aliases and experiments resolved), and hands the
returned :class:`Lookup` the finished answer: ``store_json`` after a non-streaming attempt, or a
:class:`StreamCollector` to ``streaming.relay``, which completes it only when the stream ended
normally.  Everything else is here.

Why it is built this way:

* **One entry answers both forms.** An entry is the ``chat.completion`` JSON.  A non-streaming
  hit sends those bytes as they are; a streaming hit replays them as well-formed SSE (role chunk,
  content deltas, finish chunk, usage chunk when ``include_usage`` asked, ``[DONE]``).  A
  streamed answer is assembled into the same JSON once it completed normally; errors, 429s, a
  stream cut or cancelled, an answer without a ``finish_reason`` are never stored (a gateway that
  replays a cached 429 fails fresh requests for nothing).
* **The key** is a blake2b hash of the partition (the API key's name, or one shared partition
  with ``cache.scope: global`` or auth off), the route the request resolved to, and the request
  body without ``stream``, ``stream_options`` and ``user``, keys sorted at every level and
  integral floats written as integers (``temperature: 1`` and ``1.0`` are one entry).
* **Coalescing.** Identical misses at the same time wait for the first one (the leader) instead
  of each calling the upstream; they get its stored answer (streaming waiters: the replay once
  the leader's stream ended, not the stream as it arrives).  A waiter never waits past its own
  time budget (``routing.max_time_secs`` from arrival); when the leader's answer is not
  storable, every waiter calls the upstream itself, as without a cache.  With the Redis backend,
  a short lock (``SET NX PX cache.lock_secs``) lets other replicas wait for the leader's entry
  too: best effort (a lock that expires or a Redis failure means one more upstream call).
* **Redis failing never fails a request.** A Redis error is counted and logged (at most every
  10 s, ``state.RedisHealth``); the request is served from the upstream; for the next second
  Redis is not asked at all (no per-request timeout while it is down), then it is tried again.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from loguru import logger
from redis.exceptions import RedisError

from inference_server.cache_config import CacheSettings
from inference_server.context import RequestContext
from inference_server.keys import METRICS, SETTINGS
from inference_server.providers.base import ChatChunk
from inference_server.routing import SHORTHAND_ROUTE
from inference_server.state import REDIS, REDIS_HEALTH, RedisHealth
from inference_server.streaming import DONE, SSE_HEADERS, estimate_prompt_tokens, sse_event

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from inference_server.metrics import Metrics
    from inference_server.settings import Settings

#: Request fields that do not change the answer (transport and attribution).
EXCLUDED = frozenset({"stream", "stream_options", "user"})
#: Longest content delta of a replayed stream (characters).
REPLAY_PIECE_CHARS = 4096
#: After a Redis failure, Redis is not asked for this long (then tried again).
REDIS_RETRY_SECS = 1.0
#: How often a waiter for another replica's answer looks for it in Redis.
POLL_SECS = 0.02
_PREFIX = "inference:cache:v1:"
_HEADER = struct.Struct(">cd")  # format flag (b"j" JSON, b"z" zlib'd JSON), stored_at


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored answer: the ``chat.completion`` JSON and when it was stored (wall clock)."""

    payload: bytes
    stored_at: float
    expires_at: float

    @property
    def size(self) -> int:
        return len(self.payload) + 100  # the entry's own overhead, roughly


@dataclass(frozen=True, slots=True)
class CacheControl:
    """The request's ``Cache-Control`` directives the cache honours."""

    no_cache: bool = False
    no_store: bool = False
    max_age: float | None = None


_NO_DIRECTIVES = CacheControl()


def parse_cache_control(value: str | None) -> CacheControl:
    """``no-cache`` (do not read, still store), ``no-store`` (neither), ``max-age=N`` (accept
    entries at most N seconds old).  Unknown or malformed directives are ignored, as HTTP
    caches do; the header is bounded by the server's header limit (8190 bytes)."""
    if not value:
        return _NO_DIRECTIVES
    no_cache = no_store = False
    max_age: float | None = None
    for part in value.lower().split(","):
        name, _, arg = part.strip().partition("=")
        if name == "no-cache":
            no_cache = True
        elif name == "no-store":
            no_store = True
        elif name == "max-age":
            arg = arg.strip().strip('"')
            if arg.isdigit() and len(arg) <= 12:
                max_age = float(arg) if max_age is None else min(max_age, float(arg))
    return CacheControl(no_cache, no_store, max_age)


def _norm(value: Any) -> Any:
    """Integral floats as ints (at every level), so equal numbers give equal keys."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_norm(v) for v in value]
    return value


def cache_key(partition: str, route: str, body: dict[str, Any]) -> str:
    """The entry's key: partition, route and the canonical request (see the module docstring).

    Messages are hashed as sent (sorted keys), not walked: their numbers are rare and a walk
    would cost microseconds per message on every request.
    """
    canon = {k: (v if k == "messages" else _norm(v)) for k, v in body.items() if k not in EXCLUDED}
    canon["model"] = route
    data = orjson.dumps([partition, canon], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def storable(result: dict[str, Any]) -> bool:
    """A complete, successful completion: choices, each with a message and a finish reason."""
    choices = result.get("choices")
    if not isinstance(choices, list) or not choices or "error" in result:
        return False
    return all(
        isinstance(c, dict) and isinstance(c.get("message"), dict) and c.get("finish_reason")
        for c in choices
    )


# --- stores -----------------------------------------------------------------------------------


class MemoryStore:
    """An LRU bounded by total bytes and entry count; expired entries go when met."""

    def __init__(self, settings: CacheSettings, metrics: Metrics) -> None:
        self.max_bytes = settings.max_bytes
        self.max_entries = settings.max_entries
        self.metrics = metrics
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0

    async def get(self, key: str, now: float) -> Entry | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= now:
            self._drop(key, "expired")
            self._gauges()
            return None
        self.entries.move_to_end(key)
        return entry

    async def put(self, key: str, entry: Entry) -> None:
        if entry.size > self.max_bytes:
            return  # it would only evict everything, itself included
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        self.entries[key] = entry
        self.bytes += entry.size
        while self.bytes > self.max_bytes or len(self.entries) > self.max_entries:
            oldest = next(iter(self.entries))
            self._drop(oldest, "size" if self.bytes > self.max_bytes else "count")
        self._gauges()

    def _drop(self, key: str, reason: str) -> None:
        entry = self.entries.pop(key)
        self.bytes -= entry.size
        self.metrics.cache_evicted(reason)

    def _gauges(self) -> None:
        self.metrics.cache_size(self.bytes, len(self.entries))

    async def lock(self, key: str, secs: float) -> str | None:
        return ""  # one process: in-process coalescing is the whole story

    async def wait_for(self, key: str, limit: float, now: Callable[[], float]) -> Entry | None:
        return None

    async def unlock(self, key: str, token: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


class RedisStore:
    """Entries in Redis (TTL set there; values zlib'd when large), shared by every replica."""

    def __init__(
        self, redis: Redis, health: RedisHealth, settings: CacheSettings, metrics: Metrics
    ) -> None:
        self.redis = redis
        self.health = health
        self.compress_min = settings.compress_min_bytes
        self.metrics = metrics
        self.down_until = 0.0
        #: SETs and lock releases in flight (awaited at shutdown, never by a request).
        self.tasks: set[asyncio.Task[None]] = set()

    def _up(self) -> bool:
        return time.monotonic() >= self.down_until

    def _failed(self, operation: str, exc: BaseException) -> None:
        self.down_until = time.monotonic() + REDIS_RETRY_SECS
        self.health.failed(f"cache {operation}", exc)
        self.metrics.cache_error(operation)

    @staticmethod
    def encode(entry: Entry, compress_min: int) -> bytes:
        if len(entry.payload) >= compress_min:
            return _HEADER.pack(b"z", entry.stored_at) + zlib.compress(entry.payload, 1)
        return _HEADER.pack(b"j", entry.stored_at) + entry.payload

    @staticmethod
    def decode(raw: bytes) -> Entry | None:
        if len(raw) <= _HEADER.size:
            return None
        flag, stored_at = _HEADER.unpack_from(raw)
        body = raw[_HEADER.size :]
        try:
            payload = zlib.decompress(body) if flag == b"z" else body
        except zlib.error:
            return None
        return Entry(payload, stored_at, math.inf)  # Redis expires it

    async def get(self, key: str, now: float) -> Entry | None:
        if not self._up():
            return None
        try:
            raw = await self.redis.get(_PREFIX + key)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("get", exc)
            return None
        return self.decode(raw) if isinstance(raw, bytes) else None

    async def put(self, key: str, entry: Entry, ttl: float, unlock: bool) -> None:
        """Store in the background (the answer is not held up); with ``unlock``, release this
        replica's lock in the same round trip, after the entry is there (never before: a
        request in between would find neither and call the upstream again)."""
        self._spawn(self._put(key, self.encode(entry, self.compress_min), ttl, unlock))

    async def _put(self, key: str, raw: bytes, ttl: float, unlock: bool) -> None:
        if not self._up():
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(_PREFIX + key, raw, px=max(1, int(ttl * 1000)))
                if unlock:
                    pipe.delete(_PREFIX + "lock:" + key)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("set", exc)

    async def lock(self, key: str, secs: float) -> str | None:
        """A token when this replica leads for ``key`` (or Redis is away), None when another
        replica holds the lock."""
        if not self._up():
            return ""
        token = secrets.token_hex(8)
        try:
            got = await self.redis.set(
                _PREFIX + "lock:" + key, token, nx=True, px=max(1, int(secs * 1000))
            )
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("lock", exc)
            return ""
        return token if got else None

    async def wait_for(self, key: str, limit: float, now: Callable[[], float]) -> Entry | None:
        """Poll for another replica's entry until it appears, its lock goes, or ``limit``."""
        deadline = time.monotonic() + limit
        names = (_PREFIX + key, _PREFIX + "lock:" + key)
        while time.monotonic() < deadline and self._up():
            try:
                raw, held = await self.redis.mget(names)
            except (RedisError, OSError, TimeoutError) as exc:
                self._failed("get", exc)
                return None
            if isinstance(raw, bytes):
                return self.decode(raw)
            if held is None:
                return None
            await asyncio.sleep(POLL_SECS)
        return None

    async def unlock(self, key: str, token: str) -> None:
        if token:
            self._spawn(self._unlock(key))

    async def _unlock(self, key: str) -> None:
        # Best effort: a lock that expired and was taken by another replica meanwhile may be
        # deleted too, which costs at most one more upstream call there.
        if not self._up():
            return
        try:
            await self.redis.delete(_PREFIX + "lock:" + key)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("lock", exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def aclose(self) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=2.0)


# --- the cache --------------------------------------------------------------------------------


class ResponseCache:
    """One per app (process): the store, the in-process flights, the clock."""

    def __init__(
        self,
        settings: CacheSettings,
        metrics: Metrics,
        store: MemoryStore | RedisStore,
        max_wait_secs: float,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.max_wait_secs = max_wait_secs
        #: Key → the leader's future (its entry, or None when it stored nothing).
        self.flights: dict[str, asyncio.Future[Entry | None]] = {}
        #: Wall clock: ages are compared across replicas (tests replace it with a fake).
        self.clock: Callable[[], float] = time.time

    async def lookup(
        self, request: web.Request, ctx: RequestContext, body: dict[str, Any], route: str
    ) -> Lookup | None:
        """Serve a hit (``Lookup.response``), or return the miss's handle, or None (bypass)."""
        settings = self.settings
        enabled, ttl = settings.for_model(ctx.model, route)
        control = parse_cache_control(request.headers.get("Cache-Control"))
        if not enabled or control.no_store or body.get("logprobs"):
            ctx.cache = "bypass"  # logprobs: a replay could not reproduce them
            return None
        if route == SHORTHAND_ROUTE:  # the one-provider shorthand: the model names the answer
            route = str(body.get("model"))
        partition = "*" if settings.scope == "global" else (ctx.key_name or "")
        key = cache_key(partition, route, body)
        lookup = Lookup(self, key, ttl)
        if not control.no_cache:
            try:
                entry = await self.store.get(key, self.clock())
                if entry is None and settings.coalesce:
                    entry = await self._coalesce(lookup, ctx)
                if entry is not None and self._fresh(entry, control):
                    lookup.response = await self.respond(request, ctx, body, entry)
                    return lookup
            except BaseException:
                # Cancelled (the client left) or failed while leading: identical requests
                # must not wait on a flight nobody will finish.
                await lookup.close()
                raise
        ctx.cache = "miss"
        return lookup

    def _fresh(self, entry: Entry, control: CacheControl) -> bool:
        return control.max_age is None or self.clock() - entry.stored_at <= control.max_age

    async def _coalesce(self, lookup: Lookup, ctx: RequestContext) -> Entry | None:
        """Wait for an identical request in flight (here or, with Redis, on another replica),
        or become the leader; the entry it stored, or None: call the upstream."""
        key = lookup.key
        budget = self.max_wait_secs - (time.perf_counter() - ctx.started)
        flight = self.flights.get(key)
        if flight is not None:
            self.metrics.cache_coalesced_request(ctx.model)
            try:
                async with asyncio.timeout(max(budget, 0.0)):
                    return await asyncio.shield(flight)
            except TimeoutError:
                return None
        lookup.flight = asyncio.get_running_loop().create_future()
        self.flights[key] = lookup.flight
        token = await self.store.lock(key, self.settings.lock_secs)
        if token is None:  # another replica is asking the upstream right now
            self.metrics.cache_coalesced_request(ctx.model)
            entry = await self.store.wait_for(
                key, min(self.settings.lock_secs, max(budget, 0.0)), self.clock
            )
            if entry is not None:
                lookup.resolve(entry)  # local waiters share it
            return entry
        lookup.lock_token = token
        return None

    async def respond(
        self, request: web.Request, ctx: RequestContext, body: dict[str, Any], entry: Entry
    ) -> web.StreamResponse:
        """The hit: the stored JSON as it is, or its SSE replay."""
        ctx.cache = "hit"
        age = str(max(0, int(self.clock() - entry.stored_at)))
        headers = {"x-inference-cache": "hit", "age": age}
        completion: dict[str, Any] | None = None
        if self.settings.hits_count_tokens:
            completion = orjson.loads(entry.payload)
            ctx.usage = completion.get("usage")
        if not ctx.stream:
            return web.Response(
                body=entry.payload, content_type="application/json", headers=headers
            )
        if completion is None:
            completion = orjson.loads(entry.payload)
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        response.headers["x-request-id"] = ctx.request_id
        response.headers.update(headers)
        await response.prepare(request)
        ctx.status = 200
        ctx.first_token_secs = time.perf_counter() - ctx.started
        events = replay(completion, body, include_usage=ctx.include_usage)
        try:
            await response.write(b"".join(events) + DONE)  # one write: it is all here
        except (ConnectionResetError, RuntimeError):
            ctx.error_code = "CLIENT_DISCONNECTED"
        ctx.stream_secs = time.perf_counter() - ctx.started - ctx.first_token_secs
        return response

    async def aclose(self) -> None:
        for flight in self.flights.values():
            if not flight.done():
                flight.set_result(None)
        await self.store.aclose()


class Lookup:
    """A request's handle on its cache entry: the hit's response, or how to store the miss."""

    __slots__ = ("cache", "flight", "key", "lock_token", "response", "stored", "ttl")

    def __init__(self, cache: ResponseCache, key: str, ttl: float) -> None:
        self.cache = cache
        self.key = key
        self.ttl = ttl
        #: Set on a hit: the response already made (JSON) or sent (SSE).
        self.response: web.StreamResponse | None = None
        #: The future identical requests wait on, when this request leads.
        self.flight: asyncio.Future[Entry | None] | None = None
        self.lock_token = ""
        self.stored = False

    async def store_json(self, payload: bytes, result: dict[str, Any]) -> None:
        """After a non-streaming attempt: keep a complete, successful answer."""
        if self.response is None and storable(result):
            await self.keep(payload)

    def collector(self) -> StreamCollector | None:
        """What ``streaming.relay`` feeds a streamed miss (None for a hit)."""
        return StreamCollector(self) if self.response is None else None

    async def keep(self, payload: bytes) -> None:
        """Store ``payload`` (a complete answer) and hand it to the waiters."""
        cache = self.cache
        if len(payload) > cache.settings.max_entry_bytes or self.stored:
            return
        self.stored = True
        now = cache.clock()
        entry = Entry(payload, now, now + self.ttl)
        self.resolve(entry)
        store = cache.store
        if isinstance(store, MemoryStore):
            await store.put(self.key, entry)
        else:
            await store.put(self.key, entry, self.ttl, unlock=bool(self.lock_token))
            self.lock_token = ""  # released with the write
        cache.metrics.cache_stored(len(payload))

    def resolve(self, entry: Entry | None) -> None:
        """Wake the waiters with the leader's entry (None: each calls the upstream itself)."""
        flight = self.flight
        if flight is not None:
            self.flight = None
            if self.cache.flights.get(self.key) is flight:
                del self.cache.flights[self.key]
            if not flight.done():
                flight.set_result(entry)

    async def close(self) -> None:
        """At the end of the request, whatever happened: nothing stored → waiters go on."""
        self.resolve(None)
        if self.lock_token:
            token, self.lock_token = self.lock_token, ""
            await self.cache.store.unlock(self.key, token)


class StreamCollector:
    """Assembles a streamed answer into the ``chat.completion`` the cache keeps.

    Only plain answers are kept: content, refusal and tool calls per choice; a chunk with
    logprobs or an unknown delta field makes the answer not storable (its replay would differ).
    """

    __slots__ = ("choices", "head", "left", "lookup", "ok")

    def __init__(self, lookup: Lookup) -> None:
        self.lookup = lookup
        self.head: dict[str, Any] | None = None
        self.choices: dict[int, dict[str, Any]] = {}
        self.ok = True
        #: Characters it may still hold: a longer answer would not be stored anyway, so a
        #: long stream never piles up in memory (cache.max_entry_bytes).
        self.left = lookup.cache.settings.max_entry_bytes

    def observe(self, chunk: ChatChunk) -> None:
        """Follow one chunk; a shape it cannot read makes the answer not storable (never an
        error in the client's stream)."""
        if not self.ok:
            return
        try:
            self._observe(chunk)
        except (AttributeError, TypeError, KeyError):
            self.ok = False
        if not self.ok or self.left < 0:
            self.ok = False
            self.choices.clear()

    def _observe(self, chunk: ChatChunk) -> None:
        if self.head is None and chunk.get("id") is not None:
            self.head = {
                "id": chunk.get("id"),
                "created": chunk.get("created") or int(time.time()),
                "model": chunk.get("model"),
            }
            if chunk.get("system_fingerprint"):
                self.head["system_fingerprint"] = chunk["system_fingerprint"]
        for choice in chunk.get("choices") or ():
            index = choice.get("index") or 0
            if not isinstance(index, int) or choice.get("logprobs"):
                self.ok = False
                return
            state = self.choices.get(index)
            if state is None:
                state = self.choices[index] = {
                    "role": "assistant", "content": [], "refusal": [], "tools": {}, "finish": None,
                }  # fmt: skip
            delta = choice.get("delta") or {}
            for field, value in delta.items():
                if value is None:
                    continue
                if field == "content":
                    self.left -= len(value)
                    state["content"].append(value)
                elif field == "role":
                    state["role"] = value
                elif field == "refusal":
                    self.left -= len(value)
                    state["refusal"].append(value)
                elif field == "tool_calls":
                    self._tools(state["tools"], value)
                else:
                    self.ok = False
                    return
            if choice.get("finish_reason"):
                state["finish"] = choice["finish_reason"]

    def _tools(self, tools: dict[int, dict[str, Any]], calls: Any) -> None:
        for call in calls if isinstance(calls, list) else ():
            index = call.get("index", 0) if isinstance(call, dict) else None
            if not isinstance(index, int):
                self.ok = False
                return
            tool = tools.setdefault(index, {"id": None, "type": "function", "name": [], "args": []})
            if call.get("id"):
                tool["id"] = call["id"]
            if call.get("type"):
                tool["type"] = call["type"]
            function = call.get("function") or {}
            if function.get("name"):
                tool["name"].append(function["name"])
            if function.get("arguments"):
                self.left -= len(function["arguments"])
                tool["args"].append(function["arguments"])

    async def completed(self, usage: dict[str, Any] | None) -> None:
        """The stream ended normally ([DONE] written): store it if it is a whole answer.

        Never raises: the client's stream is complete, nothing may be written after [DONE].
        """
        try:
            await self._completed(usage)
        except Exception:  # noqa: BLE001 (a cache bug must not touch a finished stream)
            logger.exception("response cache: storing a streamed answer failed")

    async def _completed(self, usage: dict[str, Any] | None) -> None:
        if not self.ok or self.head is None or not self.choices:
            return
        choices = []
        for index in sorted(self.choices):
            state = self.choices[index]
            if not state["finish"]:
                return  # ended without saying why: maybe truncated, never stored
            message: dict[str, Any] = {
                "role": state["role"],
                "content": "".join(state["content"]) if state["content"] else None,
            }
            if state["refusal"]:
                message["refusal"] = "".join(state["refusal"])
            if state["tools"]:
                message["tool_calls"] = [
                    {
                        "id": t["id"],
                        "type": t["type"],
                        "function": {"name": "".join(t["name"]), "arguments": "".join(t["args"])},
                    }
                    for _, t in sorted(state["tools"].items())
                ]
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": state["finish"],
                }
            )
        completion = {**self.head, "object": "chat.completion", "choices": choices}
        if usage is not None:
            completion["usage"] = usage
        await self.lookup.keep(orjson.dumps(completion))


def replay(
    completion: dict[str, Any], request: dict[str, Any], *, include_usage: bool
) -> list[bytes]:
    """A stored completion as the SSE events of a stream (without ``[DONE]``): per choice a
    role chunk, content deltas (≤ 4096 characters each), refusal and tool calls, a finish chunk;
    then the usage chunk when asked (the stored usage, else the gateway's estimate)."""
    base: dict[str, Any] = {
        "id": completion.get("id"),
        "object": "chat.completion.chunk",
        "created": completion.get("created") or int(time.time()),
        "model": completion.get("model"),
    }
    if completion.get("system_fingerprint"):
        base["system_fingerprint"] = completion["system_fingerprint"]
    if include_usage:
        base["usage"] = None
    events: list[bytes] = []

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> None:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        events.append(sse_event({**base, "choices": [choice]}))

    for choice in completion.get("choices") or ():
        index = choice.get("index") or 0
        message = choice.get("message") or {}
        chunk(index, {"role": message.get("role") or "assistant", "content": ""})
        content = message.get("content")
        if isinstance(content, str):
            for start in range(0, len(content), REPLAY_PIECE_CHARS):
                chunk(index, {"content": content[start : start + REPLAY_PIECE_CHARS]})
        if message.get("refusal"):
            chunk(index, {"refusal": message["refusal"]})
        tool_calls = message.get("tool_calls")
        if isinstance(tool_calls, list) and tool_calls:
            calls = [{"index": i, **call} for i, call in enumerate(tool_calls)]
            chunk(index, {"tool_calls": calls})
        chunk(index, {}, choice.get("finish_reason") or "stop")
    if include_usage:
        usage = completion.get("usage")
        if not isinstance(usage, dict):
            prompt = estimate_prompt_tokens(request)
            usage = {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}
        events.append(sse_event({**base, "choices": [], "usage": usage}))
    return events


# --- wiring -----------------------------------------------------------------------------------

#: The app's cache, or None when ``cache.enabled`` is false and no model turns it on.
CACHE: web.AppKey[ResponseCache | None] = web.AppKey("cache")


def wanted(settings: CacheSettings) -> bool:
    """Whether any model can use the cache (globally on, or a model's override turns it on)."""
    return settings.enabled or any(m.enabled for m in settings.models.values())


def make_cache(app: web.Application, settings: Settings) -> ResponseCache | None:
    """The cache ``settings`` ask for, or None (start-up, and a hot reload that changed it)."""
    cfg = settings.cache
    if not wanted(cfg):
        return None
    metrics = app[METRICS]
    store: MemoryStore | RedisStore
    redis = app[REDIS]
    if cfg.backend == "redis" and redis is not None:
        store = RedisStore(redis, app[REDIS_HEALTH], cfg, metrics)
    else:
        store = MemoryStore(cfg, metrics)
    logger.info("response cache on ({} backend, scope {})", cfg.backend, cfg.scope)
    return ResponseCache(cfg, metrics, store, settings.routing.max_time_secs)


async def cache_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx (after state_ctx, whose Redis client the redis backend borrows)."""
    cache = make_cache(app, app[SETTINGS])
    app[CACHE] = cache
    yield
    if cache is not None:
        try:
            await cache.aclose()  # pending Redis writes get a moment, waiters are released
        except Exception:  # noqa: BLE001 (shutdown goes on; the cause is logged)
            logger.exception("response cache: closing failed")
