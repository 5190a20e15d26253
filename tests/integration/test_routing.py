"""Routing and resilience end to end: fake upstreams on free ports whose failures tests script."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.support.fake_upstream import Action, FakeUpstream
from tests.support.procs import free_port

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
FAST = {"inference": {"max_retries": 1}, "logging": {"level": "error"}}


async def gateway(
    make_settings, make_gateway, providers: dict[str, Any], models: dict[str, Any], **extra: Any
):
    settings = make_settings({**FAST, "providers": providers, "models": models, **extra})
    return await make_gateway(settings)


def lm(url: str) -> dict[str, Any]:
    return {"plugin": "lmstudio", "base_url": url}


async def two_deployments(
    make_settings, make_gateway, make_fake_upstream, strategy: str = "priority"
) -> tuple[Any, FakeUpstream, FakeUpstream]:
    """A gateway whose route "chat" has deployments a/m and b/m on two fake upstreams."""
    a, b = await make_fake_upstream(), await make_fake_upstream()
    client = await gateway(
        make_settings,
        make_gateway,
        {"a": lm(a.base_url), "b": lm(b.base_url)},
        {
            "chat": {
                "strategy": strategy,
                "deployments": [
                    {"provider": "a", "upstream_model": "m"},
                    {"provider": "b", "upstream_model": "m"},
                ],
            }
        },
    )
    return client, a, b


async def test_dead_deployment_is_absorbed_and_breaker_shows_in_health(
    make_settings, make_gateway, fake_upstream: FakeUpstream
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    client = await gateway(
        make_settings,
        make_gateway,
        {"dead": lm(dead), "live": lm(fake_upstream.base_url)},
        {
            "chat": {
                "strategy": "round_robin",
                "deployments": [
                    {"provider": "dead", "upstream_model": "m"},
                    {"provider": "live", "upstream_model": "m"},
                ],
            }
        },
        routing={"breaker": {"consecutive_failures": 2, "cooldown_secs": 60}},
    )
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    attempts = []
    for _ in range(20):
        raw = await sdk.chat.completions.with_raw_response.create(model="chat", messages=USER)
        assert raw.headers["x-inference-deployment"] == "live/m"
        attempts.append(int(raw.headers["x-inference-attempts"]))
    # Every request succeeded; once the breaker opened, the dead one was not even tried.
    assert attempts[-10:] == [1] * 10
    health = await (await client.get("/health")).json()
    assert health["status"] == "degraded"
    deps = health["routes"]["chat"]["deployments"]
    assert deps["dead/m"]["breaker"] == "open"
    assert deps["dead/m"]["available"] is False
    assert deps["live/m"]["available"] is True
    await sdk.close()


async def test_fallback_order_headers_and_typed_fallback(
    make_settings, make_gateway, make_fake_upstream
) -> None:
    a, b, c = [await make_fake_upstream() for _ in range(3)]
    client = await gateway(
        make_settings,
        make_gateway,
        {"a": lm(a.base_url), "b": lm(b.base_url), "c": lm(c.base_url)},
        {
            "chat": {
                "provider": "a",
                "upstream_model": "small",
                "fallbacks": ["backup"],
                "context_window_fallbacks": ["long"],
            },
            "backup": {"provider": "b", "upstream_model": "other"},
            "long": {"provider": "c", "upstream_model": "big-ctx"},
        },
    )
    a.script(Action("status", 503, "busy"))
    resp = await client.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
    assert resp.status == 200
    assert resp.headers["x-inference-deployment"] == "b/other"
    assert resp.headers["x-inference-attempts"] == "2"
    assert b.requests[-1]["model"] == "other"
    a.script(
        Action("status", 400, {"error": {"message": "too long", "code": "context_length_exceeded"}})
    )
    resp = await client.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
    assert resp.status == 200
    assert resp.headers["x-inference-deployment"] == "c/big-ctx"
    # A plain 400 has no typed fallback: it goes back to the client as is, once.
    a.script(Action("status", 400, {"error": {"message": "bad", "code": "invalid_value"}}))
    resp = await client.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
    assert resp.status == 400
    assert resp.headers["x-inference-attempts"] == "1"


async def test_budget_caps_attempts(make_settings, make_gateway, make_fake_upstream) -> None:
    ups = [await make_fake_upstream() for _ in range(3)]
    for u in ups:
        u.script(*[Action("status", 500, "x")] * 5)
    client = await gateway(
        make_settings,
        make_gateway,
        {f"p{i}": lm(u.base_url) for i, u in enumerate(ups)},
        {"chat": {"deployments": [{"provider": f"p{i}", "upstream_model": "m"} for i in range(3)]}},
        routing={"max_attempts": 4, "breaker": {"enabled": False}},
        inference={"max_retries": 5},
    )
    resp = await client.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
    assert resp.status == 502
    assert resp.headers["x-inference-attempts"] == "4"
    assert sum(len(u.requests) for u in ups) == 4


async def test_429_moves_on_and_pauses_that_deployment(
    make_settings, make_gateway, make_fake_upstream
) -> None:
    client, a, _b = await two_deployments(make_settings, make_gateway, make_fake_upstream)
    a.script(Action("status", 429, {"error": {"message": "slow"}}, headers={"Retry-After": "30"}))
    r1 = await client.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
    assert r1.headers["x-inference-deployment"] == "b/m"
    r2 = await client.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
    assert r2.headers["x-inference-deployment"] == "b/m"  # a is paused for its Retry-After
    assert len(a.requests) == 1


async def test_no_deployment_available_is_503_when_panic_is_off(
    make_settings, make_gateway
) -> None:
    client = await gateway(
        make_settings,
        make_gateway,
        {"dead": lm(f"http://127.0.0.1:{free_port()}/v1")},
        {"chat": {"provider": "dead"}},
        routing={"panic": False, "breaker": {"consecutive_failures": 1, "cooldown_secs": 60}},
        inference={"max_retries": 0},
    )
    first = await client.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
    assert first.status == 502
    second = await client.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
    assert second.status == 503
    err = (await second.json())["error"]
    assert err["code"] == "NO_DEPLOYMENT_AVAILABLE"
    # The refusal names the cause: the deployment's last error.
    assert "dead/chat: PROVIDER_CONNECTION_FAILED" in err["message"]
    assert 55 <= int(second.headers["Retry-After"]) <= 60  # the real time to the next probe
    health = await client.get("/health")
    assert health.status == 503
    assert (await health.json())["status"] == "unhealthy"


async def test_streams_fall_back_before_the_first_byte_only(
    make_settings, make_gateway, make_fake_upstream
) -> None:
    client, a, b = await two_deployments(make_settings, make_gateway, make_fake_upstream)
    a.script(Action("status", 500, "down"))
    resp = await client.post(
        "/v1/chat/completions", json={"model": "chat", "messages": USER, "stream": True}
    )
    assert resp.headers["x-inference-deployment"] == "b/m"
    assert (await resp.text()).rstrip().endswith("data: [DONE]")
    a.script(Action("cut", chunks=6))
    resp = await client.post(
        "/v1/chat/completions", json={"model": "chat", "messages": USER, "stream": True}
    )
    assert resp.headers["x-inference-deployment"] == "a/m"
    text = await resp.text()
    assert "[DONE]" not in text
    assert json.loads(text.strip().split("\n\n")[-1][6:])["error"]["code"] == "STREAM_INTERRUPTED"
    assert len(b.requests) == 1  # never switched after the first byte


async def test_deployment_params_and_timeouts(make_settings, make_gateway, fake_upstream) -> None:
    client = await gateway(
        make_settings,
        make_gateway,
        {"p": lm(fake_upstream.base_url)},
        {
            "chat": {
                "provider": "p",
                "upstream_model": "m",
                "params": {"temperature": 0.2, "top_p": 0.5},
                "timeout_secs": 0.2,
            }
        },
        inference={"max_retries": 0},
    )
    await client.post(
        "/v1/chat/completions", json={"model": "chat", "messages": USER, "top_p": 0.9}
    )
    sent = fake_upstream.requests[-1]
    assert (sent["temperature"], sent["top_p"]) == (0.2, 0.9)  # params are defaults
    fake_upstream.script(Action(delay=1))
    slow = await client.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
    assert slow.status == 504


async def test_alias_and_models_list(make_settings, make_gateway, fake_upstream) -> None:
    client = await gateway(
        make_settings,
        make_gateway,
        {"p": lm(fake_upstream.base_url)},
        {"chat": {"provider": "p", "upstream_model": "m"}, "gpt-latest": {"alias": "chat"}},
    )
    resp = await client.post("/v1/chat/completions", json={"model": "gpt-latest", "messages": USER})
    assert resp.headers["x-inference-deployment"] == "p/m"
    models = await (await client.get("/v1/models")).json()
    assert [(m["id"], m["owned_by"]) for m in models["data"]] == [
        ("chat", "p"),
        ("gpt-latest", "p"),
    ]
    missing = await client.post("/v1/chat/completions", json={"model": "nope", "messages": USER})
    assert missing.status == 404


# --- A/B tests --------------------------------------------------------------------------------


def experiment_settings(
    a: FakeUpstream, b: FakeUpstream, shadow: FakeUpstream | None = None, fraction: float = 1.0
) -> dict[str, Any]:
    providers = {"a": lm(a.base_url), "b": lm(b.base_url)}
    models: dict[str, Any] = {
        "chat": {"provider": "a", "upstream_model": "control-m"},
        "chat-terse": {"provider": "b", "upstream_model": "terse-m", "params": {"max_tokens": 7}},
    }
    exp: dict[str, Any] = {
        "model": "assistant",
        "key": "user",
        "variants": {
            "control": {"model": "chat", "weight": 80},
            "terse": {"model": "chat-terse", "weight": 20},
        },
    }
    if shadow is not None:
        providers["s"] = lm(shadow.base_url)
        models["candidate"] = {"provider": "s", "upstream_model": "cand-m"}
        exp["shadow"] = {"model": "candidate", "fraction": fraction}
    return {
        **FAST,
        "providers": providers,
        "models": models,
        "experiments": {"prompt-style": exp},
        "server": {"admin_token": "adm"},
    }


async def test_experiment_split_sticky_and_counted(
    make_settings, make_gateway, make_fake_upstream
) -> None:
    a, b = await make_fake_upstream(), await make_fake_upstream()
    client = await make_gateway(make_settings(experiment_settings(a, b)))
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="x", max_retries=0)
    seen: dict[str, set[str]] = {}
    for i in range(400):
        user = f"user-{i % 100}"
        raw = await sdk.chat.completions.with_raw_response.create(
            model="assistant", messages=USER, user=user
        )
        seen.setdefault(user, set()).add(raw.headers["x-inference-variant"])
    assert all(len(v) == 1 for v in seen.values())  # sticky per user
    split = Counter(next(iter(v)) for v in seen.values())
    assert 65 <= split["prompt-style/control"] <= 92  # 80 % of 100 users, binomial tolerance
    assert all(r["model"] == "terse-m" and r["max_tokens"] == 7 for r in b.requests)
    admin = await client.get("/admin/experiments", headers={"Authorization": "Bearer adm"})
    stats = (await admin.json())["data"]["prompt-style"]["variants"]
    assert stats["control"]["requests"] + stats["terse"]["requests"] == 400
    assert stats["control"]["requests"] == len(a.requests)
    assert stats["control"]["tokens"]["completion"] == 7 * len(a.requests)
    await sdk.close()


async def test_admin_endpoint_is_protected(make_settings, make_gateway, make_fake_upstream) -> None:
    a, b = await make_fake_upstream(), await make_fake_upstream()
    client = await make_gateway(make_settings(experiment_settings(a, b)))
    assert (await client.get("/admin/experiments")).status == 401
    wrong = await client.get("/admin/experiments", headers={"Authorization": "Bearer no"})
    assert (await wrong.json())["error"]["code"] == "UNAUTHORIZED"
    cfg = experiment_settings(a, b)
    del cfg["server"]
    off = await make_gateway(make_settings(cfg))
    assert (await off.get("/admin/experiments")).status == 403


async def test_shadow_traffic_is_recorded_and_not_awaited(
    make_settings, make_gateway, make_fake_upstream
) -> None:
    a, b, s = [await make_fake_upstream() for _ in range(3)]
    s.script(*[Action(delay=1.0)] * 3)  # a slow candidate
    client = await make_gateway(make_settings(experiment_settings(a, b, shadow=s)))
    loop = asyncio.get_running_loop()
    for i in range(3):
        started = loop.time()
        resp = await client.post(
            "/v1/chat/completions",
            json={"model": "assistant", "messages": USER, "user": f"u{i}", "stream": i == 2},
        )
        body = await resp.read()
        assert loop.time() - started < 0.8  # the primary never waits for the shadow
        assert resp.status == 200
        assert b"fake upstream" in body or b"tok0" in body
    for _ in range(50):  # bounded wait for the background shadows to finish
        admin = await (
            await client.get("/admin/experiments", headers={"Authorization": "Bearer adm"})
        ).json()
        if admin["data"]["prompt-style"]["shadow"]["requests"] == 3:
            break
        await asyncio.sleep(0.1)
    shadow = admin["data"]["prompt-style"]["shadow"]
    assert shadow["requests"] == 3
    assert shadow["errors"] == 0
    assert shadow["latency_ms"]["mean"] >= 1000
    assert all(r["model"] == "cand-m" and "stream" not in r for r in s.requests)


async def test_forced_variant_when_allowed(make_settings, make_gateway, make_fake_upstream) -> None:
    a, b = await make_fake_upstream(), await make_fake_upstream()
    cfg = experiment_settings(a, b)
    cfg["experiments"]["prompt-style"]["allow_override"] = True
    client = await make_gateway(make_settings(cfg))
    resp = await client.post(
        "/v1/chat/completions",
        json={"model": "assistant", "messages": USER},
        headers={"x-inference-variant": "terse"},
    )
    assert resp.headers["x-inference-variant"] == "prompt-style/terse"


@pytest.mark.parametrize(
    "strategy", ["priority", "weighted", "round_robin", "least_busy", "latency"]
)
async def test_every_strategy_serves(
    make_settings, make_gateway, make_fake_upstream, strategy: str
) -> None:
    client, a, b = await two_deployments(
        make_settings, make_gateway, make_fake_upstream, strategy=strategy
    )
    for _ in range(10):
        resp = await client.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
        assert resp.status == 200
    assert len(a.requests) + len(b.requests) == 10


async def test_active_health_check_takes_a_deployment_out(
    make_settings, make_gateway, make_fake_upstream
) -> None:
    a, b = await make_fake_upstream(), await make_fake_upstream()
    a.script(*[Action("status", 500, "sick")] * 1000)  # /v1/models fails: the check fails
    client = await gateway(
        make_settings,
        make_gateway,
        {"a": {**lm(a.base_url), "health_check_interval_secs": 0.1}, "b": lm(b.base_url)},
        {
            "chat": {
                "deployments": [
                    {"provider": "a", "upstream_model": "m"},
                    {"provider": "b", "upstream_model": "m"},
                ]
            }
        },
    )
    for _ in range(50):  # bounded wait for the first background check
        health = await (await client.get("/health")).json()
        if not health["routes"]["chat"]["deployments"]["a/m"]["healthy"]:
            break
        await asyncio.sleep(0.05)
    assert health["status"] == "degraded"
    assert health["routes"]["chat"]["deployments"]["a/m"]["available"] is False
    a.actions.clear()
    a.requests.clear()
    resp = await client.post("/v1/chat/completions", json={"model": "chat", "messages": USER})
    assert resp.headers["x-inference-deployment"] == "b/m"
    assert resp.headers["x-inference-attempts"] == "1"
    assert a.requests == []
