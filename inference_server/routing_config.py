"""The model table and experiments, from settings to frozen specs (validated, every problem named).

```yaml
models:
  chat:                       # a route: several deployments and a strategy
    strategy: weighted        # priority | weighted | round_robin | least_busy | latency
    deployments:
      - {provider: local, upstream_model: gpt-oss-20b, weight: 80}
      - {provider: cloud, upstream_model: gpt-4o-mini, weight: 20, params: {temperature: 0.2}}
    fallbacks: [chat-backup]  # other public names, tried after this route's own deployments
    context_window_fallbacks: [chat-long]    # on context_length_exceeded
    content_policy_fallbacks: [chat-lenient] # on a content-policy refusal
  small: {provider: local, upstream_model: qwen}   # the one-deployment shorthand
  gpt-latest: {alias: chat}
experiments:
  prompt-style:
    model: assistant          # the public name clients call (may replace a route of that name)
    key: user                 # user | api_key | header:<name>
    variants: {control: {model: chat, weight: 80}, terse: {model: chat-terse, weight: 20}}
    shadow: {model: chat-candidate, fraction: 0.1}
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from inference_server.providers.base import OPERATIONS, ProviderConfig, Setting, Timeouts

S = Setting
_NUM = (int, float)
STRATEGIES = ("priority", "weighted", "round_robin", "least_busy", "latency")
TIMEOUT_KEYS = (
    "timeout_secs",
    "connect_timeout_secs",
    "stream_first_byte_timeout_secs",
    "stream_idle_timeout_secs",
)

DEPLOYMENT_SCHEMA: dict[str, Setting] = {
    "provider": S((str,), None, description="provider instance name"),
    "upstream_model": S((str,), None, nullable=True, description="default: the public name"),
    "weight": S(_NUM, 1, gte=0, lte=1_000_000),
    "params": S((dict,), {}, description="request defaults for this deployment"),
    **{k: S(_NUM, None, gte=0.001, lte=86400, nullable=True) for k in TIMEOUT_KEYS},
}
MODEL_SCHEMA: dict[str, Setting] = {
    **DEPLOYMENT_SCHEMA,
    "strategy": S((str,), "priority", choices=STRATEGIES),
    "deployments": S((list,), None, nullable=True),
    "fallbacks": S((list,), []),
    "context_window_fallbacks": S((list,), []),
    "content_policy_fallbacks": S((list,), []),
    "alias": S((str,), None, nullable=True),
    "cache": S((dict,), None, nullable=True, description="{enabled, ttl_secs} (cache_config.py)"),
    "capabilities": S(
        (list,),
        None,
        nullable=True,
        description="what the model serves, of chat, completions, embeddings, responses "
        "(/v1/models says so; other requests get 400 OPERATION_NOT_SUPPORTED); default: "
        "what its providers support",
    ),
}
VARIANT_SCHEMA: dict[str, Setting] = {
    "model": S((str,), None),
    "weight": S(_NUM, 1, gte=0, lte=1_000_000),
    "params": S((dict,), {}, description="request overrides for this variant"),
}
EXPERIMENT_SCHEMA: dict[str, Setting] = {
    "model": S((str,), None),
    "key": S((str,), "user"),
    "variants": S((dict,), None),
    "shadow": S((dict,), None, nullable=True),
    "allow_override": S((bool,), False),
}
SHADOW_SCHEMA: dict[str, Setting] = {
    "model": S((str,), None),
    "fraction": S(_NUM, 0.0, gte=0, lte=1),
}


def _capabilities(value: Any, path: str, problems: list[str]) -> tuple[str, ...] | None:
    """A model's declared ``capabilities``: known operation names, or None when not given."""
    if value is None:
        return None
    unknown = [v for v in value if v not in OPERATIONS]
    if unknown or not value:
        problems.append(f"{path}: must list some of {', '.join(OPERATIONS)} (got {value!r})"[:300])
        return None
    return tuple(dict.fromkeys(str(v) for v in value))


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """One way to serve a route: a provider, its model id, a weight, defaults and limits."""

    provider: str
    upstream_model: str
    weight: float
    params: Mapping[str, Any]
    timeouts: Timeouts

    @property
    def id(self) -> str:
        return f"{self.provider}/{self.upstream_model}"


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """A public model name served by one or more deployments."""

    name: str
    strategy: str
    deployments: tuple[DeploymentSpec, ...]
    fallbacks: tuple[str, ...] = ()
    context_window_fallbacks: tuple[str, ...] = ()
    content_policy_fallbacks: tuple[str, ...] = ()
    #: Declared operations (``capabilities``), or None: whatever the providers support.
    capabilities: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class VariantSpec:
    name: str
    model: str
    weight: float
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ShadowSpec:
    model: str
    fraction: float


@dataclass(frozen=True, slots=True)
class ExperimentSpec:
    """Splits one public model name between variants, sticky by a hash of ``key``."""

    name: str
    model: str
    key: str
    variants: tuple[VariantSpec, ...]
    shadow: ShadowSpec | None
    allow_override: bool


def check(tree: Mapping[str, Any], schema: Mapping[str, Setting], prefix: str) -> list[str]:
    """Unknown keys and bad values under ``prefix`` (the core settings' own rules)."""
    from inference_server.settings import check_tree

    problems: list[str] = []
    check_tree(tree, schema, prefix, problems)
    return problems


def _names(value: Any, path: str, problems: list[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{path}: must be a list of model names")
        return ()
    return tuple(value)


def _timeouts(entry: Mapping[str, Any], base: Timeouts) -> Timeouts:
    def pick(key: str, fallback: float) -> float:
        v = entry.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else fallback

    return Timeouts(
        connect=pick("connect_timeout_secs", base.connect),
        total=pick("timeout_secs", base.total),
        first_byte=pick("stream_first_byte_timeout_secs", base.first_byte),
        idle=pick("stream_idle_timeout_secs", base.idle),
    )


def _deployment(
    entry: Mapping[str, Any],
    public: str,
    path: str,
    providers: Mapping[str, ProviderConfig],
    problems: list[str],
) -> DeploymentSpec | None:
    provider = entry.get("provider")
    if provider not in providers:
        known = ", ".join(sorted(providers)) or "none"
        problems.append(f"{path}.provider: unknown provider {provider!r} (configured: {known})")
        return None
    params = entry.get("params") or {}
    return DeploymentSpec(
        provider=str(provider),
        upstream_model=str(entry.get("upstream_model") or public),
        weight=float(entry.get("weight", 1)),
        params=dict(params) if isinstance(params, Mapping) else {},
        timeouts=_timeouts(entry, providers[str(provider)].timeouts),
    )


def build_routes(
    models: Mapping[str, Any], providers: Mapping[str, ProviderConfig], problems: list[str]
) -> tuple[dict[str, RouteSpec], dict[str, str]]:
    """(routes by public name, aliases → route name) from the ``models`` table."""
    routes: dict[str, RouteSpec] = {}
    raw_aliases: dict[str, str] = {}
    for public, entry in models.items():
        path = f"models.{public}"
        if not isinstance(entry, Mapping):
            problems.append(f"{path}: must be a mapping (provider, deployments or alias)")
            continue
        problems.extend(check(entry, MODEL_SCHEMA, f"{path}."))
        forms = [k for k in ("provider", "deployments", "alias") if entry.get(k) is not None]
        if len(forms) != 1:
            problems.append(f"{path}: give exactly one of 'provider', 'deployments' or 'alias'")
            continue
        if forms[0] == "alias":
            raw_aliases[str(public)] = str(entry["alias"])
            continue
        deployments: list[DeploymentSpec] = []
        if forms[0] == "provider":
            dep = _deployment(entry, str(public), path, providers, problems)
            deployments = [dep] if dep else []
        else:
            items = entry["deployments"]
            if not isinstance(items, list) or not items:
                problems.append(f"{path}.deployments: must be a non-empty list")
                continue
            for i, item in enumerate(items):
                dpath = f"{path}.deployments.{i}"
                if not isinstance(item, Mapping):
                    problems.append(f"{dpath}: must be a mapping with 'provider'")
                    continue
                problems.extend(check(item, DEPLOYMENT_SCHEMA, f"{dpath}."))
                dep = _deployment(item, str(public), dpath, providers, problems)
                if dep:
                    deployments.append(dep)
        if not deployments:
            continue
        if sum(d.weight for d in deployments) <= 0:
            problems.append(f"{path}: deployment weights must not all be 0")
        routes[str(public)] = RouteSpec(
            name=str(public),
            strategy=str(entry.get("strategy") or "priority"),
            deployments=tuple(deployments),
            fallbacks=_names(entry.get("fallbacks", []), f"{path}.fallbacks", problems),
            context_window_fallbacks=_names(
                entry.get("context_window_fallbacks", []),
                f"{path}.context_window_fallbacks",
                problems,
            ),
            content_policy_fallbacks=_names(
                entry.get("content_policy_fallbacks", []),
                f"{path}.content_policy_fallbacks",
                problems,
            ),
            capabilities=_capabilities(entry.get("capabilities"), f"{path}.capabilities", problems),
        )
    aliases: dict[str, str] = {}
    for alias, target in raw_aliases.items():
        seen = {alias}
        while target in raw_aliases and target not in seen:
            seen.add(target)
            target = raw_aliases[target]
        if target not in routes:
            problems.append(f"models.{alias}.alias: {target!r} is not a model with deployments")
            continue
        aliases[alias] = target
    for route in routes.values():
        for kind in ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks"):
            for name in getattr(route, kind):
                if name not in routes and name not in aliases:
                    problems.append(f"models.{route.name}.{kind}: unknown model {name!r}")
    return routes, aliases


def build_experiments(
    experiments: Mapping[str, Any], known_models: set[str], problems: list[str]
) -> dict[str, ExperimentSpec]:
    """Experiments by the public model name they answer for."""
    out: dict[str, ExperimentSpec] = {}
    for name, entry in experiments.items():
        path = f"experiments.{name}"
        if not isinstance(entry, Mapping):
            problems.append(f"{path}: must be a mapping")
            continue
        problems.extend(check(entry, EXPERIMENT_SCHEMA, f"{path}."))
        model = entry.get("model")
        if not isinstance(model, str) or not model:
            problems.append(f"{path}.model: required (the public model name clients call)")
            continue
        key = str(entry.get("key") or "user")
        if key not in ("user", "api_key") and not (key.startswith("header:") and len(key) > 7):
            problems.append(f"{path}.key: must be user, api_key or header:<name>, got {key!r}")
        variants_raw = entry.get("variants")
        if not isinstance(variants_raw, Mapping) or not variants_raw:
            problems.append(f"{path}.variants: required, a mapping of variant name → settings")
            continue
        variants: list[VariantSpec] = []
        for vname, v in variants_raw.items():
            vpath = f"{path}.variants.{vname}"
            if not isinstance(v, Mapping):
                problems.append(f"{vpath}: must be a mapping with 'model'")
                continue
            problems.extend(check(v, VARIANT_SCHEMA, f"{vpath}."))
            if v.get("model") not in known_models:
                problems.append(f"{vpath}.model: unknown model {v.get('model')!r}")
                continue
            variants.append(
                VariantSpec(
                    str(vname),
                    str(v["model"]),
                    float(v.get("weight", 1)),
                    dict(v.get("params") or {}),
                )
            )
        if variants and sum(v.weight for v in variants) <= 0:
            problems.append(f"{path}.variants: weights must not all be 0")
        shadow: ShadowSpec | None = None
        shadow_raw = entry.get("shadow")
        if isinstance(shadow_raw, Mapping):
            problems.extend(check(shadow_raw, SHADOW_SCHEMA, f"{path}.shadow."))
            if shadow_raw.get("model") not in known_models:
                problems.append(f"{path}.shadow.model: unknown model {shadow_raw.get('model')!r}")
            else:
                shadow = ShadowSpec(str(shadow_raw["model"]), float(shadow_raw.get("fraction", 0)))
        if model in out:
            problems.append(f"{path}.model: {model!r} already has experiment {out[model].name!r}")
            continue
        out[model] = ExperimentSpec(
            name=str(name),
            model=model,
            key=key,
            variants=tuple(variants),
            shadow=shadow,
            allow_override=bool(entry.get("allow_override", False)),
        )
    return out
