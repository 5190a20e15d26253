"""One gateway process with three providers at once: LM Studio, OpenAI-compatible and Triton.

The lmstudio and openai plugins both talk to the real llama.cpp server (LM Studio's engine; the
openai plugin in its OpenAI-compatible mode), the triton plugin to the real Triton server. Each
public model must be answered by its own provider, streamed and not, through the openai SDK.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.real.conftest import LlamaServer, TritonServer
from tests.support.procs import free_port, running_process

pytestmark = pytest.mark.real
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello"}]
EXPECTED = {  # public model → the deployment that must answer it
    "gpt-oss-20b": "local/tiny",
    "gpt-4o-mini": "cloud/tiny",
    "triton-llm": "triton/echo",
    "triton-stream": "triton/echo_stream",
}


@pytest.fixture
def gateway_url(
    tmp_path: Path, llama_server: LlamaServer, triton_server: TritonServer
) -> Iterator[str]:
    settings = {
        "default": {
            "providers": {
                "local": {"plugin": "lmstudio", "base_url": llama_server.base_url},
                "cloud": {
                    "plugin": "openai",
                    "base_url": llama_server.base_url,
                    "api_key": "@secret openai_api_key",
                    "stream_usage": False,
                },
                "triton": {
                    "plugin": "triton",
                    "base_url": triton_server.base_url,
                    "models": {"echo": {"chat_template": "chatml"}, "echo_stream": {}},
                },
            },
            "models": {
                "gpt-oss-20b": {"provider": "local", "upstream_model": "tiny"},
                "gpt-4o-mini": {"provider": "cloud", "upstream_model": "tiny"},
                "triton-llm": {"provider": "triton", "upstream_model": "echo"},
                "triton-stream": {"provider": "triton", "upstream_model": "echo_stream"},
            },
            "inference": {"timeout_secs": 60},
        }
    }
    (tmp_path / "settings.yaml").write_text(json.dumps(settings))
    (tmp_path / ".secrets.yaml").write_text(
        json.dumps({"default": {"secrets": {"openai_api_key": "sk-local-test"}}})
    )
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    cmd = [
        sys.executable,
        "-m",
        "inference_server",
        "--config",
        str(tmp_path / "settings.yaml"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with running_process(
        cmd,
        env=env,
        ready_url=f"http://127.0.0.1:{port}/",
        timeout=60,
        log_path=tmp_path / "gateway.log",
    ) as proc:
        yield f"http://127.0.0.1:{port}/v1"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert "sk-local-test" not in (tmp_path / "gateway.log").read_text()


async def test_each_model_is_answered_by_its_own_provider(gateway_url: str) -> None:
    sdk = openai.AsyncOpenAI(base_url=gateway_url, api_key="client-key", max_retries=0)
    listed = {m.id: m.owned_by for m in (await sdk.models.list()).data}
    assert listed == {
        "gpt-oss-20b": "local",
        "gpt-4o-mini": "cloud",
        "triton-llm": "triton",
        "triton-stream": "triton",
    }
    for model, deployment in EXPECTED.items():
        raw = await sdk.chat.completions.with_raw_response.create(
            model=model, messages=USER, max_tokens=4
        )
        assert raw.headers["x-inference-deployment"] == deployment, model
        done = raw.parse()
        assert done.choices[0].message.content, model
        assert done.usage is not None
        assert done.usage.completion_tokens > 0
        stream = await sdk.chat.completions.create(
            model=model,
            messages=USER,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        assert text, model
        assert usage is not None, model
    await sdk.close()
    async with (
        aiohttp.ClientSession() as http,
        http.get(gateway_url.removesuffix("/v1") + "/health") as resp,
    ):
        health = await resp.json()
    assert resp.status == 200
    assert health["status"] == "healthy"
    assert set(health["providers"]) == {"local", "cloud", "triton"}
