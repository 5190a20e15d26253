"""GET /metrics of a running gateway after real traffic through fake upstreams: retries,
fallbacks, breakers, A/B variants, shadows and errors show up as the series a dashboard reads."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.observability.conftest import check_metrics, series, value
from tests.support.fake_upstream import Action, FakeUpstream

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
QUIET = {"logging": {"level": "error"}}


def lm(url: str) -> dict[str, Any]:
    return {"plugin": "lmstudio", "base_url": url}


async def scrape(client: Any) -> str:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text: str = await resp.text()
    return text


async def test_stream_with_a_retry(gateway_for, fake_upstream: FakeUpstream, promtool: str) -> None:
    client = await gateway_for({"max_retries": 1}, **QUIET)
    fake_upstream.script(Action("status", 500, {"error": "once"}), Action(chunks=4))
    resp = await client.post(
        CHAT,
        json={"messages": USER, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert resp.status == 200
    await resp.read()
    out = await scrape(client)
    ok = {"endpoint": CHAT, "model": "gpt-oss-20b", "status_class": "2xx", "error_code": ""}
    assert value(out, "inference_requests_total", **ok) == 1
    assert value(out, "inference_requests_in_flight", endpoint=CHAT) == 0
    assert value(out, "inference_request_duration_seconds_count", stream="true") == 1
    assert value(out, "inference_upstream_retries_total") == 1
    attempts = "gen_ai_client_operation_duration_seconds_count"
    assert value(out, attempts, outcome="PROVIDER_ERROR") == 1
    assert value(out, attempts, outcome="ok") == 1
    assert value(out, "gen_ai_server_time_to_first_token_seconds_count") == 1
    assert value(out, "gen_ai_server_time_per_output_token_seconds_count") == 1
    assert value(out, "inference_tokens_total", token_type="input") == 5
    assert value(out, "inference_tokens_total", token_type="output") == 4
    assert value(out, "inference_gateway_overhead_seconds_count", stream="true") == 1
    # Every series is labelled by configuration, never by the raw path or a client id.
    assert {s["endpoint"] for s in series(out, "inference_requests_total")} == {CHAT}
    check_metrics(promtool, out)


async def test_fallback_breaker_and_errors(make_settings, make_gateway, make_fake_upstream) -> None:
    a, b = await make_fake_upstream(), await make_fake_upstream()
    settings = make_settings(
        {
            **QUIET,
            "inference": {"max_retries": 0},
            "providers": {"a": lm(a.base_url), "b": lm(b.base_url)},
            "models": {
                "chat": {"provider": "a", "upstream_model": "small", "fallbacks": ["backup"]},
                "backup": {"provider": "b", "upstream_model": "other"},
            },
            "routing": {"breaker": {"consecutive_failures": 1, "cooldown_secs": 60}},
        }
    )
    client = await make_gateway(settings)
    before = await scrape(client)
    assert (
        value(before, "inference_circuit_breaker_state", deployment="a/small", state="closed") == 1
    )
    a.script(Action("status", 503, "busy"))
    resp = await client.post(CHAT, json={"model": "chat", "messages": USER})
    assert resp.status == 200
    resp = await client.post(CHAT, json={"model": "nope", "messages": USER})
    assert resp.status == 404
    out = await scrape(client)
    assert value(out, "inference_fallbacks_total", from_route="chat", to_route="backup") == 1
    assert value(out, "inference_requests_total", route="chat", deployment="b/other") == 1
    transitions = "inference_circuit_breaker_transitions_total"
    assert value(out, transitions, deployment="a/small", from_state="closed", to_state="open") == 1
    assert value(out, "inference_circuit_breaker_state", deployment="a/small", state="open") == 1
    assert value(out, "inference_circuit_breaker_state", deployment="a/small", state="closed") == 0
    not_found = {"model": "", "status_class": "4xx", "error_code": "MODEL_NOT_FOUND"}
    assert value(out, "inference_requests_total", **not_found) == 1
    assert "nope" not in out  # a client's unknown model name never becomes a label


async def test_variants_and_shadows(make_settings, make_gateway, make_fake_upstream) -> None:
    a, b, s = [await make_fake_upstream() for _ in range(3)]
    experiment = {
        "model": "assistant",
        "key": "user",
        "variants": {
            "control": {"model": "chat", "weight": 50},
            "terse": {"model": "chat-terse", "weight": 50},
        },
        "shadow": {"model": "candidate", "fraction": 1.0},
    }
    settings = make_settings(
        {
            **QUIET,
            "providers": {"a": lm(a.base_url), "b": lm(b.base_url), "s": lm(s.base_url)},
            "models": {
                "chat": {"provider": "a", "upstream_model": "control-m"},
                "chat-terse": {"provider": "b", "upstream_model": "terse-m"},
                "candidate": {"provider": "s", "upstream_model": "cand-m"},
            },
            "experiments": {"style": experiment},
        }
    )
    client = await make_gateway(settings)
    for i in range(20):
        resp = await client.post(
            CHAT, json={"model": "assistant", "messages": USER, "user": f"u{i}"}
        )
        assert resp.status == 200
    for _ in range(100):  # bounded wait for the background shadow calls
        out = await scrape(client)
        if value(out, "inference_shadow_requests_total", experiment="style") == 20:
            break
        await asyncio.sleep(0.05)
    variants = "inference_experiment_requests_total"
    assert value(out, variants, experiment="style") == 20
    assert value(out, variants, variant="control") == len(a.requests)
    assert value(out, variants, variant="terse") == len(b.requests)
    assert value(
        out, "inference_experiment_tokens_total", variant="terse", token_type="output"
    ) == (7 * len(b.requests))
    assert value(out, "inference_shadow_requests_total", experiment="style", outcome="ok") == 20


async def test_metrics_can_be_turned_off(gateway_for) -> None:
    client = await gateway_for(metrics={"enabled": False}, **QUIET)
    assert (await client.get("/metrics")).status == 404


async def test_a_spray_of_huge_model_names_leaves_nothing_behind(
    gateway_for, fake_upstream: FakeUpstream
) -> None:
    """Issue 11 (4): 300 requests with distinct model names of the longest valid length (the
    shorthand serves any name) count as model="other"; the names the provider lists keep their
    own label; no metrics table grows and /metrics stays small.  (A 100 KB name is a 400 now.)"""
    import aiohttp

    from inference_server.keys import METRICS

    client = await gateway_for(**QUIET)
    metrics = client.app[METRICS]
    resp = await client.post(CHAT, json={"model": "llama-2-7b", "messages": USER})  # listed
    assert resp.status == 200
    # (x-inference-deployment echoes the upstream model: a client that reads such headers)
    async with aiohttp.ClientSession(max_line_size=200_000, max_field_size=200_000) as session:
        for i in range(300):
            name = f"{i:03d}" + "x" * 253  # 256 characters: the longest valid model name
            body = {"model": name, "messages": USER}
            async with session.post(client.make_url(CHAT), json=body) as resp:
                assert resp.status == 200
                await resp.read()
    huge = await client.post(CHAT, json={"model": "x" * 100_000, "messages": USER})
    assert huge.status == 400
    out = await scrape(client)
    assert len(out) < 60_000
    assert "xxxxxxxxxx" not in out
    assert value(out, "inference_requests_total", endpoint=CHAT, model="other") == 300
    assert value(out, "inference_requests_total", endpoint=CHAT, model="llama-2-7b") == 1
    assert len(metrics._bundles) <= 4
    assert len(metrics._children) <= 40
    stored = [k for t in metrics._names.values() for k in t] + list(metrics._listed)
    assert max(len(k) for k in stored) <= 100
    assert all(len(s) <= 100 for key in metrics._bundles for s in key)


async def test_the_providers_model_list_is_re_read(
    gateway_for, fake_upstream: FakeUpstream, monkeypatch: Any
) -> None:
    """A model the provider starts listing later gets its own label after the next read."""
    from inference_server import app as app_module
    from inference_server.keys import METRICS

    monkeypatch.setattr(app_module, "LISTED_MODELS_REFRESH_SECS", 0.02)
    client = await gateway_for({"models_cache_secs": 0}, **QUIET)
    metrics = client.app[METRICS]
    assert metrics._label("model", "new-model") == "other"
    fake_upstream.models = ("gpt-oss-20b", "new-model")
    for _ in range(250):  # bounded: 5 s at most
        if metrics._label("model", "new-model") == "new-model":
            break
        await asyncio.sleep(0.02)
    assert metrics._label("model", "new-model") == "new-model"
    resp = await client.post(CHAT, json={"model": "new-model", "messages": USER})
    assert resp.status == 200
    assert value(await scrape(client), "inference_requests_total", model="new-model") == 1
