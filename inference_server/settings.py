"""Layered settings: settings.yaml → RUN_ENV section → .secrets.yaml → ``INFERENCE_*`` variables.

dynaconf does the layering; this module declares every key once (:data:`CORE_SCHEMA` plus each
plugin's own keys), turns the declarations into dynaconf ``Validator`` objects, runs them all with
``validate_all()`` (plain ``validate()`` stops at the first problem), reports keys nobody declared
(dynaconf never does), resolves ``@secret NAME`` references, and hands the app a frozen, typed
:class:`Settings`.  Nothing after this module ever sees dynaconf.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynaconf import Dynaconf, ValidationError, Validator

from inference_server import envvars
from inference_server.cache_config import CACHE_SCHEMA, CacheSettings, build_cache_settings
from inference_server.metrics import MetricsSettings
from inference_server.providers.base import ProviderConfig, ProviderPlugin, Setting, Timeouts
from inference_server.providers.loader import LoadedPlugin, PluginLoadError, load_plugins
from inference_server.routing_config import (
    ExperimentSpec,
    RouteSpec,
    build_experiments,
    build_routes,
)
from inference_server.scrub import NO_SECRETS, SECRET_NAME, Scrubber, mask_url, url_secrets
from inference_server.tenancy_config import TenancySettings, build_tenancy

S = Setting
_NUM = (int, float)
LOG_LEVELS = ("trace", "debug", "info", "success", "warning", "error", "critical")

#: Every core key with its type, default and bounds.  Defaults here equal settings.yaml's, so
#: the server also runs without the file; docs/settings are checked against this tree by a test.
CORE_SCHEMA: dict[str, Any] = {
    "server": {
        "host": S((str,), "127.0.0.1", description="interface to bind"),
        "port": S((int,), 3000, gte=1, lte=65535),
        "workers": S((int,), 1, gte=1, lte=64, description="processes sharing the port"),
        "max_body_bytes": S((int,), 10 * 1024 * 1024, gte=1024),
        "error_format": S((str,), "openai", choices=("openai", "legacy")),
        "shutdown_timeout_secs": S(_NUM, 30, gte=0, lte=3600),
        # issue 16: /health/ready fails this long before the listener closes on SIGTERM.
        "drain_delay_secs": S(
            _NUM,
            1,
            gte=0,
            lte=300,
            description="on SIGTERM: /health/ready answers 503 this long before the listener "
            "closes (load balancers stop sending first)",
        ),
        "header_timeout_secs": S(
            _NUM, 10, gte=0.01, lte=3600, description="request line + headers must arrive in this"
        ),
        "body_timeout_secs": S(_NUM, 30, gte=0.01, lte=86400, description="whole request body"),
        "body_idle_timeout_secs": S(
            _NUM, 10, gte=0.01, lte=86400, description="longest gap while a body is read"
        ),
        "keepalive_timeout_secs": S(_NUM, 75, gte=0.1, lte=86400),
        "max_connections": S(
            (int,),
            None,
            gte=1,
            lte=10_000_000,
            nullable=True,
            description="open client connections per worker (null: from RLIMIT_NOFILE)",
        ),
        "worker_restart_backoff_secs": S(
            _NUM, 1, gte=0, lte=600, description="first wait before restarting a failing worker"
        ),
        "worker_max_boot_failures": S(
            (int,), 5, gte=1, lte=1000, description="consecutive start-up deaths before giving up"
        ),
        "admin_token": S(
            (str,),
            None,
            secret=True,
            nullable=True,
            description="bearer token for /admin/* (unset: admin endpoints off)",
        ),
        # Browsers (issue 12): CORS for /v1/* (empty: no CORS headers at all).
        "cors": {
            "allow_origins": S(
                (list,), [], description='origins allowed to call /v1/* ("*" for any)'
            ),
        },
    },
    "inference": {
        "provider": S((str,), "lmstudio", description="plugin of the one-provider shorthand"),
        "base_url": S((str,), "http://127.0.0.1:1234/v1"),
        "api_key": S((str,), None, secret=True, nullable=True),
        "default_model": S((str,), "gpt-oss-20b"),
        "timeout_secs": S(_NUM, 30, gte=0.001, lte=86400),
        "connect_timeout_secs": S(_NUM, 30, gte=0.001, lte=3600),
        "stream_first_byte_timeout_secs": S(_NUM, None, gte=0.001, lte=86400, nullable=True),
        "stream_idle_timeout_secs": S(_NUM, None, gte=0.001, lte=86400, nullable=True),
        "max_retries": S((int,), 3, gte=0, lte=10),
        "retry_backoff_base_secs": S(_NUM, 0.25, gte=0, lte=60),
        "retry_backoff_max_secs": S(_NUM, 8, gte=0, lte=600),
        "retry_after_max_secs": S(_NUM, 30, gte=0, lte=3600),
        "allowed_models": S((list,), []),
        "models_cache_secs": S(_NUM, 10, gte=0, lte=3600),
        "options": S((dict,), {}, description="plugin-specific keys for the shorthand provider"),
    },
    "http_client": {
        "pool_size": S((int,), 1000, gte=1, lte=100000),
        "pool_size_per_host": S((int,), 0, gte=0, lte=100000),
        "keepalive_timeout_secs": S(_NUM, 30, gte=0, lte=3600),
        "dns_cache_secs": S(_NUM, 300, gte=0, lte=86400),
    },
    "health": {
        "probe_max_age_secs": S(_NUM, 2, gte=0, lte=3600),
        "probe_timeout_secs": S(_NUM, 2, gte=0.001, lte=60),
    },
    "logging": {
        "level": S((str,), "info", choices=LOG_LEVELS),
        "format": S((str,), "pretty", choices=("pretty", "json")),
        "output": S((str,), "stdout", choices=("stdout", "file")),
        "access_log": S((bool,), True),
        "slow_request_secs": S(
            _NUM,
            10,
            gte=0,
            lte=86400,
            description="log a time breakdown of requests whose answer took this long to start "
            "(whole response; streams: first token); 0: off",
        ),
        "file": {
            "path": S((str,), "logs/inference-server.log"),
            "rotation": S((str,), "100 MB"),
            "retention": S((str,), "7 days"),
        },
    },
    "telemetry": {
        "traces": {
            "exporter": S((str,), "none", choices=("none", "console", "otlp")),
            "protocol": S((str,), "http/protobuf", choices=("http/protobuf", "grpc")),
            "otlp_endpoint": S(
                (str,),
                None,
                nullable=True,
                description="null: http://127.0.0.1:4318/v1/traces (http/protobuf) or "
                "http://127.0.0.1:4317 (grpc)",
            ),
            "headers": S((dict,), {}, secret=True, description="sent with every export"),
            "service_name": S((str,), "inference-server"),
            "sample_ratio": S(_NUM, 1.0, gte=0, lte=1),
            "record_content": S((bool,), False, description="put prompts and completions on spans"),
            "content_max_chars": S((int,), 4096, gte=0, lte=1_000_000),
        },
    },
    "metrics": {
        "enabled": S((bool,), True, description="record and serve GET /metrics"),
        "multiprocess_dir": S(
            (str,),
            None,
            nullable=True,
            description="where workers write their values (null: a temporary directory)",
        ),
        "max_label_values": S((int,), 200, gte=1, lte=100000),
    },
    "routing": {
        "max_attempts": S((int,), 6, gte=1, lte=100, description="upstream attempts per request"),
        "max_time_secs": S(_NUM, 120, gte=0.001, lte=86400, description="time budget per request"),
        "panic": S(
            (bool,),
            True,
            description="when every deployment of a request is ejected, send it to the one "
            "ejected longest ago instead of refusing (503)",
        ),
        "retry_budget": {
            "ratio": S(_NUM, 0.2, gte=0, lte=10, description="retries per request, per window"),
            "min_retries": S((int,), 10, gte=0, lte=100000, description="retries always allowed"),
            "window_secs": S(_NUM, 10, gte=0.1, lte=3600),
        },
        "breaker": {
            "enabled": S((bool,), True),
            "window_secs": S(_NUM, 30, gte=0.1, lte=3600),
            "min_requests": S((int,), 10, gte=1, lte=100000),
            "failure_rate": S(_NUM, 0.5, gte=0.01, lte=1),
            "consecutive_failures": S((int,), 5, gte=1, lte=100000),
            "cooldown_secs": S(_NUM, 30, gte=0.001, lte=86400),
            "max_cooldown_secs": S(_NUM, 60, gte=0.001, lte=86400),
            "half_open_probes": S((int,), 1, gte=1, lte=1000),
        },
    },
    # Named providers, the model table and experiments; their children are user-chosen names.
    "providers": S((dict,), {}),
    "models": S((dict,), {}),
    "experiments": S((dict,), {}),
    "secrets": S((dict,), {}, secret=True),
    # Shared state (rate limits, usage, virtual keys, cache): this process, or Redis.
    "state": {
        "backend": S((str,), "memory", choices=("memory", "redis")),
        "redis_url": S(
            (str,),
            None,
            secret=True,
            nullable=True,
            description="redis://[:password@]host:port/db or rediss:// (TLS); keep it in "
            ".secrets.yaml when it holds a password",
        ),
        "on_error": S(
            (str,),
            "allow",
            choices=("allow", "deny"),
            description="Redis unreachable: allow (admit, log, count) or deny (503)",
        ),
        "timeout_secs": S(_NUM, 0.25, gte=0.001, lte=60, description="per Redis command"),
    },
    # The response cache (cache.py; keys and bounds in cache_config.py).
    "cache": CACHE_SCHEMA,
    # The Responses API's stored responses (previous_response_id, GET/DELETE /v1/responses/{id}).
    "responses": {
        "retention_secs": S(
            (int,),
            86400,
            gte=1,
            lte=30 * 86400,
            description="how long a stored response can be continued or fetched",
        ),
        "max_stored": S(
            (int,),
            10000,
            gte=0,
            lte=1_000_000,
            description="memory backend: stored responses kept per worker (oldest dropped); "
            "0 stores none",
        ),
    },
    # WebSocket (issue 15; websocket.py): chat streams multiplexed on one socket at
    # GET /v1/chat/completions, the Responses API's WebSocket mode at GET /v1/responses.
    "websocket": {
        "enabled": S((bool,), True, description="accept WebSocket upgrades on those paths"),
        "max_message_bytes": S(
            (int,),
            1024 * 1024,
            gte=1024,
            lte=64 * 1024 * 1024,
            description="largest client frame (a larger one closes the socket with 1009)",
        ),
        "max_in_flight": S(
            (int,), 32, gte=1, lte=10_000, description="requests running at once per socket"
        ),
        "heartbeat_secs": S(
            _NUM,
            30,
            gte=0,
            lte=3600,
            description="ping interval; silent 1.5 intervals: closed, 1011 (0 off)",
        ),
        "idle_timeout_secs": S(
            _NUM, 300, gte=0.1, lte=86400, description="close a socket with nothing in flight"
        ),
        "send_timeout_secs": S(
            _NUM, 10, gte=0.01, lte=3600, description="a frame unread this long: closed (1013)"
        ),
        "max_buffered_bytes": S(
            (int,),
            1024 * 1024,
            gte=1024,
            lte=1024 * 1024 * 1024,
            description="bytes waiting for a slow reader before its socket is closed (1013)",
        ),
    },
    # Access control, rate limits, usage (issue 12; tenancy_config.py reads these).
    "auth": {
        "enabled": S((bool,), False, description="require Authorization: Bearer <key> on /v1/*"),
        "keys": S(
            (dict,),
            {},
            secret=True,
            description="static keys: <name>: {key_sha256 | key: '@secret NAME', models, rpm, "
            "tpm, max_parallel, budget: {tokens, period}}",
        ),
        "key_refresh_secs": S(
            _NUM, 0.25, gte=0.01, lte=60, description="virtual keys re-read from Redis this often"
        ),
    },
    "limits": {
        "global": S((dict,), {}, description="{rpm, tpm, max_parallel} over all requests"),
        "models": S((dict,), {}, description="<model>: {rpm, tpm, max_parallel}"),
        "default_key": S((dict,), {}, description="limits of keys without their own"),
        "default_max_tokens": S(
            (int,), 256, gte=1, lte=10_000_000, description="tokens reserved without max_tokens"
        ),
    },
    "usage": {
        "flush_secs": S(
            _NUM, 1.0, gte=0.05, lte=60, description="ledger writes batched this often"
        ),
    },
}

#: Keys every provider section may have, besides its plugin's own.
PROVIDER_SCHEMA: dict[str, Setting] = {
    "plugin": S((str,), None, description="entry-point name of the provider plugin"),
    "base_url": S((str,), None, nullable=True),
    "api_key": S((str,), None, secret=True, nullable=True),
    "timeout_secs": S(_NUM, None, gte=0.001, lte=86400, nullable=True),
    "connect_timeout_secs": S(_NUM, None, gte=0.001, lte=3600, nullable=True),
    "stream_first_byte_timeout_secs": S(_NUM, None, gte=0.001, lte=86400, nullable=True),
    "stream_idle_timeout_secs": S(_NUM, None, gte=0.001, lte=86400, nullable=True),
    "max_retries": S((int,), None, gte=0, lte=10, nullable=True),
    "health_check_interval_secs": S(_NUM, None, gte=0.1, lte=86400, nullable=True),
}

SHORTHAND_PROVIDER = "local"
_SECRET_REF = re.compile(r"^@secret\s+([A-Za-z0-9_.-]+)$")


class ConfigError(Exception):
    """Settings are invalid; ``problems`` lists every one, each naming its key's path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid settings:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


# --- typed views ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str
    port: int
    workers: int
    max_body_bytes: int
    error_format: str
    shutdown_timeout_secs: float
    header_timeout_secs: float = 10.0
    body_timeout_secs: float = 30.0
    body_idle_timeout_secs: float = 10.0
    keepalive_timeout_secs: float = 75.0
    max_connections: int | None = None
    worker_restart_backoff_secs: float = 1.0
    worker_max_boot_failures: int = 5
    drain_delay_secs: float = 1.0


@dataclass(frozen=True, slots=True)
class RetrySettings:
    max_retries: int
    backoff_base_secs: float
    backoff_max_secs: float
    retry_after_max_secs: float


@dataclass(frozen=True, slots=True)
class HttpClientSettings:
    pool_size: int
    pool_size_per_host: int
    keepalive_timeout_secs: float
    dns_cache_secs: float


@dataclass(frozen=True, slots=True)
class LogFileSettings:
    path: str
    rotation: str
    retention: str


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    level: str
    format: str
    output: str
    access_log: bool
    file: LogFileSettings
    slow_request_secs: float = 10.0
    #: Every configured secret: the log sinks scrub them from each line (settings build it).
    scrubber: Scrubber = field(default=NO_SECRETS, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class TraceSettings:
    exporter: str
    #: May hold credentials (``http://user:KEY@collector``): kept out of repr().
    otlp_endpoint: str | None = field(repr=False)
    service_name: str
    sample_ratio: float
    protocol: str = "http/protobuf"
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    record_content: bool = False
    content_max_chars: int = 4096


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    enabled: bool
    window_secs: float
    min_requests: int
    failure_rate: float
    consecutive_failures: int
    cooldown_secs: float
    max_cooldown_secs: float
    half_open_probes: int


@dataclass(frozen=True, slots=True)
class StateSettings:
    backend: str = "memory"
    redis_url: str | None = field(default=None, repr=False)
    on_error: str = "allow"
    timeout_secs: float = 0.25


@dataclass(frozen=True, slots=True)
class ResponsesSettings:
    retention_secs: int = 86400
    max_stored: int = 10000


@dataclass(frozen=True, slots=True)
class WebSocketSettings:
    """``websocket.*`` (websocket.py reads it; the defaults equal CORE_SCHEMA's)."""

    enabled: bool = True
    max_message_bytes: int = 1024 * 1024
    max_in_flight: int = 32
    heartbeat_secs: float = 30.0
    idle_timeout_secs: float = 300.0
    send_timeout_secs: float = 10.0
    max_buffered_bytes: int = 1024 * 1024


@dataclass(frozen=True, slots=True)
class RetryBudgetSettings:
    ratio: float
    min_retries: int
    window_secs: float


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    max_attempts: int
    max_time_secs: float
    breaker: BreakerSettings
    retry_budget: RetryBudgetSettings = field(
        default_factory=lambda: RetryBudgetSettings(0.2, 10, 10.0)
    )
    panic: bool = True


@dataclass(frozen=True, slots=True)
class Settings:
    """The validated, frozen settings the app runs on."""

    env: str
    server: ServerSettings
    default_model: str
    allowed_models: tuple[str, ...]
    models_cache_secs: float
    #: The seed's ``http_config`` block of /health (the shorthand's or global timeouts).
    http_config: Mapping[str, Any]
    retry: RetrySettings
    http_client: HttpClientSettings
    health_probe_max_age_secs: float
    health_probe_timeout_secs: float
    logging: LoggingSettings
    traces: TraceSettings
    metrics: MetricsSettings
    providers: Mapping[str, ProviderConfig]
    #: Public model name → route (empty: the shorthand, any model goes to the one provider).
    routes: Mapping[str, RouteSpec]
    aliases: Mapping[str, str]
    #: Public model name → experiment answering for it.
    experiments: Mapping[str, ExperimentSpec]
    routing: RoutingSettings
    admin_token: str | None = field(repr=False)
    #: Provider name → seconds between active health checks (only those that want them).
    health_checks: Mapping[str, float]
    state: StateSettings = field(default_factory=StateSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    responses: ResponsesSettings = field(default_factory=ResponsesSettings)
    websocket: WebSocketSettings = field(default_factory=WebSocketSettings)
    tenancy: TenancySettings = field(default_factory=TenancySettings)
    plugins: Mapping[str, LoadedPlugin] = field(default_factory=dict)
    #: The settings tree as layered, secrets already masked (for ``--print-config``).
    raw: Mapping[str, Any] = field(default_factory=dict)
    #: Every configured secret, scrubbed from whatever leaves the gateway (scrub.py).
    scrubber: Scrubber = field(default=NO_SECRETS, repr=False, compare=False)

    @property
    def primary_provider(self) -> ProviderConfig:
        """The provider reported by /health's ``provider`` field (the first one configured)."""
        return next(iter(self.providers.values()))


# --- validation ----------------------------------------------------------------------------


def _type_name(types: tuple[type, ...]) -> str:
    if set(types) == {int, float}:
        return "a number"
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        list: "a list",
        dict: "a mapping",
    }
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def check_value(value: Any, spec: Setting) -> str | None:
    """Why ``value`` does not fit ``spec``, or None when it does."""
    if value is None:
        return None if spec.nullable or spec.default is None else "must not be null"
    ok = isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
    if not ok:
        return f"must be {_type_name(spec.types)}, got {type(value).__name__} {value!r}"
    if spec.choices is not None:
        normalized = value.lower() if isinstance(value, str) else value
        if normalized not in spec.choices:
            return f"must be one of {', '.join(map(str, spec.choices))}, got {value!r}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if spec.gte is not None and value < spec.gte:
            return f"must be >= {spec.gte}, got {value}"
        if spec.lte is not None and value > spec.lte:
            return f"must be <= {spec.lte}, got {value}"
    return None


def describe(spec: Setting) -> str:
    """What a valid value looks like, in words (for messages and docs)."""
    text = _type_name(spec.types)
    if spec.choices is not None:
        text = f"one of {', '.join(map(str, spec.choices))}"
    elif spec.gte is not None and spec.lte is not None:
        text += f" from {spec.gte:g} to {spec.lte:g}"
    elif spec.gte is not None:
        text += f" >= {spec.gte:g}"
    if spec.nullable:
        text += " (or null)"
    return text


def _validator(path: str, spec: Setting) -> Validator:
    def condition(value: Any, spec: Setting = spec) -> bool:
        return check_value(value, spec) is None

    return Validator(
        path,
        condition=condition,
        default=spec.default,
        messages={"condition": f"{path}: must be {describe(spec)}, got {{value!r}}"},
    )


def _walk_schema(schema: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Setting]]:
    for key, spec in schema.items():
        path = f"{prefix}{key}"
        if isinstance(spec, Mapping):
            yield from _walk_schema(spec, f"{path}.")
        else:
            yield path, spec


def _get(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def check_tree(
    tree: Mapping[str, Any],
    schema: Mapping[str, Any],
    prefix: str,
    problems: list[str],
    *,
    values: bool = True,
) -> None:
    """Report unknown keys (and, with ``values``, bad values) under ``prefix``."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        spec = schema.get(key)
        if spec is None:
            near = [k for k in schema if _close(k, key)]
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
            problems.append(f"{path}: unknown key{hint}")
        elif isinstance(spec, Mapping):
            if isinstance(value, Mapping):
                check_tree(value, spec, f"{path}.", problems, values=values)
            else:
                problems.append(f"{path}: must be a mapping, got {type(value).__name__}")
        elif values:
            why = check_value(value, spec)
            if why:
                problems.append(f"{path}: {why}")


def _close(a: str, b: str) -> bool:
    """Cheap typo detector: same letters give or take one edit, or one is a prefix."""
    if a.startswith(b) or b.startswith(a):
        return min(len(a), len(b)) >= 3
    if abs(len(a) - len(b)) > 1:
        return False
    diff = sum(x != y for x, y in zip(a, b, strict=False)) + abs(len(a) - len(b))
    return diff <= 1 or sorted(a) == sorted(b)


def _resolve_secrets(tree: Any, secrets: Mapping[str, Any], path: str, problems: list[str]) -> Any:
    """Replace ``"@secret NAME"`` strings with ``secrets.NAME`` (from .secrets.yaml or env)."""
    if isinstance(tree, dict):
        return {k: _resolve_secrets(v, secrets, f"{path}{k}.", problems) for k, v in tree.items()}
    if isinstance(tree, str):
        m = _SECRET_REF.match(tree.strip())
        if m:
            name = m.group(1).lower()
            if name not in secrets:  # secrets' names are matched case-insensitively
                problems.append(
                    f"{path.rstrip('.')}: secret '{name}' is not defined (set secrets.{name} in "
                    f".secrets.yaml or INFERENCE_SECRETS__{name.upper()} in the environment)"
                )
                return None
            return secrets[name]
    return tree


def _provider_sections(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Named provider sections, or the seed's ``inference:`` shorthand as provider 'local'."""
    providers = tree.get("providers") or {}
    if providers:
        return {str(k): dict(v) if isinstance(v, Mapping) else v for k, v in providers.items()}
    inf = tree.get("inference") or {}
    section = {
        "plugin": inf.get("provider"),
        "base_url": inf.get("base_url"),
        "api_key": inf.get("api_key"),
        **{k: inf.get(k) for k in PROVIDER_SCHEMA if k.endswith("_secs") or k == "max_retries"},
    }
    section.update(inf.get("options") or {})
    return {SHORTHAND_PROVIDER: section}


def _num(v: Any, fallback: float) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else fallback


def _build_provider(
    name: str, section: Mapping[str, Any], inf: Mapping[str, Any], plugin: ProviderPlugin
) -> ProviderConfig:
    total = _num(section.get("timeout_secs"), float(inf["timeout_secs"]))
    connect = _num(section.get("connect_timeout_secs"), float(inf["connect_timeout_secs"]))
    first = _num(
        section.get("stream_first_byte_timeout_secs"),
        _num(inf.get("stream_first_byte_timeout_secs"), total),
    )
    idle = _num(
        section.get("stream_idle_timeout_secs"), _num(inf.get("stream_idle_timeout_secs"), total)
    )
    retries = section.get("max_retries")
    options = {k: v for k, v in section.items() if k not in PROVIDER_SCHEMA}
    for key, spec in plugin.settings.items():
        options.setdefault(key, spec.default)
    return ProviderConfig(
        name=name,
        plugin=str(section["plugin"]),
        base_url=str(section.get("base_url") or plugin.default_base_url),
        api_key=section.get("api_key"),
        timeouts=Timeouts(connect=connect, total=total, first_byte=first, idle=idle),
        max_retries=int(retries) if isinstance(retries, int) else int(inf["max_retries"]),
        options=options,
    )


def collect_secrets(
    tree: Any,
    schema: Any = CORE_SCHEMA,
    plugin_schemas: Mapping[str, Mapping[str, Setting]] | None = None,
    *,
    secret: bool = False,
) -> list[str]:
    """Every secret string in a (resolved) settings tree: under a key declared ``secret`` or
    named like one (``scrub.SECRET_NAME``, stricter than :func:`masked`'s), plus credentials
    inside any URL."""
    out: list[str] = []
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            sub = schema.get(k) if isinstance(schema, Mapping) else None
            is_secret = (
                secret
                or (isinstance(sub, Setting) and sub.secret)
                or bool(SECRET_NAME.search(str(k)))
            )
            if k == "providers" and schema is CORE_SCHEMA and isinstance(v, Mapping):
                for section in v.values():
                    if isinstance(section, Mapping):
                        plugin = str(section.get("plugin"))
                        own = {**PROVIDER_SCHEMA, **(plugin_schemas or {}).get(plugin, {})}
                        out.extend(collect_secrets(section, own, secret=is_secret))
            else:
                out.extend(collect_secrets(v, sub, plugin_schemas, secret=is_secret))
    elif isinstance(tree, list):
        for item in tree:
            out.extend(collect_secrets(item, None, plugin_schemas, secret=secret))
    elif isinstance(tree, str):
        if secret:
            out.append(tree)
        out.extend(url_secrets(tree))
    elif secret and isinstance(tree, int | float) and not isinstance(tree, bool):
        out.append(str(tree))
    return out


def settings_files(config: str | os.PathLike[str] | None) -> list[str]:
    """The settings file (``--config`` or ./settings.yaml) and the .secrets.yaml beside it."""
    main = Path(config) if config else Path.cwd() / "settings.yaml"
    return [str(main.resolve()), str(main.resolve().parent / ".secrets.yaml")]


def load_raw(
    config: str | os.PathLike[str] | None = None,
    *,
    env: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any], list[str]]:
    """Run dynaconf's layering and core validators; return (env, lower-cased tree, problems)."""
    problems: list[str] = []
    if config is not None and not Path(config).is_file():
        raise ConfigError([f"settings file not found: {config}"])
    kwargs: dict[str, Any] = {}
    if env is not None:
        kwargs["force_env"] = env
    dyn = Dynaconf(
        settings_files=settings_files(config),
        environments=True,
        env_switcher="RUN_ENV",
        envvar_prefix="INFERENCE",
        merge_enabled=True,
        loaders=["inference_server.envvars"],
        **kwargs,
    )
    try:
        current_env = str(dyn.current_env).lower()
    except Exception as exc:  # a broken YAML file surfaces on first access
        raise ConfigError([f"cannot read settings: {exc}"]) from exc
    for path, value in (overrides or {}).items():
        dyn.set(path, value)  # command-line flags beat every other layer
    dyn.validators.register(*(_validator(p, s) for p, s in _walk_schema(CORE_SCHEMA)))
    try:
        dyn.validators.validate_all()
    except ValidationError as exc:
        problems.extend(str(message) for _, message in exc.details)
    except Exception as exc:  # a broken YAML file surfaces on first access
        raise ConfigError([f"cannot read settings: {exc}"]) from exc
    # Top-level keys lower-cased (dynaconf upper-cases them); nested keys keep their case: names
    # under providers/models/experiments are the user's own (model ids are case-sensitive).
    tree = {str(k).lower(): envvars.plain(v) for k, v in dyn.as_dict().items()}
    for name in envvars.unresolved():
        problems.append(f"environment variable {name}: does not name any setting")
    return current_env, tree, problems


def load_settings(
    config: str | os.PathLike[str] | None = None,
    *,
    env: str | None = None,
    plugins: Mapping[str, ProviderPlugin] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load, validate everything (collecting every problem) and build :class:`Settings`.

    ``plugins`` replaces entry-point discovery (tests register fakes explicitly this way).
    """
    current_env, tree, problems = load_raw(config, env=env, overrides=overrides)
    dynamic = ("providers", "models", "experiments", "secrets")
    core_tree = {k: v for k, v in tree.items() if k not in dynamic}
    # Values were checked by the dynaconf validators in load_raw; here: keys nobody declared.
    check_tree(core_tree, CORE_SCHEMA, "", problems, values=False)
    for level_key in ("level",):
        lvl = _get(tree, f"logging.{level_key}")
        if isinstance(lvl, str):
            tree["logging"][level_key] = lvl.lower()

    secrets = tree.get("secrets") or {}
    if not isinstance(secrets, Mapping):
        problems.append("secrets: must be a mapping")
        secrets = {}
    secrets = {str(k).lower(): v for k, v in secrets.items()}
    resolved: dict[str, Any] = _resolve_secrets(
        {k: v for k, v in tree.items() if k != "secrets"}, secrets, "", problems
    )

    sections = _provider_sections(resolved)
    wanted: set[str] = set()
    for name, section in sections.items():
        if not isinstance(section, Mapping):
            problems.append(f"providers.{name}: must be a mapping")
            continue
        plugin_name = section.get("plugin")
        if not isinstance(plugin_name, str) or not plugin_name:
            where = (
                "inference.provider"
                if name == SHORTHAND_PROVIDER and not tree.get("providers")
                else f"providers.{name}.plugin"
            )
            problems.append(f"{where}: required (the provider plugin to use)")
            continue
        wanted.add(plugin_name)

    loaded: dict[str, LoadedPlugin] = {}
    if plugins is not None:
        missing = sorted(wanted - plugins.keys())
        if missing:
            problems.append(
                f"provider plugin(s) not installed: {', '.join(missing)} "
                f"(installed: {', '.join(sorted(plugins)) or 'none'})"
            )
        loaded = {n: LoadedPlugin(p, "<given>", "") for n, p in plugins.items() if n in wanted}
    else:
        try:
            loaded = load_plugins(wanted)
        except PluginLoadError as exc:
            problems.append(str(exc))

    provider_configs: dict[str, ProviderConfig] = {}
    inf = resolved.get("inference") or {}
    shorthand = not tree.get("providers")
    for name, section in sections.items():
        if not isinstance(section, Mapping) or section.get("plugin") not in loaded:
            continue
        plugin = loaded[str(section["plugin"])].plugin
        schema: dict[str, Any] = {**PROVIDER_SCHEMA, **plugin.settings}
        if shorthand:
            core_keys = {"plugin", "base_url", "api_key", *PROVIDER_SCHEMA}
            opts = {k: v for k, v in section.items() if k not in core_keys}
            check_tree(opts, plugin.settings, "inference.options.", problems)
        else:
            check_tree(section, schema, f"providers.{name}.", problems)
        if any(p.startswith("inference.") for p in problems):
            continue  # its defaults are invalid and already reported
        try:
            provider_configs[name] = _build_provider(name, section, inf, plugin)
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"providers.{name}: {exc}")
            continue
        if plugin.validate_options is not None:
            problems.extend(plugin.validate_options(name, provider_configs[name].options))

    models = resolved.get("models") or {}
    if not isinstance(models, Mapping):
        problems.append("models: must be a mapping of public model names")
        models = {}
    routes, aliases = build_routes(models, provider_configs, problems)
    experiments_raw = resolved.get("experiments") or {}
    if not isinstance(experiments_raw, Mapping):
        problems.append("experiments: must be a mapping of experiment names")
        experiments_raw = {}
    experiments = build_experiments(experiments_raw, set(routes) | set(aliases), problems)
    if experiments and not routes:
        problems.append("experiments: need a model table ('models') for their variants")
    health_checks = {
        name: float(section["health_check_interval_secs"])
        for name, section in sections.items()
        if isinstance(section, Mapping) and section.get("health_check_interval_secs")
    }
    state = _state_settings(resolved["state"], problems)
    cache = build_cache_settings(resolved["cache"], models, state.backend, problems)
    tenancy = build_tenancy(resolved, problems)  # issue 12: keys, limits, usage, CORS

    if problems:
        raise ConfigError(problems)

    plugin_schemas = {n: lp.plugin.settings for n, lp in loaded.items()}
    scrubber = Scrubber(
        [
            *collect_secrets(resolved, plugin_schemas=plugin_schemas),
            *collect_secrets(secrets, secret=True),
        ]
    )
    srv = resolved["server"]
    log = resolved["logging"]
    trc = resolved["telemetry"]["traces"]
    hc = resolved["http_client"]
    return Settings(
        env=current_env,
        server=ServerSettings(
            host=srv["host"],
            port=srv["port"],
            workers=srv["workers"],
            max_body_bytes=srv["max_body_bytes"],
            error_format=srv["error_format"].lower(),
            shutdown_timeout_secs=float(srv["shutdown_timeout_secs"]),
            header_timeout_secs=float(srv["header_timeout_secs"]),
            body_timeout_secs=float(srv["body_timeout_secs"]),
            body_idle_timeout_secs=float(srv["body_idle_timeout_secs"]),
            keepalive_timeout_secs=float(srv["keepalive_timeout_secs"]),
            max_connections=srv["max_connections"],
            worker_restart_backoff_secs=float(srv["worker_restart_backoff_secs"]),
            worker_max_boot_failures=srv["worker_max_boot_failures"],
            drain_delay_secs=float(srv["drain_delay_secs"]),
        ),
        default_model=inf["default_model"],
        allowed_models=tuple(str(m) for m in inf["allowed_models"]),
        models_cache_secs=float(inf["models_cache_secs"]),
        http_config={
            "timeout_secs": inf["timeout_secs"],
            "connect_timeout_secs": inf["connect_timeout_secs"],
            "max_retries": inf["max_retries"],
        },
        retry=RetrySettings(
            max_retries=int(inf["max_retries"]),
            backoff_base_secs=float(inf["retry_backoff_base_secs"]),
            backoff_max_secs=float(inf["retry_backoff_max_secs"]),
            retry_after_max_secs=float(inf["retry_after_max_secs"]),
        ),
        http_client=HttpClientSettings(
            pool_size=hc["pool_size"],
            pool_size_per_host=hc["pool_size_per_host"],
            keepalive_timeout_secs=float(hc["keepalive_timeout_secs"]),
            dns_cache_secs=float(hc["dns_cache_secs"]),
        ),
        health_probe_max_age_secs=float(resolved["health"]["probe_max_age_secs"]),
        health_probe_timeout_secs=float(resolved["health"]["probe_timeout_secs"]),
        logging=LoggingSettings(
            level=log["level"],
            format=log["format"].lower(),
            output=log["output"].lower(),
            access_log=bool(log["access_log"]),
            file=LogFileSettings(**log["file"]),
            slow_request_secs=float(log["slow_request_secs"]),
            scrubber=scrubber,
        ),
        traces=TraceSettings(
            exporter=trc["exporter"].lower(),
            otlp_endpoint=trc["otlp_endpoint"],
            service_name=trc["service_name"],
            sample_ratio=float(trc["sample_ratio"]),
            protocol=trc["protocol"].lower(),
            headers={str(k): str(v) for k, v in (trc["headers"] or {}).items()},
            record_content=bool(trc["record_content"]),
            content_max_chars=int(trc["content_max_chars"]),
        ),
        metrics=MetricsSettings(
            enabled=bool(resolved["metrics"]["enabled"]),
            multiprocess_dir=resolved["metrics"]["multiprocess_dir"],
            max_label_values=int(resolved["metrics"]["max_label_values"]),
        ),
        providers=provider_configs,
        routes=routes,
        aliases=aliases,
        experiments=experiments,
        routing=RoutingSettings(
            max_attempts=int(resolved["routing"]["max_attempts"]),
            max_time_secs=float(resolved["routing"]["max_time_secs"]),
            breaker=BreakerSettings(**resolved["routing"]["breaker"]),
            retry_budget=RetryBudgetSettings(
                ratio=float(resolved["routing"]["retry_budget"]["ratio"]),
                min_retries=int(resolved["routing"]["retry_budget"]["min_retries"]),
                window_secs=float(resolved["routing"]["retry_budget"]["window_secs"]),
            ),
            panic=bool(resolved["routing"]["panic"]),
        ),
        admin_token=srv.get("admin_token"),
        health_checks=health_checks,
        state=state,
        cache=cache,
        responses=ResponsesSettings(
            retention_secs=int(resolved["responses"]["retention_secs"]),
            max_stored=int(resolved["responses"]["max_stored"]),
        ),
        websocket=WebSocketSettings(
            enabled=bool(resolved["websocket"]["enabled"]),
            max_message_bytes=int(resolved["websocket"]["max_message_bytes"]),
            max_in_flight=int(resolved["websocket"]["max_in_flight"]),
            heartbeat_secs=float(resolved["websocket"]["heartbeat_secs"]),
            idle_timeout_secs=float(resolved["websocket"]["idle_timeout_secs"]),
            send_timeout_secs=float(resolved["websocket"]["send_timeout_secs"]),
            max_buffered_bytes=int(resolved["websocket"]["max_buffered_bytes"]),
        ),
        tenancy=tenancy,
        plugins=loaded,
        # Masked now: the settings object keeps no secret it does not need (the values it
        # needs live in typed fields, each kept out of repr()).
        raw=masked(tree, plugin_schemas=plugin_schemas),
        scrubber=scrubber,
    )


def _state_settings(tree: Mapping[str, Any], problems: list[str]) -> StateSettings:
    """The ``state`` section; the Redis backend needs a redis:// (or rediss://) URL."""
    url = tree.get("redis_url")
    if tree["backend"] == "redis":
        if not url:
            problems.append("state.redis_url: required with state.backend: redis")
        elif not str(url).startswith(("redis://", "rediss://", "unix://")):
            problems.append("state.redis_url: must start with redis://, rediss:// or unix://")
    return StateSettings(
        backend=tree["backend"],
        redis_url=url,
        on_error=tree["on_error"],
        timeout_secs=float(tree["timeout_secs"]),
    )


def masked(
    tree: Any,
    schema: Any = CORE_SCHEMA,
    key: str = "",
    *,
    plugin_schemas: Mapping[str, Mapping[str, Setting]] | None = None,
) -> Any:
    """A copy of the settings tree safe to print: secrets replaced by ``"***"``.

    Secret are keys declared ``secret`` (by the core or by the provider's plugin) and any
    undeclared key whose name looks like one (``scrub.SECRET_NAME``: api_key, token,
    password, secret, but not ``max_tokens``); credentials inside a URL
    (``http://user:KEY@host``) are masked wherever the URL appears.
    """
    if isinstance(tree, str):
        return mask_url(tree) if "@" in tree else tree
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            sub = schema.get(k) if isinstance(schema, Mapping) else None
            # A declared key is a secret only if declared so (``hits_count_tokens`` is not); an
            # undeclared one (plugin options, params) when its name says so (not max_tokens).
            if (isinstance(sub, Setting) and sub.secret) or (
                sub is None and SECRET_NAME.search(str(k))
            ):
                out[k] = "***" if v not in (None, "", {}) else v
            elif k == "providers" and schema is CORE_SCHEMA and isinstance(v, Mapping):
                out[k] = {
                    n: masked(
                        s,
                        {**PROVIDER_SCHEMA, **(plugin_schemas or {}).get(str(s.get("plugin")), {})},
                    )
                    if isinstance(s, Mapping)
                    else s
                    for n, s in v.items()
                }
            else:
                out[k] = masked(v, sub, k)
        return out
    if isinstance(tree, list):
        return [masked(v, None) for v in tree]
    return tree


def describe_schema() -> list[tuple[str, Setting]]:
    """Every core key path with its declaration (used by docs tests and --print-config)."""
    return list(_walk_schema(CORE_SCHEMA))
