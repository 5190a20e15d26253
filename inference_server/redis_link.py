"""One lean, pipelined Redis connection for the scripts on the request path (rate limits).

Why not the ``redis.asyncio`` client here: on loopback its per-command cost (connection pool
checkout and release, command packing in Python, a timeout context and a stream read per
reply) is ~30 µs of CPU per call, about three times this module's (~10 µs for a PING, most of
it the two system calls: ``hiredis`` packs the command and parses the reply in C, one
``asyncio.Protocol`` feeds every reply to the caller waiting for it).  The admission is on every keyed request's path, so that difference is most of
what Redis added to a request.  Everything else (usage ledger, virtual keys, admin API, cache)
keeps the ``redis.asyncio`` client of :mod:`inference_server.state`.

The link is one connection, shared by every concurrent caller: commands are written in order
and Redis answers in order, so each reply goes to the oldest waiter (a caller that gave up —
timed out or cancelled — still has its reply consumed and dropped, so the order holds).  It
connects on first use and again after the connection is lost; a call that does not get its
reply within ``timeout`` raises ``TimeoutError`` and drops the connection (a wedged Redis is
not waited on again).  Failures raise ``redis.exceptions`` errors, ``OSError`` or
``TimeoutError``, exactly what callers already handle for the ``redis.asyncio`` client
(``state.on_error`` applies).

Supported URLs (``state.redis_url``): ``redis://[[user]:password@]host[:port][/db]``,
``rediss://`` (TLS; ``?ssl_cert_reqs=none|optional|required`` and ``?ssl_ca_certs=<file>``)
and ``unix:///path?db=N``.  Anything else :func:`parse_url` declines, and the caller keeps the
``redis.asyncio`` client.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

#: Query parameters :func:`parse_url` understands (any other: the URL is declined).
URL_PARAMS = frozenset({"db", "ssl_cert_reqs", "ssl_ca_certs"})
#: hiredis' "no complete reply yet" marker (a sentinel, so no reply is mistaken for it).
_MORE = object()


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to connect (from ``state.redis_url``)."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None


def parse_url(url: str) -> Target | None:
    """The :class:`Target` of a Redis URL, or None when it uses options this link lacks."""
    try:
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if not set(query) <= URL_PARAMS:
            return None
        db = int(query.get("db") or (parts.path.lstrip("/") if parts.scheme != "unix" else "") or 0)
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if parts.scheme == "unix":
            return Target(path=parts.path, db=db, username=username, password=password)
        if parts.scheme not in ("redis", "rediss"):
            return None
        tls = None
        if parts.scheme == "rediss":
            tls = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
            reqs = query.get("ssl_cert_reqs", "required")
            if reqs in ("none", "optional"):
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE if reqs == "none" else ssl.CERT_OPTIONAL
            elif reqs != "required":
                return None
        return Target(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=db,
            username=username,
            password=password,
            tls=tls,
        )
    except (ValueError, OSError):
        return None


def pack(items: Iterable[str | int | bytes]) -> bytes:
    """``items`` as RESP bulk strings, without the array header: the parts of a command that
    never change can be packed once (:meth:`RedisLink.run`)."""
    out = []
    for item in items:
        data = item if isinstance(item, bytes) else str(item).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Script:
    """A Lua script called by its SHA-1 (``EVALSHA``), loaded again after ``NOSCRIPT``."""

    __slots__ = ("eval_head", "evalsha_head", "sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        self.evalsha_head = pack(("EVALSHA", self.sha))
        self.eval_head = pack(("EVAL", source))


class _Protocol(asyncio.Protocol):
    """Replies, in order, to the futures waiting for them."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(notEnoughData=_MORE)
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports implement the interface without subclassing asyncio's)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiters = self.waiters
        try:
            while (reply := reader.gets()) is not _MORE:
                if not waiters:  # a reply nobody asked for: the stream is not ours any more
                    raise hiredis.ProtocolError("unexpected reply")
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(reply)
        except hiredis.ProtocolError:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        waiters, self.waiters = self.waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(RedisConnectionError("Connection to Redis lost"))

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()


class RedisLink:
    """One pipelined connection; :meth:`evalsha` is the request path's only call."""

    def __init__(self, target: Target, timeout: float) -> None:
        self.target = target
        self.timeout = timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._closed = False

    @classmethod
    def from_url(cls, url: str | None, timeout: float) -> RedisLink | None:
        target = parse_url(url) if url else None
        return cls(target, timeout) if target is not None else None

    async def evalsha(self, script: Script, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        """Run ``script`` on ``keys`` and ``args``."""
        return await self.run(script, 1 + len(keys) + len(args), pack((len(keys), *keys, *args)))

    async def run(self, script: Script, count: int, body: bytes) -> Any:
        """Run ``script`` with ``body``: its ``count`` arguments (numkeys, keys, args) as
        :func:`pack` makes them.  ``EVALSHA``; after ``NOSCRIPT`` (a restarted or flushed
        Redis), ``EVAL`` loads it again.  An error reply raises ``ResponseError``."""
        header = b"*%d\r\n" % (count + 2)
        reply = await self.send(header + script.evalsha_head + body)
        if isinstance(reply, hiredis.ReplyError):
            if str(reply).startswith("NOSCRIPT"):
                reply = await self.send(header + script.eval_head + body)
                if not isinstance(reply, hiredis.ReplyError):
                    return reply
            raise ResponseError(str(reply))
        return reply

    async def call(self, *args: Any) -> Any:
        """Send one command and wait (at most ``timeout``) for its reply (an error reply is
        returned as ``hiredis.ReplyError``, not raised)."""
        return await self.send(hiredis.pack_command(args))

    async def send(self, command: bytes) -> Any:
        """Send one packed command and wait (at most ``timeout``) for its reply.

        A connection found gone (closed by Redis or a proxy while idle) is replaced and the
        command sent once more: at worst a script whose reply was lost runs twice (for an
        admission, a conservative double count, never an extra admission).  A fresh
        connection that fails, and a timeout, are not retried."""
        reused = self._proto
        if reused is not None and not reused.lost:
            try:
                return await self._wait(reused, _send(reused, command))
            except RedisConnectionError:
                pass
        proto = await self._connect()
        return await self._wait(proto, _send(proto, command))

    async def _wait(self, proto: _Protocol, waiter: asyncio.Future[Any]) -> Any:
        timer = asyncio.get_running_loop().call_later(self.timeout, _expire, waiter)
        try:
            return await waiter
        except TimeoutError:
            # Redis did not answer in time: this connection is not trusted again.
            if self._proto is proto:
                self._proto = None
            proto.close()
            raise
        finally:
            timer.cancel()

    async def _connect(self) -> _Protocol:
        if self._closed:
            raise RedisConnectionError("The Redis link is closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            # read its outcome even when every caller left (no "exception never retrieved")
            self._connecting.add_done_callback(_outcome)
        connecting = self._connecting
        try:
            # shield: a caller cancelled while connecting does not cancel the others' connect
            return await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None

    async def _open(self) -> _Protocol:
        t = self.target
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeout):
            if t.path is not None:
                _, proto = await loop.create_unix_connection(_Protocol, t.path)
            else:
                _, proto = await loop.create_connection(
                    _Protocol,
                    t.host,
                    t.port,
                    ssl=t.tls,
                    server_hostname=t.host if t.tls is not None else None,
                )
        waiters: list[asyncio.Future[Any]] = []
        try:
            # The hello commands are written before the link is handed to any caller, so
            # nothing can run on the connection before it is authenticated and on its db.
            hello: list[tuple[Any, ...]] = []
            if t.password is not None:
                hello.append(
                    ("AUTH", t.username, t.password) if t.username else ("AUTH", t.password)
                )
            if t.db:
                hello.append(("SELECT", t.db))
            waiters = [_send(proto, hiredis.pack_command(command)) for command in hello]
            for command, waiter in zip(hello, waiters, strict=True):
                reply = await self._wait(proto, waiter)
                if isinstance(reply, hiredis.ReplyError):
                    error = AuthenticationError if command[0] == "AUTH" else ResponseError
                    raise error(str(reply))
        except BaseException:
            for waiter in waiters:
                waiter.cancel()  # nobody will read them (no "exception never retrieved")
            proto.close()
            raise
        if self._closed:  # closed while connecting
            proto.close()
            raise RedisConnectionError("The Redis link is closed")
        self._proto = proto
        return proto

    async def close(self) -> None:
        """Close the connection (callers waiting get a connection error)."""
        self._closed = True
        proto, self._proto = self._proto, None
        if proto is not None:
            proto.close()


def _send(proto: _Protocol, command: bytes) -> asyncio.Future[Any]:
    """Write one command; the returned future gets its reply (in the connection's order)."""
    if proto.lost or proto.transport is None:
        raise RedisConnectionError("Connection to Redis lost")
    waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    proto.waiters.append(waiter)
    proto.transport.write(command)
    return waiter


def _outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("Redis did not answer in time"))
