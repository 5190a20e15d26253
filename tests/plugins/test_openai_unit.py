"""Unit tier for the openai plugin: real aiohttp calls answered by aioresponses (``http_mock``).

What is pinned here and why: the headers OpenAI needs (auth, organization, project), the
``max_tokens`` rename for reasoning models (configured and learned from a 400), how each upstream
failure reaches a client through the gateway (401 → 502 PROVIDER_AUTH_FAILED, 429 keeps its
Retry-After, ...), and that the API key never shows up in a response, a log line or
``--print-config``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from inference_server_openai import OpenAIProvider, plugin
from loguru import logger
from yarl import URL

from inference_server.providers import (
    CallContext,
    ProviderAuthFailed,
    ProviderRejected,
)
from inference_server.settings import ConfigError, Settings
from tests.conftest import GatewayFactory, SettingsFactory

OPENAI = "https://api.openai.com/v1"
CHAT_URL = f"{OPENAI}/chat/completions"
MODELS_URL = f"{OPENAI}/models"
API_KEY = "sk-unit-test-0123456789abcdefSECRET"
KEY_ENV = {"INFERENCE_SECRETS__OPENAI_API_KEY": API_KEY}
REPO = Path(__file__).resolve().parents[2]


def completion(model: str = "gpt-4o-mini", text: str = "hi") -> dict[str, Any]:
    return {
        "id": "chatcmpl-unit",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


UNSUPPORTED_MAX_TOKENS = {
    "error": {
        "code": "unsupported_parameter",
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
        "Use 'max_completion_tokens' instead.",
        "param": "max_tokens",
        "type": "invalid_request_error",
    }
}


def openai_settings(
    make_settings: SettingsFactory, provider: dict[str, Any] | None = None, **config: Any
) -> Settings:
    """A gateway with one openai provider 'oa' (key from the environment) and a model table."""
    section = {"plugin": "openai", "api_key": "@secret openai_api_key", **(provider or {})}
    models = {
        "gpt-4o-mini": {"provider": "oa"},
        "o3-mini": {"provider": "oa"},
        "thinker": {"provider": "oa", "upstream_model": "gpt-5-mini"},
    }
    return make_settings(
        {"providers": {"oa": section}, "models": models, **config},
        env=KEY_ENV,
        plugins={"openai": plugin},
    )


@pytest.fixture
def make_provider(
    make_settings: SettingsFactory, session: aiohttp.ClientSession
) -> Callable[..., OpenAIProvider]:
    """The plugin's provider built from real settings (so plugin defaults are applied)."""

    def make(**provider: Any) -> OpenAIProvider:
        settings = openai_settings(make_settings, provider)
        built = plugin.factory(session, settings.providers["oa"])
        assert isinstance(built, OpenAIProvider)
        return built

    return make


def call(provider: OpenAIProvider, model: str = "gpt-4o-mini", **kw: Any) -> CallContext:
    return CallContext(
        request_id="req_unit", upstream_model=model, timeouts=provider.config.timeouts, **kw
    )


def chat_request(**extra: Any) -> dict[str, Any]:
    return {"model": "x", "messages": [{"role": "user", "content": "hi"}], **extra}


def sent(mock: aioresponses, url: str = CHAT_URL, method: str = "POST") -> list[dict[str, Any]]:
    """What the provider sent to ``url``: headers and the decoded JSON body of each call."""
    calls = mock.requests.get((method, URL(url)), [])
    out = []
    for c in calls:
        data = c.kwargs.get("data")
        out.append(
            {
                "headers": dict(c.kwargs.get("headers") or {}),
                "body": json.loads(data) if data else None,
            }
        )
    return out


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """Every log record at every level: loguru (the core) and stdlib logging (plugins, aiohttp)."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m) + repr(m.record["extra"])), level=0)
    caplog.set_level(logging.DEBUG)
    try:
        yield lines
    finally:
        logger.remove(sink)
        lines.extend(r.getMessage() for r in caplog.records)


# --- headers and URL ---------------------------------------------------------------------------


async def test_sends_bearer_key_org_and_project_to_openai(
    make_provider: Callable[..., OpenAIProvider], http_mock: aioresponses
) -> None:
    http_mock.post(CHAT_URL, payload=completion())
    provider = make_provider(organization="org-abc", project="proj_xyz")
    result = await provider.chat(chat_request(), call(provider))
    assert result["choices"][0]["message"]["content"] == "hi"
    [req] = sent(http_mock)
    headers = req["headers"]
    assert headers["Authorization"] == f"Bearer {API_KEY}"
    assert headers["OpenAI-Organization"] == "org-abc"
    assert headers["OpenAI-Project"] == "proj_xyz"
    assert headers["Content-Type"] == "application/json"
    assert req["body"]["model"] == "gpt-4o-mini"


async def test_org_and_project_headers_absent_unless_configured(
    make_provider: Callable[..., OpenAIProvider], http_mock: aioresponses
) -> None:
    http_mock.post(CHAT_URL, payload=completion())
    http_mock.get(MODELS_URL, payload={"object": "list", "data": [{"id": "gpt-4o-mini"}]})
    provider = make_provider()
    await provider.chat(chat_request(), call(provider))
    models = await provider.list_models()
    assert [m.id for m in models] == ["gpt-4o-mini"]
    for req in sent(http_mock) + sent(http_mock, MODELS_URL, "GET"):
        assert "OpenAI-Organization" not in req["headers"]
        assert "OpenAI-Project" not in req["headers"]
        assert req["headers"]["Authorization"] == f"Bearer {API_KEY}"


async def test_base_url_override_serves_any_compatible_server(
    make_provider: Callable[..., OpenAIProvider], http_mock: aioresponses
) -> None:
    vllm = "http://vllm.internal:8000/v1/"
    http_mock.post("http://vllm.internal:8000/v1/chat/completions", payload=completion())
    provider = make_provider(base_url=vllm)
    assert provider.config.base_url == vllm
    await provider.chat(chat_request(), call(provider))
    assert len(sent(http_mock, "http://vllm.internal:8000/v1/chat/completions")) == 1
    assert sent(http_mock) == []  # nothing went to api.openai.com


def test_plugin_declares_its_settings_and_default_url() -> None:
    assert plugin.name == "openai"
    assert plugin.default_base_url == OPENAI
    assert set(plugin.settings) == {
        "organization",
        "project",
        "max_completion_tokens_models",
        "stream_usage",
        "responses",
    }
    assert plugin.settings["responses"].choices == ("auto", "native", "translate")


async def test_warns_when_openai_has_no_key(
    make_settings: SettingsFactory, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        {"providers": {"oa": {"plugin": "openai"}}}, plugins={"openai": plugin}
    )
    with caplog.at_level(logging.WARNING, logger="inference_server_openai"):
        plugin.factory(session, settings.providers["oa"])
    assert "without an api_key" in caplog.text


# --- max_tokens → max_completion_tokens -------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "renamed"),
    [
        ("o1", True),
        ("o1-mini", True),
        ("o3-mini", True),
        ("o4-mini-2025-04-16", True),
        ("gpt-5", True),
        ("gpt-5-mini", True),
        ("gpt-5.1", True),
        ("codex-mini-latest", True),
        ("ft:o4-mini-2025-04-16:acme::abc123", True),
        ("gpt-4o-mini", False),
        ("gpt-4.1", False),
        ("llama-3.1-8b", False),
    ],
)
async def test_max_tokens_renamed_for_reasoning_families(
    make_provider: Callable[..., OpenAIProvider], http_mock: aioresponses, model: str, renamed: bool
) -> None:
    http_mock.post(CHAT_URL, payload=completion(model))
    provider = make_provider()
    await provider.chat(chat_request(max_tokens=50), call(provider, model))
    body = sent(http_mock)[0]["body"]
    if renamed:
        assert "max_tokens" not in body
        assert body["max_completion_tokens"] == 50
    else:
        assert body["max_tokens"] == 50
        assert "max_completion_tokens" not in body


async def test_explicit_max_completion_tokens_wins_over_max_tokens(
    make_provider: Callable[..., OpenAIProvider], http_mock: aioresponses
) -> None:
    http_mock.post(CHAT_URL, payload=completion())
    provider = make_provider()
    request = chat_request(max_tokens=50, max_completion_tokens=80)
    await provider.chat(request, call(provider, "o3"))
    body = sent(http_mock)[0]["body"]
    assert "max_tokens" not in body
    assert body["max_completion_tokens"] == 80
    assert request["max_tokens"] == 50  # the caller's request is never modified


async def test_configured_patterns_replace_the_defaults(
    make_provider: Callable[..., OpenAIProvider], http_mock: aioresponses
) -> None:
    http_mock.post(CHAT_URL, payload=completion(), repeat=True)
    provider = make_provider(max_completion_tokens_models=["my-reasoner", r".*-thinking$"])
    for model in ("my-reasoner-v2", "qwen3-thinking", "o3-mini"):
        await provider.chat(chat_request(max_tokens=5), call(provider, model))
    bodies = [r["body"] for r in sent(http_mock)]
    assert [("max_completion_tokens" in b, "max_tokens" in b) for b in bodies] == [
        (True, False),
        (True, False),
        (False, True),  # the defaults no longer apply
    ]


def test_invalid_patterns_are_settings_errors_naming_the_key(
    make_settings: SettingsFactory,
) -> None:
    with pytest.raises(ConfigError) as info:
        openai_settings(make_settings, {"max_completion_tokens_models": ["o1", "gpt-(5", 5]})
    problems = [p for p in info.value.problems if "max_completion_tokens_models" in p]
    assert len(problems) == 2
    assert problems[0].startswith("providers.oa.max_completion_tokens_models[1]: invalid regular")
    assert problems[1].startswith(
        "providers.oa.max_completion_tokens_models[2]: must be a non-empty"
    )


def test_wrong_pattern_list_type_is_reported_once(make_settings: SettingsFactory) -> None:
    with pytest.raises(ConfigError) as info:
        openai_settings(make_settings, {"max_completion_tokens_models": "o1"})
    assert info.value.problems == [
        "providers.oa.max_completion_tokens_models: must be a list, got str 'o1'"
    ]


def test_provider_built_from_a_bad_config_still_fails_loudly(
    make_settings: SettingsFactory, session: aiohttp.ClientSession
) -> None:
    config = openai_settings(make_settings).providers["oa"]
    bad = replace(config, options={**config.options, "max_completion_tokens_models": ["gpt-(5"]})
    with pytest.raises(ValueError, match=r"max_completion_tokens_models\[0\].*gpt-\(5"):
        plugin.factory(session, bad)


async def test_unsupported_max_tokens_400_is_retried_renamed_and_remembered(
    make_provider: Callable[..., OpenAIProvider], http_mock: aioresponses
) -> None:
    http_mock.post(CHAT_URL, status=400, payload=UNSUPPORTED_MAX_TOKENS)
    http_mock.post(CHAT_URL, payload=completion("gpt-6"), repeat=True)
    provider = make_provider()
    ctx = call(provider, "gpt-6")  # a family the default list does not know
    result = await provider.chat(chat_request(max_tokens=20), ctx)
    assert result["model"] == "gpt-6"
    await provider.chat(chat_request(max_tokens=20), ctx)
    bodies = [r["body"] for r in sent(http_mock)]
    assert len(bodies) == 3  # 400, retry, then straight to the renamed field
    assert bodies[0]["max_tokens"] == 20
    assert "max_tokens" not in bodies[1]
    assert bodies[1]["max_completion_tokens"] == 20
    assert bodies[2]["max_completion_tokens"] == 20
    assert provider.uses_max_completion_tokens("gpt-6")
    assert not provider.uses_max_completion_tokens("gpt-4o-mini")


async def test_stream_400_is_retried_renamed_before_any_chunk(
    make_provider: Callable[..., OpenAIProvider], http_mock: aioresponses
) -> None:
    http_mock.post(CHAT_URL, status=400, payload=UNSUPPORTED_MAX_TOKENS)
    sse = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-6",'
        b'"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":"stop"}]}\n\n'
        b"data: [DONE]\n\n"
    )
    http_mock.post(CHAT_URL, body=sse, content_type="text/event-stream")
    provider = make_provider()
    chunks = [
        c async for c in provider.stream_chat(chat_request(max_tokens=9), call(provider, "gpt-6"))
    ]
    assert [c["choices"][0]["delta"] for c in chunks] == [{"content": "ok"}]
    bodies = [r["body"] for r in sent(http_mock)]
    assert [("max_tokens" in b, b.get("max_completion_tokens")) for b in bodies] == [
        (True, None),
        (False, 9),
    ]


async def test_other_400s_are_not_retried(
    make_provider: Callable[..., OpenAIProvider], http_mock: aioresponses
) -> None:
    unsupported_value = {
        "error": {
            "code": "unsupported_value",
            "message": "Unsupported value: 'temperature' does not support 0.2 with this model.",
            "param": "temperature",
            "type": "invalid_request_error",
        }
    }
    http_mock.post(CHAT_URL, status=400, payload=unsupported_value)
    provider = make_provider()
    with pytest.raises(ProviderRejected) as info:
        await provider.chat(chat_request(max_tokens=5, temperature=0.2), call(provider, "gpt-6"))
    assert info.value.http_status == 400
    assert info.value.code == "unsupported_value"  # the upstream's own code, unchanged
    assert info.value.param == "temperature"
    assert len(sent(http_mock)) == 1


async def test_unsupported_max_tokens_without_max_tokens_in_request_is_not_retried(
    make_provider: Callable[..., OpenAIProvider], http_mock: aioresponses
) -> None:
    http_mock.post(CHAT_URL, status=400, payload=UNSUPPORTED_MAX_TOKENS)
    provider = make_provider()
    with pytest.raises(ProviderRejected):
        await provider.chat(chat_request(), call(provider, "gpt-6"))
    assert len(sent(http_mock)) == 1


# --- streams: usage -------------------------------------------------------------------------


async def test_stream_asks_for_usage_and_hides_usage_nulls_from_clients_that_did_not(
    make_provider: Callable[..., OpenAIProvider], http_mock: aioresponses
) -> None:
    base = '"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini"'
    sse = (
        f'data: {{{base},"choices":[{{"index":0,"delta":{{"content":"a"}}}}],"usage":null}}\n\n'
        f'data: {{{base},"choices":[],"usage":{{"prompt_tokens":3,"completion_tokens":1,'
        f'"total_tokens":4}}}}\n\n'
        "data: [DONE]\n\n"
    ).encode()
    http_mock.post(CHAT_URL, body=sse, content_type="text/event-stream", repeat=True)
    provider = make_provider()

    plain = [c async for c in provider.stream_chat(chat_request(), call(provider))]
    assert "usage" not in plain[0]
    assert plain[1]["usage"]["total_tokens"] == 4  # the core decides whether the client sees it

    asked = [
        c async for c in provider.stream_chat(chat_request(), call(provider, include_usage=True))
    ]
    assert asked[0]["usage"] is None  # kept: the client asked for the OpenAI shape

    for req in sent(http_mock):
        assert req["body"]["stream"] is True
        assert req["body"]["stream_options"] == {"include_usage": True}


async def test_stream_usage_false_asks_only_when_the_client_does(
    make_provider: Callable[..., OpenAIProvider], http_mock: aioresponses
) -> None:
    http_mock.post(
        CHAT_URL, body=b"data: [DONE]\n\n", content_type="text/event-stream", repeat=True
    )
    provider = make_provider(stream_usage=False)
    _ = [c async for c in provider.stream_chat(chat_request(), call(provider))]
    _ = [c async for c in provider.stream_chat(chat_request(), call(provider, include_usage=True))]
    first, second = (r["body"] for r in sent(http_mock))
    assert "stream_options" not in first
    assert second["stream_options"] == {"include_usage": True}


# --- errors through the gateway ---------------------------------------------------------------


async def gateway_post(
    make_settings: SettingsFactory,
    make_gateway: GatewayFactory,
    body: dict[str, Any] | None = None,
    provider: dict[str, Any] | None = None,
    **config: Any,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    client = await make_gateway(openai_settings(make_settings, provider, **config))
    resp = await client.post(
        "/v1/chat/completions",
        json=body or {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    )
    return resp.status, await resp.json(), dict(resp.headers)


async def test_upstream_401_is_502_provider_auth_failed_not_retried(
    make_settings: SettingsFactory, make_gateway: GatewayFactory, http_mock: aioresponses
) -> None:
    http_mock.post(
        CHAT_URL,
        status=401,
        payload={
            "error": {
                "message": "Incorrect API key provided: sk-unit****CRET.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        },
    )
    status, body, headers = await gateway_post(make_settings, make_gateway)
    assert status == 502
    assert body["error"]["code"] == "PROVIDER_AUTH_FAILED"
    assert body["error"]["type"] == "api_error"
    assert "Incorrect API key" in body["error"]["message"]
    assert headers["x-should-retry"] == "false"
    assert len(sent(http_mock)) == 1


async def test_upstream_403_is_502_provider_auth_failed(
    make_settings: SettingsFactory, make_gateway: GatewayFactory, http_mock: aioresponses
) -> None:
    http_mock.post(
        CHAT_URL,
        status=403,
        payload={"error": {"message": "Country not supported", "type": "x", "code": None}},
    )
    status, body, _ = await gateway_post(make_settings, make_gateway)
    assert (status, body["error"]["code"]) == (502, "PROVIDER_AUTH_FAILED")


async def test_upstream_429_keeps_retry_after_beyond_the_retry_cap(
    make_settings: SettingsFactory, make_gateway: GatewayFactory, http_mock: aioresponses
) -> None:
    http_mock.post(
        CHAT_URL,
        status=429,
        headers={"Retry-After": "120"},
        payload={"error": {"message": "Rate limit reached", "type": "requests", "code": None}},
    )
    status, body, headers = await gateway_post(make_settings, make_gateway)
    assert status == 429
    assert body["error"]["code"] is None  # the upstream's fields, unchanged
    assert body["error"]["type"] == "requests"
    assert body["error"]["message"] == "Rate limit reached"
    # Paused for the cap (retry_after_max_secs: 30), not waited out: the client decides.
    assert headers["Retry-After"] == "30"
    assert len(sent(http_mock)) == 1


async def test_upstream_429_retry_after_passed_on_when_retries_are_off(
    make_settings: SettingsFactory, make_gateway: GatewayFactory, http_mock: aioresponses
) -> None:
    http_mock.post(
        CHAT_URL,
        status=429,
        headers={"Retry-After": "7"},
        payload={
            "error": {"message": "slow down", "type": "tokens", "code": "rate_limit_exceeded"}
        },
    )
    status, _, headers = await gateway_post(
        make_settings, make_gateway, provider={"max_retries": 0}
    )
    assert status == 429
    assert headers["Retry-After"] == "7"


async def test_upstream_5xx_is_retried_then_502(
    make_settings: SettingsFactory, make_gateway: GatewayFactory, http_mock: aioresponses
) -> None:
    http_mock.post(
        CHAT_URL,
        status=500,
        payload={"error": {"message": "The server had an error", "type": "server_error"}},
        repeat=True,
    )
    status, body, _ = await gateway_post(make_settings, make_gateway, provider={"max_retries": 1})
    assert (status, body["error"]["code"]) == (502, "PROVIDER_ERROR")
    assert len(sent(http_mock)) == 2


async def test_upstream_404_model_not_found_is_404(
    make_settings: SettingsFactory, make_gateway: GatewayFactory, http_mock: aioresponses
) -> None:
    http_mock.post(
        CHAT_URL,
        status=404,
        payload={
            "error": {
                "message": "The model `gpt-4o-mini` does not exist or you do not have access to it.",
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            }
        },
    )
    status, body, _ = await gateway_post(make_settings, make_gateway)
    assert (status, body["error"]["code"]) == (404, "model_not_found")


async def test_gateway_renames_for_a_routed_reasoning_model(
    make_settings: SettingsFactory, make_gateway: GatewayFactory, http_mock: aioresponses
) -> None:
    http_mock.post(CHAT_URL, payload=completion("gpt-5-mini"))
    request = {"model": "thinker", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}
    status, body, _ = await gateway_post(make_settings, make_gateway, request)
    assert status == 200
    assert body["model"] == "gpt-5-mini"
    upstream = sent(http_mock)[0]["body"]
    assert upstream["model"] == "gpt-5-mini"
    assert upstream["max_completion_tokens"] == 7
    assert "max_tokens" not in upstream


# --- the key stays secret ---------------------------------------------------------------------


async def test_key_echoed_by_upstream_is_scrubbed_from_response_and_logs(
    make_settings: SettingsFactory,
    make_gateway: GatewayFactory,
    http_mock: aioresponses,
    all_logs: list[str],
) -> None:
    # Some compatible servers echo the whole bearer token they rejected.
    echo = {"error": {"message": f"invalid token {API_KEY}", "type": "auth", "code": None}}
    http_mock.post(CHAT_URL, status=401, payload=echo)
    http_mock.post(CHAT_URL, status=500, payload=echo, repeat=True)
    http_mock.get(MODELS_URL, status=401, payload=echo)
    client = await make_gateway(openai_settings(make_settings, {"max_retries": 1}))
    message = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    texts = []
    for _ in range(2):  # 401, then 500 (retried, logged as a 502)
        resp = await client.post("/v1/chat/completions", json=message)
        assert resp.status == 502
        texts.append(await resp.text())
    stream = await client.post("/v1/chat/completions", json={**message, "stream": True})
    texts.append(await stream.text())
    health = await client.get("/health")
    texts.append(await health.text())
    assert "invalid token ***" in texts[0]
    assert sent(http_mock)[0]["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert all_logs, "the log capture saw nothing"
    for text in texts + all_logs:
        assert API_KEY not in text


async def test_health_reports_an_unreachable_upstream_without_raising(
    make_provider: Callable[..., OpenAIProvider], http_mock: aioresponses
) -> None:
    http_mock.get(MODELS_URL, exception=aiohttp.ClientConnectionError("refused"))
    provider = make_provider()
    status = await provider.health()
    assert not status.healthy
    assert status.detail


async def test_auth_failure_on_model_list_is_auth_error(
    make_provider: Callable[..., OpenAIProvider], http_mock: aioresponses
) -> None:
    http_mock.get(MODELS_URL, status=401, payload={"error": {"message": "no", "code": None}})
    provider = make_provider()
    with pytest.raises(ProviderAuthFailed):
        await provider.list_models()


def run_print_config(tmp_path: Path, config: dict[str, Any], env: dict[str, str]) -> str:
    """``python -m inference_server --config FILE --print-config`` as an operator runs it."""
    path = tmp_path / "print-config" / "settings.yaml"
    path.parent.mkdir()
    path.write_text(json.dumps({"default": config}))
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_") and k != "RUN_ENV"
    }
    proc = subprocess.run(
        [sys.executable, "-m", "inference_server", "--config", str(path), "--print-config"],
        env={**clean, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("api_key", "env"),
    [
        ("@secret openai_api_key", KEY_ENV),
        (None, {"INFERENCE_PROVIDERS__OA__API_KEY": API_KEY}),
        (API_KEY, {}),
    ],
    ids=["secret-ref", "env-var", "inline"],
)
def test_print_config_masks_the_key(
    tmp_path: Path, api_key: str | None, env: dict[str, str]
) -> None:
    section: dict[str, Any] = {"plugin": "openai", "organization": "org-visible"}
    if api_key is not None:
        section["api_key"] = api_key
    out = run_print_config(tmp_path, {"providers": {"oa": section}}, env)
    assert API_KEY not in out
    printed = json.loads(out)
    assert printed["providers"]["oa"]["api_key"] == "***"
    assert printed["providers"]["oa"]["organization"] == "org-visible"
