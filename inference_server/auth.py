"""API keys: static ones from settings and virtual ones made through the admin API.

A key is only ever held as its SHA-256: the presented bearer token is hashed once and looked up
by digest (the lookup leaks nothing about the key: a digest reveals nothing about its preimage),
then the digests are compared with ``hmac.compare_digest``.  Logs, spans, metrics and the admin
API name a key by its name and short id (``key_`` + 12 hex digits of the digest), never the key.

Virtual keys live in the state backend: in this process with ``memory`` (gone at restart), in
Redis with ``redis`` (hash ``isv:vkeys``: id → JSON, and a version counter ``isv:vkeys:ver``
bumped by every change).  Each process keeps a copy and re-reads it when the version moved,
checked every ``auth.key_refresh_secs`` (0.25 s): a deleted or disabled key stops working on
every worker and replica within about that, with no Redis read on the request path.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Iterable
from fnmatch import fnmatchcase

import orjson
from redis.asyncio import Redis

from inference_server.errors import InvalidApiKey, ModelNotAllowedForKey
from inference_server.limits import PREFIX
from inference_server.tenancy_config import KeySpec

VKEYS = f"{PREFIX}vkeys"
VKEYS_VERSION = f"{PREFIX}vkeys:ver"
#: A bearer token longer than this is not a key of ours (and is never hashed).
MAX_KEY_CHARS = 512
#: Virtual keys a deployment may hold (each is a small JSON value).
MAX_VIRTUAL_KEYS = 100_000


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(header: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (bounded), else None."""
    if not header or len(header) > MAX_KEY_CHARS + 7:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def check_model(key: KeySpec, model: str) -> None:
    """403 when the key has a model list and ``model`` matches none of its names/patterns."""
    if key.models and not any(fnmatchcase(model, pattern) for pattern in key.models):
        raise ModelNotAllowedForKey(
            f"The API key '{key.name}' may not use model '{model[:100]}'", param="model"
        )


class KeyStore:
    """Every key this process accepts, by digest; virtual ones mirrored from the backend."""

    def __init__(self, static: Iterable[KeySpec], redis: Redis | None) -> None:
        self.static = {k.key_sha256: k for k in static}
        self.virtual: dict[str, KeySpec] = {}
        self.redis = redis
        self.version: bytes | str | None = None
        #: Called with every virtual key name loaded (metrics bounds its labels with it).
        self.on_names: Callable[[Iterable[str]], None] | None = None

    # --- the request path ----------------------------------------------------------------

    def authenticate(self, header: str | None, now: float | None = None) -> KeySpec:
        """The key of an ``Authorization`` header, or 401 ``INVALID_API_KEY``."""
        # bearer() and digest(), inline: every keyed request comes through here.
        token: str | None = None
        if header and len(header) <= MAX_KEY_CHARS + 7:
            scheme, _, token = header.partition(" ")
            token = token.strip() if scheme.lower() == "bearer" else None
        if not token:
            raise InvalidApiKey(
                "Missing API key: send 'Authorization: Bearer <key>'"
                if not header
                else "Malformed Authorization header: expected 'Bearer <key>'"
            )
        d = hashlib.sha256(token.encode()).hexdigest()
        spec = self.static.get(d) or self.virtual.get(d)
        if spec is None or not hmac.compare_digest(spec.key_sha256, d):
            raise InvalidApiKey("Incorrect API key provided")
        if spec.disabled:
            raise InvalidApiKey(f"The API key '{spec.name}' ({spec.id}) is disabled")
        if spec.expires_at is not None and (now or time.time()) >= spec.expires_at:
            raise InvalidApiKey(f"The API key '{spec.name}' ({spec.id}) has expired")
        return spec

    # --- lookups for the admin API -------------------------------------------------------

    def all(self) -> list[KeySpec]:
        return [*self.static.values(), *self.virtual.values()]

    def by_id(self, key_id: str) -> KeySpec | None:
        return next((k for k in self.all() if k.id == key_id), None)

    # --- changes (admin API) -------------------------------------------------------------

    async def put(self, spec: KeySpec) -> None:
        """Create or replace a virtual key (every process sees it within a refresh)."""
        if self.redis is not None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(VKEYS, spec.id, orjson.dumps(spec.to_json()))
                pipe.incr(VKEYS_VERSION)
                await pipe.execute()
        self.virtual[spec.key_sha256] = spec
        self._named([spec.name])

    async def delete(self, spec: KeySpec) -> None:
        if self.redis is not None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hdel(VKEYS, spec.id)
                pipe.incr(VKEYS_VERSION)
                await pipe.execute()
        self.virtual.pop(spec.key_sha256, None)

    # --- mirroring -----------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Re-read the virtual keys if their version moved (one GET otherwise)."""
        if self.redis is None:
            return False
        version = await self.redis.get(VKEYS_VERSION)
        if version == self.version and self.version is not None:
            return False
        raw = await self.redis.hgetall(VKEYS)
        keys: dict[str, KeySpec] = {}
        for value in list(raw.values())[:MAX_VIRTUAL_KEYS]:
            try:
                spec = KeySpec.from_json(orjson.loads(value))
            except (ValueError, KeyError, TypeError):
                continue  # a damaged entry is skipped, not fatal
            keys[spec.key_sha256] = spec
        self.virtual = keys
        self.version = version if version is not None else b"0"
        self._named(k.name for k in keys.values())
        return True

    async def run(
        self,
        every_secs: float,
        on_error: Callable[[str, BaseException], None],
        pause: Callable[[float], Awaitable[bool]],
    ) -> None:
        """Refresh every ``every_secs`` until ``pause`` says stop."""
        while not await pause(every_secs):
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 (Redis away: keep the last copy, retry)
                on_error("virtual keys", exc)

    def _named(self, names: Iterable[str]) -> None:
        if self.on_names is not None:
            self.on_names(names)
