"""The ``auth``, ``limits``, ``usage`` and ``server.cors`` settings as frozen, typed values.

Kept apart from ``auth.py`` / ``limits.py`` so that ``settings.py`` can build these without
importing anything of the running app (those modules import the app's keys, which import
settings).  Every problem is appended to ``problems`` with its key's path, like the rest of the
settings, so a bad key table fails start-up before anything binds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: Key names end up in logs, metric labels and admin listings: keep them short and plain.
KEY_NAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,64}$")
PERIODS = ("day", "month")
LIMIT_FIELDS = ("rpm", "tpm", "max_parallel")
#: Upper bound of any single limit value (per minute / concurrent): far above any real use.
MAX_LIMIT = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Limit:
    """Requests per minute, tokens per minute, concurrent requests; None: unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None

    def __bool__(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.max_parallel is not None

    def divided(self, n: int) -> Limit:
        """Each of ``n`` workers' share (at least 1): memory limits under ``--workers``."""
        if n <= 1:
            return self

        def part(v: int | None) -> int | None:
            return None if v is None else max(1, v // n)

        return Limit(part(self.rpm), part(self.tpm), part(self.max_parallel))


@dataclass(frozen=True, slots=True)
class Budget:
    """At most ``tokens`` (prompt + completion) per calendar ``period`` (UTC)."""

    tokens: int
    period: str = "day"


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One API key: who it is, what it may use and how much (the key itself only as a hash)."""

    #: Short public id ("key_" + 12 hex of the hash): names the key in the admin API.
    id: str
    name: str
    key_sha256: str = field(repr=False)
    models: tuple[str, ...] = ()
    limit: Limit = field(default_factory=Limit)
    budget: Budget | None = None
    #: Unix seconds after which the key stops working (None: never).
    expires_at: float | None = None
    disabled: bool = False
    #: Made through the admin API (stored in the state backend), not read from settings.
    virtual: bool = False
    created_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """What the state backend stores (the hash, never the key)."""
        return {
            "id": self.id,
            "name": self.name,
            "key_sha256": self.key_sha256,
            "models": list(self.models),
            "rpm": self.limit.rpm,
            "tpm": self.limit.tpm,
            "max_parallel": self.limit.max_parallel,
            "budget": None
            if self.budget is None
            else {"tokens": self.budget.tokens, "period": self.budget.period},
            "expires_at": self.expires_at,
            "disabled": self.disabled,
            "virtual": self.virtual,
            "created_at": self.created_at,
        }

    def public(self) -> dict[str, Any]:
        """What the admin API shows: everything but the hash."""
        out = self.to_json()
        del out["key_sha256"]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeySpec:
        budget = data.get("budget")
        return cls(
            id=str(data["id"]),
            name=str(data["name"]),
            key_sha256=str(data["key_sha256"]),
            models=tuple(str(m) for m in data.get("models") or ()),
            limit=Limit(data.get("rpm"), data.get("tpm"), data.get("max_parallel")),
            budget=Budget(int(budget["tokens"]), str(budget.get("period", "day")))
            if isinstance(budget, Mapping)
            else None,
            expires_at=data.get("expires_at"),
            disabled=bool(data.get("disabled")),
            virtual=bool(data.get("virtual", True)),
            created_at=float(data.get("created_at") or 0.0),
        )


def key_id(key_sha256: str) -> str:
    return "key_" + key_sha256[:12]


@dataclass(frozen=True, slots=True)
class TenancySettings:
    """auth + limits + usage + CORS, validated."""

    auth_enabled: bool = False
    keys: tuple[KeySpec, ...] = ()
    global_limit: Limit = field(default_factory=Limit)
    model_limits: Mapping[str, Limit] = field(default_factory=dict)
    default_key_limit: Limit = field(default_factory=Limit)
    #: Completion tokens reserved when a request has no ``max_tokens``.
    default_max_tokens: int = 256
    #: Ledger flush interval: a budget may overshoot by what is spent within one interval.
    flush_secs: float = 1.0
    #: How often each process re-reads the virtual keys' version from Redis.
    key_refresh_secs: float = 0.25
    cors_origins: tuple[str, ...] = ()

    @property
    def limits_on(self) -> bool:
        return bool(
            self.global_limit
            or self.model_limits
            or self.default_key_limit
            or any(k.limit or k.budget for k in self.keys)
        )

    @property
    def active(self) -> bool:
        """Does the request path need the admission step at all?  (False: zero cost.)"""
        return self.auth_enabled or self.limits_on


def parse_limit(tree: Any, path: str, problems: list[str]) -> Limit:
    if tree is None:
        return Limit()
    if not isinstance(tree, Mapping):
        problems.append(f"{path}: must be a mapping with rpm, tpm, max_parallel")
        return Limit()
    values: dict[str, int | None] = {}
    for key, value in tree.items():
        if key not in LIMIT_FIELDS:
            problems.append(f"{path}.{key}: unknown key (limits are {', '.join(LIMIT_FIELDS)})")
            continue
        if value is None:
            values[key] = None
        elif isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
            problems.append(
                f"{path}.{key}: must be an integer from 1 to {MAX_LIMIT}, got {value!r}"
            )
        else:
            values[key] = value
    return Limit(values.get("rpm"), values.get("tpm"), values.get("max_parallel"))


def parse_budget(tree: Any, path: str, problems: list[str]) -> Budget | None:
    if tree is None:
        return None
    if not isinstance(tree, Mapping):
        problems.append(f"{path}: must be a mapping {{tokens: N, period: day|month}}")
        return None
    unknown = set(tree) - {"tokens", "period"}
    if unknown:
        problems.append(f"{path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    tokens = tree.get("tokens")
    period = tree.get("period", "day")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= 10**15:
        problems.append(f"{path}.tokens: must be a positive integer, got {tokens!r}")
        return None
    if period not in PERIODS:
        problems.append(f"{path}.period: must be one of day, month, got {period!r}")
        return None
    return Budget(tokens, period)


def parse_models(value: Any, path: str, problems: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        problems.append(f"{path}: must be a list of model names or patterns (fnmatch)")
        return ()
    if len(value) > 1000 or any(len(m) > 256 for m in value):
        problems.append(f"{path}: at most 1000 names of at most 256 characters")
        return ()
    return tuple(value)


_KEY_FIELDS = {"key_sha256", "key", "models", "budget", *LIMIT_FIELDS}


def parse_static_key(name: str, tree: Any, problems: list[str]) -> KeySpec | None:
    """``auth.keys.<name>``: ``key_sha256`` (hex) or ``key`` (already resolved from
    ``@secret NAME``), ``models``, limits, ``budget``."""
    import hashlib

    path = f"auth.keys.{name}"
    if not KEY_NAME.match(name):
        problems.append(f"{path}: a key name is 1-64 letters, digits or _.:@-")
        return None
    if not isinstance(tree, Mapping):
        problems.append(f"{path}: must be a mapping")
        return None
    for key in tree:
        if key not in _KEY_FIELDS:
            problems.append(f"{path}.{key}: unknown key (known: {', '.join(sorted(_KEY_FIELDS))})")
    digest = tree.get("key_sha256")
    plain = tree.get("key")
    if (digest is None) == (plain is None):
        problems.append(
            f"{path}: set exactly one of key_sha256 (hex SHA-256) or key (@secret NAME)"
        )
        return None
    if digest is not None:
        if not isinstance(digest, str) or not _HEX64.match(digest.lower()):
            problems.append(f"{path}.key_sha256: must be 64 hex digits (sha256sum of the key)")
            return None
        digest = digest.lower()
    else:
        if not isinstance(plain, str) or len(plain) < 16:
            problems.append(f"{path}.key: must be a string of at least 16 characters")
            return None
        digest = hashlib.sha256(plain.encode()).hexdigest()
    return KeySpec(
        id=key_id(digest),
        name=name,
        key_sha256=digest,
        models=parse_models(tree.get("models"), f"{path}.models", problems),
        limit=parse_limit({k: tree[k] for k in LIMIT_FIELDS if k in tree}, path, problems),
        budget=parse_budget(tree.get("budget"), f"{path}.budget", problems),
    )


def build_tenancy(tree: Mapping[str, Any], problems: list[str]) -> TenancySettings:
    """``tree`` is the whole resolved settings tree (secrets already substituted)."""
    auth = tree.get("auth") or {}
    limits = tree.get("limits") or {}
    keys_tree = auth.get("keys") or {}
    keys: list[KeySpec] = []
    if not isinstance(keys_tree, Mapping):
        problems.append("auth.keys: must be a mapping of key names")
        keys_tree = {}
    for name, spec in keys_tree.items():
        parsed = parse_static_key(str(name), spec, problems)
        if parsed is not None:
            keys.append(parsed)
    digests = [k.key_sha256 for k in keys]
    if len(set(digests)) != len(digests):
        problems.append("auth.keys: two keys have the same key")
    models_tree = limits.get("models") or {}
    if not isinstance(models_tree, Mapping):
        problems.append("limits.models: must be a mapping of model names")
        models_tree = {}
    model_limits = {
        str(m): parse_limit(v, f"limits.models.{m}", problems) for m, v in models_tree.items()
    }
    cors = (tree.get("server") or {}).get("cors") or {}
    origins = cors.get("allow_origins") or []
    if not all(isinstance(o, str) and (o == "*" or "://" in o) for o in origins):
        problems.append("server.cors.allow_origins: '*' or origins like https://app.example.com")
        origins = []
    usage = tree.get("usage") or {}
    return TenancySettings(
        auth_enabled=bool(auth.get("enabled")),
        keys=tuple(keys),
        global_limit=parse_limit(limits.get("global"), "limits.global", problems),
        model_limits={m: lim for m, lim in model_limits.items() if lim},
        default_key_limit=parse_limit(limits.get("default_key"), "limits.default_key", problems),
        default_max_tokens=int(limits.get("default_max_tokens") or 256),
        flush_secs=float(usage.get("flush_secs") or 1.0),
        key_refresh_secs=float(auth.get("key_refresh_secs") or 0.25),
        cors_origins=tuple(origins),
    )
