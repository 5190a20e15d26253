"""Issue 16, in process: /health/live and /health/ready (draining), hot reload through
``POST /admin/reload`` (valid, invalid, what carries over, what needs a restart) and a stream in
flight across a reload.  The SIGHUP and replica paths are in tests/process/test_replicas.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from inference_server_mock import MockProvider

from inference_server.app import create_app
from inference_server.keys import RUNTIME
from inference_server.providers.base import Provider, ProviderConfig, ProviderPlugin
from inference_server.reload import RELOADER
from inference_server.settings import load_settings
from tests.conftest import SettingsFactory
from tests.support.fake_upstream import Action, FakeUpstream

TOKEN = "admin-secret-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
USER = [{"role": "user", "content": "hi"}]
Client = TestClient[web.Request, web.Application]


def lm(url: str) -> dict[str, Any]:
    return {"plugin": "lmstudio", "base_url": url}


def config(providers: dict[str, Any], models: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "server": {"admin_token": TOKEN},
        "providers": providers,
        "models": models,
        **extra,
    }


@pytest.fixture
def reloadable(
    make_settings: SettingsFactory, tmp_path: Path, aiohttp_client: Any
) -> Callable[[dict[str, Any]], Awaitable[Client]]:
    """A gateway whose loader re-reads the settings file ``make_settings`` writes."""

    async def make(cfg: dict[str, Any]) -> Client:
        settings = make_settings(cfg)
        app = create_app(settings, lambda: load_settings(tmp_path / "settings.yaml"))
        client: Client = await aiohttp_client(app)
        return client

    return make


async def chat(client: Client, model: str = "chat") -> Any:
    return await client.post("/v1/chat/completions", json={"model": model, "messages": USER})


# --- live / ready ---------------------------------------------------------------------------


async def test_live_and_ready_answer_and_ready_drops_while_draining(gateway_for: Any) -> None:
    client = await gateway_for()
    live = await client.get("/health/live")
    assert live.status == 200
    assert await live.json() == {"status": "ok"}
    ready = await client.get("/health/ready")
    assert ready.status == 200
    assert await ready.json() == {"status": "ready", "generation": 0}

    client.app[RUNTIME].draining = True  # what server.drain sets on SIGTERM
    ready = await client.get("/health/ready")
    assert ready.status == 503
    body = await ready.json()
    assert body["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert "draining" in body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    # Liveness stays up (the process still serves), and so do requests and the seed's /health.
    assert (await client.get("/health/live")).status == 200
    assert (await chat(client, "gpt-oss-20b")).status == 200
    health = await client.get("/health")
    assert health.status == 200
    assert {"status", "provider", "http_config"} <= set(await health.json())


async def test_live_and_ready_do_not_depend_on_upstreams(
    gateway_for: Any, fake_upstream: FakeUpstream
) -> None:
    """A probe that called upstreams would have an orchestrator restart (live) or drain
    (ready) every replica at once when a provider is down; /health is where that shows."""
    client = await gateway_for()
    fake_upstream.models_echo_status = 500  # the provider's health probe fails
    assert (await client.get("/health")).status == 503
    assert (await client.get("/health/live")).status == 200
    assert (await client.get("/health/ready")).status == 200


# --- reload ---------------------------------------------------------------------------------


async def test_reload_swaps_routes_and_providers(
    reloadable: Any, make_settings: SettingsFactory, make_fake_upstream: Any
) -> None:
    a, b = await make_fake_upstream(), await make_fake_upstream()
    client = await reloadable(config({"a": lm(a.base_url)}, {"chat": {"provider": "a"}}))
    assert (await chat(client)).status == 200
    assert len(a.requests) == 1

    make_settings(
        config(
            {"a": lm(a.base_url), "b": lm(b.base_url)},
            {"chat": {"provider": "b", "upstream_model": "m2"}, "other": {"provider": "a"}},
        )
    )
    resp = await client.post("/admin/reload", headers=ADMIN)
    assert resp.status == 200, await resp.text()
    report = await resp.json()
    assert report["generation"] == 1
    assert report["new_providers"] == ["b"]  # a's settings are unchanged: the same object
    assert "models" in report["changed"]
    assert "providers" in report["changed"]
    assert report["restart_required"] == []

    resp = await chat(client)
    assert resp.status == 200
    assert resp.headers["x-inference-deployment"] == "b/m2"
    assert b.requests[-1]["model"] == "m2"
    assert (await chat(client, "other")).status == 200
    assert len(a.requests) == 2
    ready = await (await client.get("/health/ready")).json()
    assert ready["generation"] == 1
    models = await (await client.get("/v1/models")).json()
    assert {m["id"] for m in models["data"]} == {"chat", "other"}


async def test_an_invalid_file_is_rejected_with_reasons_and_the_old_settings_kept(
    reloadable: Any, make_settings: SettingsFactory, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    cfg = config({"a": lm(fake_upstream.base_url)}, {"chat": {"provider": "a"}})
    client = await reloadable(cfg)
    # Two problems: an unknown key and a route naming a provider that does not exist.
    bad = config(
        {"a": lm(fake_upstream.base_url)}, {"chat": {"provider": "nope"}}, routing={"bogus": 1}
    )
    (tmp_path / "settings.yaml").write_text(
        json.dumps({"default": {"logging": {"level": "warning"}, **bad}})
    )
    resp = await client.post("/admin/reload", headers=ADMIN)
    assert resp.status == 422
    err = (await resp.json())["error"]
    assert err["code"] == "INVALID_SETTINGS"
    assert err["type"] == "invalid_request_error"
    assert "bogus" in err["message"]
    assert "nope" in err["message"]
    # Nothing changed: same generation, same route, still served.
    assert (await (await client.get("/health/ready")).json())["generation"] == 0
    resp = await chat(client)
    assert resp.status == 200
    assert resp.headers["x-inference-deployment"] == "a/chat"
    # A YAML syntax error is rejected the same way.
    (tmp_path / "settings.yaml").write_text("default: [unclosed\n")
    resp = await client.post("/admin/reload", headers=ADMIN)
    assert resp.status == 422
    assert (await chat(client)).status == 200


async def test_reload_needs_the_admin_token(reloadable: Any, fake_upstream: FakeUpstream) -> None:
    client = await reloadable(
        config({"a": lm(fake_upstream.base_url)}, {"chat": {"provider": "a"}})
    )
    assert (await client.post("/admin/reload")).status == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await client.post("/admin/reload", headers=wrong)).status == 401
    assert (await (await client.get("/health/ready")).json())["generation"] == 0


async def test_a_gateway_without_a_settings_source_refuses_to_reload(
    make_settings: SettingsFactory, make_gateway: Any, fake_upstream: FakeUpstream
) -> None:
    client = await make_gateway(
        make_settings(config({"a": lm(fake_upstream.base_url)}, {"chat": {"provider": "a"}}))
    )
    resp = await client.post("/admin/reload", headers=ADMIN)
    assert resp.status == 503
    assert "settings file" in (await resp.json())["error"]["message"]


async def test_settings_that_need_a_restart_are_reported_and_not_applied(
    reloadable: Any, make_settings: SettingsFactory, fake_upstream: FakeUpstream
) -> None:
    cfg = config({"a": lm(fake_upstream.base_url)}, {"chat": {"provider": "a"}})
    client = await reloadable(cfg)
    make_settings(
        {**cfg, "server": {**cfg["server"], "port": 4999, "workers": 2, "max_body_bytes": 2048}}
    )
    report = await (await client.post("/admin/reload", headers=ADMIN)).json()
    assert {"server.port", "server.workers", "server.max_body_bytes"} <= set(
        report["restart_required"]
    )
    # The body limit in force is still the start-up one (10 MiB), not 2 KiB.
    big = [{"role": "user", "content": "x" * 4096}]
    resp = await client.post("/v1/chat/completions", json={"model": "chat", "messages": big})
    assert resp.status == 200


async def test_breaker_state_of_unchanged_deployments_survives_a_reload(
    reloadable: Any, make_settings: SettingsFactory, make_fake_upstream: Any
) -> None:
    a, b = await make_fake_upstream(), await make_fake_upstream()
    cfg = config(
        {"a": lm(a.base_url), "b": lm(b.base_url)},
        {
            "chat": {"provider": "a", "upstream_model": "m"},
            "second": {"provider": "b", "upstream_model": "m"},
        },
        routing={"panic": False, "breaker": {"consecutive_failures": 1, "cooldown_secs": 60}},
        inference={"max_retries": 0},
    )
    client = await reloadable(cfg)
    a.always = b.always = Action("status", 500, {"error": {"message": "down"}})
    assert (await chat(client, "chat")).status == 502
    assert (await chat(client, "second")).status == 502
    a.always = b.always = None

    # Reload: route "chat" unchanged (a/m), "second" now on another upstream model (b/m2),
    # and a new route.
    cfg["models"]["second"] = {"provider": "b", "upstream_model": "m2"}
    cfg["models"]["third"] = {"provider": "a", "upstream_model": "m3"}
    make_settings(cfg)
    report = await (await client.post("/admin/reload", headers=ADMIN)).json()
    assert report["carried_deployments"] == ["a/m"]
    assert report["new_providers"] == []

    deps = {
        dep_id: dep
        for route in (await (await client.get("/health")).json())["routes"].values()
        for dep_id, dep in route["deployments"].items()
    }
    assert deps["a/m"]["breaker"] == "open"  # carried: still out, still refusing
    assert deps["a/m"]["last_error"]["code"] == "PROVIDER_ERROR"
    assert deps["b/m2"]["breaker"] == "closed"  # changed: fresh
    assert deps["a/m3"]["breaker"] == "closed"
    resp = await chat(client, "chat")
    assert resp.status == 503  # panic off: the open breaker refuses, nothing sent
    assert (await resp.json())["error"]["code"] == "NO_DEPLOYMENT_AVAILABLE"
    assert len(a.requests) == 1
    assert (await chat(client, "second")).status == 200
    # The removed deployment's breaker leaves /metrics; the carried one's stays "open".
    text = await (await client.get("/metrics")).text()
    states = [
        line for line in text.splitlines() if line.startswith("inference_circuit_breaker_state{")
    ]
    assert not [line for line in states if 'deployment="b/m"' in line], states
    assert any(
        'deployment="a/m"' in ln and 'state="open"' in ln and ln.endswith(" 1.0") for ln in states
    )


async def test_a_stream_in_flight_finishes_on_the_runtime_it_started_with(
    reloadable: Any, make_settings: SettingsFactory, make_fake_upstream: Any
) -> None:
    a, b = await make_fake_upstream(), await make_fake_upstream()
    client = await reloadable(config({"a": lm(a.base_url)}, {"chat": {"provider": "a"}}))
    a.script(Action(chunks=6, interval=0.1))
    resp = await client.post(
        "/v1/chat/completions", json={"model": "chat", "messages": USER, "stream": True}
    )
    assert resp.status == 200
    first = await resp.content.readline()
    assert first.startswith(b"data: ")

    # Reload while the stream runs: provider a is gone, chat now goes to b.
    make_settings(config({"b": lm(b.base_url)}, {"chat": {"provider": "b"}}))
    report = await (await client.post("/admin/reload", headers=ADMIN)).json()
    assert report["generation"] == 1
    reloader = client.app[RELOADER]
    assert len(reloader.retiring) == 1  # provider a waits for the stream before it closes

    resp2 = await chat(client)
    assert resp2.headers["x-inference-deployment"] == "b/chat"

    rest = (await resp.content.read()).decode()
    assert rest.rstrip().endswith("data: [DONE]")
    assert "tok5" in rest
    assert '"error"' not in rest
    assert a.finished_streams == 1
    async with asyncio.timeout(5):
        while reloader.retiring:  # closed once the stream ended
            await asyncio.sleep(0.01)


async def test_limits_and_cache_settings_reload(
    reloadable: Any, make_settings: SettingsFactory, fake_upstream: FakeUpstream
) -> None:
    cfg = config(
        {"a": lm(fake_upstream.base_url)},
        {"chat": {"provider": "a"}},
        limits={"global": {"rpm": 1}},
    )
    client = await reloadable(cfg)
    assert (await chat(client)).status == 200
    limited = await chat(client)
    assert limited.status == 429
    assert (await limited.json())["error"]["code"] == "RATE_LIMITED"

    make_settings({**cfg, "limits": {"global": {"rpm": 1000}}, "cache": {"enabled": True}})
    report = await (await client.post("/admin/reload", headers=ADMIN)).json()
    assert {"limits", "cache"} <= set(report["changed"])
    first = await chat(client)
    assert first.status == 200
    assert first.headers["x-inference-cache"] == "miss"
    second = await chat(client)
    assert second.status == 200
    assert second.headers["x-inference-cache"] == "hit"
    assert second.headers["x-ratelimit-limit-requests"] == "1000"


async def test_concurrent_reloads_run_one_at_a_time(
    reloadable: Any, make_settings: SettingsFactory, fake_upstream: FakeUpstream
) -> None:
    cfg = config({"a": lm(fake_upstream.base_url)}, {"chat": {"provider": "a"}})
    client = await reloadable(cfg)
    make_settings({**cfg, "models": {**cfg["models"], "x": {"provider": "a"}}})
    answers = await asyncio.gather(*(client.post("/admin/reload", headers=ADMIN) for _ in range(3)))
    generations = sorted([(await r.json())["generation"] for r in answers])
    assert generations == [1, 2, 3]
    assert (await chat(client, "x")).status == 200


def exploding(session: aiohttp.ClientSession, config: ProviderConfig) -> Provider:
    """A plugin factory that fails for one base URL (what start-up would die of)."""
    if "explode" in config.base_url:
        raise RuntimeError("cannot build this provider")
    return MockProvider(session, config)


async def test_a_provider_that_cannot_be_built_rejects_the_reload(
    make_settings: SettingsFactory, tmp_path: Path, aiohttp_client: Any
) -> None:
    plugins = {"boom": ProviderPlugin(name="boom", factory=exploding, default_base_url="x://y")}
    cfg = config({"a": {"plugin": "boom"}}, {"chat": {"provider": "a"}})
    settings = make_settings(cfg, plugins=plugins)
    loader = lambda: load_settings(tmp_path / "settings.yaml", plugins=plugins)  # noqa: E731
    client: Client = await aiohttp_client(create_app(settings, loader))
    cfg["providers"]["b"] = {"plugin": "boom", "base_url": "x://explode"}
    make_settings(cfg, plugins=plugins)
    resp = await client.post("/admin/reload", headers=ADMIN)
    assert resp.status == 422
    err = (await resp.json())["error"]
    assert err["code"] == "INVALID_SETTINGS"
    assert "provider b: cannot build this provider" in err["message"]
    assert (await (await client.get("/health/ready")).json())["generation"] == 0
    assert (await chat(client)).status == 200
