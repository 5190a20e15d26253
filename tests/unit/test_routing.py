"""Selection strategies, plans, aliases and sticky experiments (no network)."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest
from inference_server_mock import MockProvider

from inference_server.routing import Router, bucket
from inference_server.settings import Settings

PROVIDERS = {"a": {"plugin": "mock"}, "b": {"plugin": "mock"}, "c": {"plugin": "mock"}}


def router(
    make_settings, models: dict[str, Any], experiments: dict[str, Any] | None = None, seed: int = 7
) -> Router:
    settings: Settings = make_settings(
        {"providers": PROVIDERS, "models": models, "experiments": experiments or {}}
    )
    providers = {n: MockProvider(None, c) for n, c in settings.providers.items()}  # type: ignore[arg-type]
    return Router(settings, providers, rng=random.Random(seed))


def first_picks(r: Router, model: str, n: int) -> Counter[str]:
    route = r.resolve(model)
    return Counter(r.candidates(route, model)[0].deployment.id for _ in range(n))


TWO = [
    {"provider": "a", "upstream_model": "m", "weight": 80},
    {"provider": "b", "upstream_model": "m", "weight": 20},
]


def test_weighted_split_within_tolerance(make_settings) -> None:
    r = router(make_settings, {"chat": {"strategy": "weighted", "deployments": TWO}})
    picks = first_picks(r, "chat", 10_000)
    assert 0.78 <= picks["a/m"] / 10_000 <= 0.82


def test_priority_keeps_order_and_appends_fallbacks(make_settings) -> None:
    r = router(
        make_settings,
        {
            "chat": {"deployments": TWO, "fallbacks": ["backup"]},
            "backup": {"provider": "c", "upstream_model": "z"},
        },
    )
    plan = r.candidates(r.resolve("chat"), "chat")
    assert [(c.deployment.id, c.upstream_model) for c in plan] == [
        ("a/m", "m"),
        ("b/m", "m"),
        ("c/z", "z"),
    ]


def test_round_robin_rotates(make_settings) -> None:
    r = router(make_settings, {"chat": {"strategy": "round_robin", "deployments": TWO}})
    assert [r.candidates(r.resolve("chat"), "chat")[0].deployment.id for _ in range(4)] == [
        "a/m",
        "b/m",
        "a/m",
        "b/m",
    ]


def test_least_busy_picks_the_idle_one(make_settings) -> None:
    r = router(make_settings, {"chat": {"strategy": "least_busy", "deployments": TWO}})
    route = r.resolve("chat")
    route.deployments[0].in_flight = 3
    assert set(first_picks(r, "chat", 200)) == {"b/m"}


def test_latency_prefers_the_fast_one(make_settings) -> None:
    three = [*TWO, {"provider": "c", "upstream_model": "m"}]
    r = router(make_settings, {"chat": {"strategy": "latency", "deployments": three}})
    route = r.resolve("chat")
    for dep, secs in zip(route.deployments, (0.5, 0.05, 0.4), strict=True):
        for _ in range(5):
            dep.observe_latency(secs)
    picks = first_picks(r, "chat", 3000)
    # Power of two choices: the fastest wins every pair it is in (2 of 3 pairs).
    assert picks["b/m"] / 3000 > 0.6
    assert picks.most_common(1)[0][0] == "b/m"


def test_open_breaker_removes_deployment_at_once(make_settings) -> None:
    r = router(make_settings, {"chat": {"strategy": "weighted", "deployments": TWO}})
    route = r.resolve("chat")
    route.deployments[0].breaker.force_open("test")
    assert set(first_picks(r, "chat", 500)) == {"b/m"}
    route.deployments[1].breaker.force_open("test")
    # Ejected deployments stay in the candidates (last), for panic routing; none is selectable.
    assert not any(c.deployment.selectable() for c in r.candidates(route, "chat"))
    assert not route.available()


def test_aliases_resolve_through_chains(make_settings) -> None:
    r = router(
        make_settings,
        {
            "chat": {"provider": "a"},
            "gpt-latest": {"alias": "chat"},
            "newest": {"alias": "gpt-latest"},
        },
    )
    assert r.resolve("newest").name == "chat"
    assert r.resolve("gpt-latest").name == "chat"


def test_typed_fallbacks(make_settings) -> None:
    r = router(
        make_settings,
        {
            "chat": {
                "provider": "a",
                "context_window_fallbacks": ["long"],
                "content_policy_fallbacks": ["lenient"],
            },
            "long": {"provider": "b", "upstream_model": "long-ctx"},
            "lenient": {"provider": "c"},
        },
    )
    route = r.resolve("chat")
    # Upstream codes arrive as sent (lower case); the gateway's own are upper case.
    assert [x.name for x in r.typed_routes(route, "context_length_exceeded")] == ["long"]
    assert [x.name for x in r.typed_routes(route, "CONTENT_POLICY_VIOLATION")] == ["lenient"]
    assert r.typed_routes(route, "PROVIDER_ERROR") == []


@pytest.mark.parametrize(
    ("models", "problem"),
    [
        ({"x": {"provider": "nope"}}, "models.x.provider: unknown provider 'nope'"),
        ({"x": {"alias": "y"}}, "models.x.alias: 'y' is not a model with deployments"),
        ({"x": {"provider": "a", "fallbacks": ["zz"]}}, "models.x.fallbacks: unknown model 'zz'"),
        ({"x": {"provider": "a", "deployments": [{"provider": "b"}]}}, "exactly one of"),
        (
            {"x": {"deployments": [{"provider": "a", "wieght": 1}]}},
            "models.x.deployments.0.wieght: unknown key",
        ),
        ({"x": {"provider": "a", "strategy": "fastest"}}, "models.x.strategy: must be one of"),
    ],
)
def test_model_table_problems_are_named(make_settings, models, problem) -> None:
    from inference_server.settings import ConfigError

    with pytest.raises(ConfigError) as info:
        make_settings({"providers": PROVIDERS, "models": models})
    assert any(problem in p for p in info.value.problems), info.value.problems


# --- experiments ---------------------------------------------------------------------------

EXPERIMENT = {
    "prompt-style": {
        "model": "assistant",
        "key": "user",
        "variants": {
            "control": {"model": "chat", "weight": 80},
            "terse": {"model": "terse", "weight": 20, "params": {"max_tokens": 5}},
        },
        "allow_override": True,
    }
}
MODELS = {"chat": {"provider": "a"}, "terse": {"provider": "b"}}


class _Request:
    def __init__(self, headers: dict[str, str] | None = None) -> None:
        self.headers = headers or {}


def FakeRequest(headers: dict[str, str] | None = None) -> Any:
    """Just the part of aiohttp's Request that experiments read: headers."""
    return _Request(headers)


def test_assignment_is_sticky_and_split_by_weight(make_settings) -> None:
    r = router(make_settings, MODELS, EXPERIMENT)
    exp = r.experiments["assistant"]
    for user in ("alice", "bob", "carol"):
        seen = {exp.assign(FakeRequest(), {"user": user}, r.rng)[0].name for _ in range(1000)}
        assert len(seen) == 1
    counts = Counter(
        exp.assign(FakeRequest(), {"user": f"u{i}"}, r.rng)[0].name for i in range(10_000)
    )
    assert 0.78 <= counts["control"] / 10_000 <= 0.82


def test_assignment_agrees_across_processes() -> None:
    keys = [f"user-{i}" for i in range(50)]
    here = [round(bucket("prompt-style", k), 12) for k in keys]
    code = (
        "from inference_server.routing import bucket;"
        f"print([round(bucket('prompt-style', k), 12) for k in {keys!r}])"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert other.stdout.strip() == str(here)


def test_key_kinds_and_forcing(make_settings) -> None:
    exp_cfg = {"e": {**EXPERIMENT["prompt-style"], "key": "header:x-session-id"}}
    r = router(make_settings, MODELS, exp_cfg)
    exp = r.experiments["assistant"]
    a = exp.assign(FakeRequest({"x-session-id": "s1"}), {}, r.rng)
    assert a == exp.assign(FakeRequest({"x-session-id": "s1"}), {}, r.rng)
    assert a[1] == "sticky"
    forced = exp.assign(FakeRequest({"x-inference-variant": "e/terse"}), {}, r.rng)
    assert forced == (exp.by_name["terse"], "forced")
    from inference_server.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        exp.assign(FakeRequest({"x-inference-variant": "nope"}), {}, r.rng)
    assert exp.assign(FakeRequest(), {}, r.rng)[1] == "random"  # no key: not sticky, said so


def test_api_key_assignment_uses_the_bearer_token(make_settings) -> None:
    r = router(make_settings, MODELS, {"e": {**EXPERIMENT["prompt-style"], "key": "api_key"}})
    exp = r.experiments["assistant"]
    one = exp.assign(FakeRequest({"Authorization": "Bearer k1"}), {}, r.rng)
    assert all(
        exp.assign(FakeRequest({"Authorization": "Bearer k1"}), {}, r.rng) == one
        for _ in range(100)
    )
