"""The request path's own Redis connection (redis_link.py) against a real redis-server."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import hiredis
import pytest
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from inference_server.limits import RedisLimiter, Scope, compile_plan
from inference_server.redis_link import RedisLink, Script, parse_url
from inference_server.tenancy_config import Limit
from tests.support.redis_server import RedisServer

ECHO = Script("return {KEYS[1], ARGV[1]}")


@pytest.fixture
async def link(redis_server: RedisServer) -> AsyncIterator[RedisLink]:
    made = RedisLink.from_url(redis_server.url, timeout=2.0)
    assert made is not None
    yield made
    await made.close()


def test_parse_url_forms() -> None:
    t = parse_url("redis://user:p%40ss@example.com:6380/3")
    assert t is not None
    assert (t.host, t.port, t.db, t.username, t.password, t.tls) == (
        "example.com",
        6380,
        3,
        "user",
        "p@ss",
        None,
    )
    t = parse_url("redis://:secret@127.0.0.1")
    assert t is not None
    assert (t.port, t.db, t.username, t.password) == (6379, 0, None, "secret")
    t = parse_url("rediss://h:1/0?ssl_cert_reqs=none")
    assert t is not None
    assert t.tls is not None
    assert t.tls.verify_mode == ssl.CERT_NONE
    t = parse_url("rediss://h:1/0")
    assert t is not None
    assert t.tls is not None
    assert t.tls.verify_mode == ssl.CERT_REQUIRED
    t = parse_url("unix:///run/redis.sock?db=2")
    assert t is not None
    assert (t.path, t.db) == ("/run/redis.sock", 2)
    # Options the link does not implement: declined (the redis.asyncio client is used).
    assert parse_url("redis://h:1/0?socket_keepalive=true") is None
    assert parse_url("rediss://h:1/0?ssl_cert_reqs=maybe") is None
    assert parse_url("memcached://h:1") is None
    assert parse_url("redis://h:port/0") is None
    assert RedisLink.from_url(None, 1.0) is None


async def test_evalsha_reloads_after_noscript(link: RedisLink, redis_server: RedisServer) -> None:
    assert await link.evalsha(ECHO, ("k",), ("a",)) == [b"k", b"a"]
    assert await link.call("SCRIPT", "FLUSH") == b"OK"  # what a restarted Redis looks like
    assert await link.evalsha(ECHO, ("k2",), (7,)) == [b"k2", b"7"]
    with pytest.raises(ResponseError):
        await link.evalsha(Script("return redis.call('NOSUCHCOMMAND')"), (), ())


async def test_concurrent_calls_each_get_their_own_reply(link: RedisLink) -> None:
    replies = await asyncio.gather(*(link.evalsha(ECHO, (f"k{i}",), (i,)) for i in range(200)))
    assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(200)]


async def test_a_cancelled_caller_keeps_the_order(link: RedisLink) -> None:
    await link.call("PING")
    slow = asyncio.ensure_future(link.call("EVAL", "local t = redis.call('TIME') return 1", 0))
    await asyncio.sleep(0)  # written, not answered yet
    slow.cancel()
    assert await link.call("ECHO", "mine") == b"mine"
    with contextlib.suppress(asyncio.CancelledError):
        await slow


async def test_redis_killed_then_back(link: RedisLink, redis_server: RedisServer) -> None:
    assert await link.call("SET", "x", "1") == b"OK"
    redis_server.stop()
    for _ in range(2):  # the lost connection, then a refused reconnect: errors, never a hang
        with pytest.raises((RedisError, OSError, TimeoutError)):
            await link.call("GET", "x")
    redis_server.start()
    assert await link.call("PING") == b"PONG"


async def test_password_and_db(redis_server: RedisServer) -> None:
    admin = RedisLink.from_url(redis_server.url, timeout=2.0)
    assert admin is not None
    await admin.call("CONFIG", "SET", "requirepass", "s3cret")
    await admin.close()
    base = redis_server.url.rsplit("/", 1)[0].replace("redis://", "redis://:s3cret@")
    good = RedisLink.from_url(f"{base}/2", timeout=2.0)
    bad = RedisLink.from_url(base.replace("s3cret", "wrong") + "/2", timeout=2.0)
    assert good is not None
    assert bad is not None
    try:
        assert await good.call("SET", "in-db-2", "1") == b"OK"
        client = Redis.from_url(f"{base}/2")
        assert await client.get("in-db-2") == b"1"
        await client.aclose()
        with pytest.raises(AuthenticationError):
            await bad.call("PING")
    finally:
        await good.close()
        await bad.close()


@contextlib.asynccontextmanager
async def scripted_server(
    answer: Callable[[int, bytes], bytes | None], timeout: float
) -> AsyncIterator[tuple[RedisLink, list[asyncio.StreamWriter]]]:
    """A stand-in for Redis on a free port: each read of a command is answered with
    ``answer(connection number, data)``, or the connection is closed when that is None.
    Yields a link to it and its connections (one writer each)."""
    writers: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        number = len(writers)
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1 << 16):
                reply = answer(number, data)
                if reply is None:
                    break
                writer.write(reply)
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    link = RedisLink.from_url(f"redis://127.0.0.1:{port}/0", timeout=timeout)
    assert link is not None
    try:
        yield link, writers
    finally:
        await link.close()
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await server.wait_closed()


async def test_a_silent_server_times_out_and_the_link_reconnects() -> None:
    """Redis accepts but never answers: the call fails within the timeout; the next call
    opens a new connection (the old one is not trusted again)."""
    async with scripted_server(lambda n, data: b"", timeout=0.1) as (link, writers):
        for expected in (1, 2):
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TimeoutError):
                await link.call("PING")
            assert loop.time() - started < 1.0
            assert len(writers) == expected


async def test_link_and_client_enforce_one_exact_limit(
    link: RedisLink, redis_server: RedisServer
) -> None:
    """The admission over the link and over redis.asyncio (the fallback) share one state."""
    client = Redis.from_url(redis_server.url)
    plan = compile_plan([Scope("key:k", Limit(rpm=5, tpm=1000, max_parallel=10))])
    fast, slow = RedisLimiter(client, link), RedisLimiter(client)
    try:
        decisions = [
            await (fast if i % 2 else slow).admit(plan, 10, None, f"m{i}") for i in range(7)
        ]
        assert [d.ok for d in decisions] == [True] * 5 + [False] * 2
        assert decisions[-1].reason == "rpm"
        assert decisions[4].requests is not None
        assert decisions[4].requests.remaining == 0
        for i, d in enumerate(decisions[:5]):
            (fast if i % 2 else slow).settle(plan, -5, d.slots, f"m{i}")
        await fast.flush()
        await slow.flush()
        assert await client.zcard(plan.slots[0][0]) == 0
    finally:
        await client.aclose()


async def test_slots_full_purges_dead_holders_and_rolls_back(
    link: RedisLink, redis_server: RedisServer
) -> None:
    """A full concurrency set first drops slots whose holder died (expired score); a request
    refused on one scope leaves no slot held in the scopes checked before it."""
    client = Redis.from_url(redis_server.url)
    wide, narrow = Limit(max_parallel=10), Limit(max_parallel=1)
    plan = compile_plan([Scope("global", wide), Scope("key:k", narrow)])
    limiter = RedisLimiter(client, link)
    global_key, key_key = (k for k, _ in plan.slots)
    try:
        await client.zadd(key_key, {"dead-process:1": 1})  # expired long ago
        first = await limiter.admit(plan, 1, None, "a")
        assert first.ok
        assert await client.zrange(key_key, 0, -1) == [b"a"]
        second = await limiter.admit(plan, 1, None, "b")
        assert not second.ok
        assert second.reason == "max_parallel"
        assert await client.zrange(global_key, 0, -1) == [b"a"]  # "b" rolled back
    finally:
        await client.aclose()


async def test_packed_admission_is_the_same_command_as_hiredis_packs() -> None:
    """What RedisLimiter.admit sends (the plan's pre-packed parts plus the request's own) is
    byte for byte the command ``hiredis.pack_command`` makes of the whole argument list."""
    sent: list[bytes] = []

    class Capture:
        async def run(self, script: Script, count: int, body: bytes) -> list[int]:
            sent.append(b"*%d\r\n" % (count + 2) + script.evalsha_head + body)
            return [0, 0, 1_000_000, 0] + [1_000_000] * len(plan.gcra)

    plan = compile_plan(
        [Scope("global", Limit(rpm=10, tpm=1000, max_parallel=3)), Scope("key:k", Limit(rpm=5))]
    )
    limiter = RedisLimiter(Redis(), cast(RedisLink, Capture()))
    sha = limiter.admit_script.sha
    await limiter.admit(plan, 100, None, "123:4")
    await limiter.admit(plan, 100, ("isv:spent:k:2026-11", 10**15), "123:5")
    keys, spent = plan.keys, "isv:spent:k:2026-11"
    assert sent == [
        packed("EVALSHA", sha, len(keys), *keys, 100, "123:4", -1, *plan.argv),
        packed("EVALSHA", sha, len(keys) + 1, *keys, spent, 100, "123:5", 10**15, *plan.argv),
    ]


def packed(*args: Any) -> bytes:
    return bytes(hiredis.pack_command(args))


async def test_a_connection_closed_while_idle_is_replaced_transparently() -> None:
    """The connection was closed (by Redis or a proxy) and the link finds out only when it
    sends: the command goes once more on a new connection and is answered, not failed (with
    state.on_error deny it would have been a 503)."""
    commands: list[int] = []

    def answer(number: int, data: bytes) -> bytes | None:
        commands.append(number)
        if commands == [1, 1]:  # the first connection dies at its second command
            return None
        return b"+PONG\r\n"

    async with scripted_server(answer, timeout=2.0) as (link, writers):
        assert await link.call("PING") == b"PONG"
        assert await link.call("PING") == b"PONG"
        assert len(writers) == 2
        assert commands == [1, 1, 2]
