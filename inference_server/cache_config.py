"""The ``cache`` settings section and the per-model overrides, validated before anything binds.

Kept apart from cache.py so settings.py can build it without importing the cache's runtime
(aiohttp, redis); settings.py calls :func:`build_cache_settings` once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from inference_server.providers.base import Setting

S = Setting
_NUM = (int, float)

#: ``cache.*`` in settings.CORE_SCHEMA (defaults equal settings.yaml's).
CACHE_SCHEMA: dict[str, Setting] = {
    "enabled": S((bool,), False, description="exact-match response cache (off: costs nothing)"),
    "backend": S(
        (str,),
        "memory",
        choices=("memory", "redis"),
        description="memory (per process) or redis (state.redis_url: every worker and replica)",
    ),
    "ttl_secs": S(_NUM, 300, gte=0.001, lte=30 * 86400, description="how long an answer is kept"),
    "max_bytes": S(
        (int,), 64 * 1024 * 1024, gte=1024, lte=1 << 40, description="memory: total entry bytes"
    ),
    "max_entries": S((int,), 10_000, gte=1, lte=10_000_000, description="memory: entry count"),
    "max_entry_bytes": S(
        (int,), 1024 * 1024, gte=256, lte=512 * 1024 * 1024, description="larger answers: not kept"
    ),
    "scope": S(
        (str,),
        "key",
        choices=("key", "global"),
        description="key: one partition per API key (tenants never share); global: one for all",
    ),
    "hits_count_tokens": S(
        (bool,),
        False,
        description="a hit's usage counts toward token budgets and token metrics",
    ),
    "coalesce": S((bool,), True, description="identical concurrent misses: one upstream call"),
    "lock_secs": S(
        _NUM,
        10,
        gte=0.01,
        lte=600,
        description="redis: another replica's lock on a key is waited on this long at most",
    ),
    "compress_min_bytes": S(
        (int,), 1024, gte=0, lte=1 << 30, description="redis: values this large are zlib'd"
    ),
}
#: ``models.<name>.cache``: overrides for one public model name (or alias).
MODEL_CACHE_SCHEMA: dict[str, Setting] = {
    "enabled": S((bool,), None, nullable=True),
    "ttl_secs": S(_NUM, None, gte=0.001, lte=30 * 86400, nullable=True),
}


@dataclass(frozen=True, slots=True)
class ModelCache:
    """One model's override: enabled and TTL (None: the global value)."""

    enabled: bool | None = None
    ttl_secs: float | None = None


@dataclass(frozen=True, slots=True)
class CacheSettings:
    enabled: bool = False
    backend: str = "memory"
    ttl_secs: float = 300.0
    max_bytes: int = 64 * 1024 * 1024
    max_entries: int = 10_000
    max_entry_bytes: int = 1024 * 1024
    scope: str = "key"
    hits_count_tokens: bool = False
    coalesce: bool = True
    lock_secs: float = 10.0
    compress_min_bytes: int = 1024
    #: Public model name (or alias) → override.
    models: Mapping[str, ModelCache] = field(default_factory=dict)

    def for_model(self, *names: str | None) -> tuple[bool, float]:
        """(enabled, ttl) for the first of ``names`` with an override, else the globals."""
        if not self.models:
            return self.enabled, self.ttl_secs
        for name in names:
            if name is not None:
                override = self.models.get(name)
                if override is not None:
                    enabled = self.enabled if override.enabled is None else override.enabled
                    ttl = self.ttl_secs if override.ttl_secs is None else override.ttl_secs
                    return enabled, ttl
        return self.enabled, self.ttl_secs


def build_cache_settings(
    tree: Mapping[str, Any],
    models: Mapping[str, Any],
    state_backend: str,
    problems: list[str],
) -> CacheSettings:
    """The ``cache`` section (values already checked against CACHE_SCHEMA) and every
    ``models.<name>.cache`` (checked here)."""
    from inference_server.settings import check_tree

    overrides: dict[str, ModelCache] = {}
    for name, entry in models.items():
        raw = entry.get("cache") if isinstance(entry, Mapping) else None
        if raw is None:
            continue
        path = f"models.{name}.cache"
        if not isinstance(raw, Mapping):
            problems.append(f"{path}: must be a mapping (enabled, ttl_secs)")
            continue
        check_tree(raw, MODEL_CACHE_SCHEMA, f"{path}.", problems)
        enabled, ttl = raw.get("enabled"), raw.get("ttl_secs")
        overrides[str(name)] = ModelCache(
            enabled=enabled if isinstance(enabled, bool) else None,
            ttl_secs=float(ttl) if isinstance(ttl, _NUM) and not isinstance(ttl, bool) else None,
        )
    if tree["backend"] == "redis" and state_backend != "redis":
        problems.append(
            "cache.backend: redis needs state.backend: redis (and state.redis_url), whose one "
            "Redis client the cache shares"
        )
    return CacheSettings(
        enabled=bool(tree["enabled"]),
        backend=str(tree["backend"]),
        ttl_secs=float(tree["ttl_secs"]),
        max_bytes=int(tree["max_bytes"]),
        max_entries=int(tree["max_entries"]),
        max_entry_bytes=int(tree["max_entry_bytes"]),
        scope=str(tree["scope"]),
        hits_count_tokens=bool(tree["hits_count_tokens"]),
        coalesce=bool(tree["coalesce"]),
        lock_secs=float(tree["lock_secs"]),
        compress_min_bytes=int(tree["compress_min_bytes"]),
        models=overrides,
    )
