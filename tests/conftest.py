"""Fixtures shared by every tier: settings from a temp file, the app, a fake upstream, HTTP mocks."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from unittest.mock import Mock

import aiohttp
import aioresponses.core as aioresponses_core
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from aioresponses import aioresponses

from inference_server import logs
from inference_server.app import create_app
from inference_server.providers.base import ProviderPlugin
from inference_server.settings import Settings, load_settings
from tests.support.fake_upstream import FakeUpstream
from tests.support.redis_server import RedisServer

#: Test defaults layered under every test's own settings: quiet logs, fast retries.
BASE_SETTINGS: dict[str, Any] = {
    "logging": {"level": "warning"},
    "inference": {"retry_backoff_base_secs": 0.001, "retry_backoff_max_secs": 0.01},
}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


SettingsFactory = Callable[..., Settings]


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """A test that configured logging (logs.setup_logging) leaves no sink or direct access-line
    writer behind for the next test."""
    yield
    logs.reset_logging()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No INFERENCE_* or RUN_ENV from the developer's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith("INFERENCE_") or key == "RUN_ENV":
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.fixture
def make_settings(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> SettingsFactory:
    """Build Settings from a settings.yaml written to tmp_path (JSON is valid YAML)."""

    def make(
        config: dict[str, Any] | None = None,
        *,
        env: dict[str, str] | None = None,
        sections: dict[str, Any] | None = None,
        secrets: dict[str, Any] | None = None,
        plugins: dict[str, ProviderPlugin] | None = None,
        base: bool = True,
    ) -> Settings:
        default = deep_merge(BASE_SETTINGS if base else {}, config or {})
        (tmp_path / "settings.yaml").write_text(
            json.dumps({"default": default, **(sections or {})})
        )
        if secrets is not None:
            (tmp_path / ".secrets.yaml").write_text(json.dumps(secrets))
        for key, value in (env or {}).items():
            clean_env.setenv(key, value)
        return load_settings(tmp_path / "settings.yaml", plugins=plugins)

    return make


GatewayFactory = Callable[[Settings], Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def make_gateway(aiohttp_client: Any) -> GatewayFactory:
    """Start the real app on a free port (TestServer turns handler cancellation on, as run_app)."""

    async def make(settings: Settings) -> TestClient[web.Request, web.Application]:
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            create_app(settings)  # TestServer enables handler_cancellation
        )
        return client

    return make


@pytest.fixture
async def fake_upstream(aiohttp_server: Any) -> FakeUpstream:
    """A scriptable OpenAI-compatible upstream on a free port."""
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app)  # TestServer cancels handlers on disconnect
    fake.base_url = f"http://127.0.0.1:{server.port}/v1"
    fake.server = server
    return fake


@pytest.fixture
def make_fake_upstream(aiohttp_server: Any) -> Callable[[], Awaitable[FakeUpstream]]:
    """More fake upstreams, each on its own free port (for multi-deployment routes)."""

    async def make() -> FakeUpstream:
        fake = FakeUpstream()
        server = await aiohttp_server(fake.app)
        fake.base_url = f"http://127.0.0.1:{server.port}/v1"
        fake.server = server
        return fake

    return make


@pytest.fixture
async def gateway_for(
    make_settings: SettingsFactory, make_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> Callable[..., Awaitable[TestClient[web.Request, web.Application]]]:
    """A gateway whose shorthand lmstudio provider points at ``fake_upstream``."""

    async def make(
        inference: dict[str, Any] | None = None, **config: Any
    ) -> TestClient[web.Request, web.Application]:
        settings = make_settings(
            {"inference": {"base_url": fake_upstream.base_url, **(inference or {})}, **config}
        )
        return await make_gateway(settings)

    return make


class CompatClientResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 builds ClientResponse without aiohttp 3.14's required ``stream_writer``
    (aioresponses issue #289, fix in unreleased PR #288); default it so mocks work on 3.14."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", Mock(output_size=0))
        super().__init__(*args, **kwargs)


@pytest.fixture
def http_mock(monkeypatch: pytest.MonkeyPatch) -> Iterator[aioresponses]:
    """Mock outgoing HTTP (unit tier); requests to 127.0.0.1 (the test client) stay real."""
    # Every mocked response (registered or built by a callback) is built from this name.
    monkeypatch.setattr(aioresponses_core, "ClientResponse", CompatClientResponse)
    with aioresponses(passthrough=["http://127.0.0.1"]) as mock:
        yield mock


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of this test's own on a free port (killed at the end)."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
