"""Secrets never leave: a hostile upstream echoes the configured key in every field of every error
(message, type, param, code, a header; chat, stream, in-band stream error, model list), and the
key must appear nowhere a client, an operator or a collector can read: response bodies and
headers, log lines of every format (the direct JSON access line included), /metrics, /health,
spans."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from loguru import logger
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from inference_server import logs
from inference_server.keys import TELEMETRY
from tests.support.fake_upstream import Action, FakeUpstream

KEY = "sk-hostile-0123456789abcdefXYZ"
ADMIN = "admin-token-9876543210"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


def leaks(text: str) -> list[str]:
    """The forms of a secret found in ``text`` (as written, upper- and lower-cased)."""
    return [
        form
        for secret in (KEY, ADMIN)
        for form in {secret, secret.upper(), secret.lower()}
        if form in text
    ]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("aiohttp.access").disabled)
    yield
    logger.remove()
    logger.add(sys.stderr)
    root.handlers[:], level, disabled = saved
    root.setLevel(level)
    logging.getLogger("aiohttp.access").disabled = disabled


@pytest.mark.parametrize("fmt", ["json", "pretty"])
@pytest.mark.parametrize("plugin", ["lmstudio", "openai"])
async def test_an_echoed_key_appears_nowhere(
    plugin: str,
    fmt: str,
    make_settings: Any,
    make_gateway: Any,
    fake_upstream: FakeUpstream,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    settings = make_settings(
        {
            "server": {"admin_token": "@secret admin"},
            "logging": {"level": "info", "format": fmt},
            "providers": {
                "up": {
                    "plugin": plugin,
                    "base_url": fake_upstream.base_url,
                    "api_key": "@secret upstream_key",
                    "max_retries": 0,
                }
            },
            "models": {"gpt-oss-20b": {"provider": "up"}},
            "routing": {"breaker": {"enabled": False}},
            "telemetry": {"traces": {"exporter": "console"}},
        },
        secrets={"default": {"secrets": {"upstream_key": KEY, "admin": ADMIN}}},
    )
    assert KEY not in repr(settings)
    assert ADMIN not in repr(settings)
    logs.setup_logging(settings.logging)
    client = await make_gateway(settings)
    memory = InMemorySpanExporter()
    provider = client.app[TELEMETRY].provider
    assert provider is not None
    provider.add_span_processor(SimpleSpanProcessor(memory))
    capsys.readouterr()  # the console exporter's start-up output is not under test

    seen: list[str] = []

    async def record(resp: Any) -> int:
        seen.append(str(resp.status))
        seen.extend(f"{k}: {v}" for k, v in resp.headers.items())
        seen.append(await resp.text())
        return int(resp.status)

    statuses = []
    for status in (400, 401, 403, 404, 409, 422, 429, 500, 503):
        fake_upstream.script(Action("echo", status))
        statuses.append(await record(await client.post(CHAT, json={"messages": USER})))
        if status == 429:  # an upstream 429 pauses the deployment (1 s without Retry-After)
            await asyncio.sleep(1.05)
        fake_upstream.script(Action("echo", status))
        stream = {"messages": USER, "stream": True}
        statuses.append(await record(await client.post(CHAT, json=stream)))
        if status == 429:
            await asyncio.sleep(1.05)
    echo_event = {"error": {"message": f"crashed with {KEY}", "type": KEY, "code": KEY}}
    fake_upstream.script(Action("stream_error", body=echo_event))
    assert await record(await client.post(CHAT, json={"messages": USER, "stream": True})) == 200
    fake_upstream.models_echo_status = 401
    await record(await client.get("/health"))
    await record(await client.get("/v1/models"))
    await record(await client.get("/metrics"))
    await record(await client.get("/admin/experiments", headers={"Authorization": "Bearer x"}))
    await client.close()
    await logs.complete()
    output = capsys.readouterr()
    spans = [span.to_json() for span in memory.get_finished_spans()]

    # The upstream really got the key (and echoed it), every request failed as scripted.
    assert all(h["Authorization"] == f"Bearer {KEY}" for h in fake_upstream.headers)
    assert all(s >= 400 for s in statuses), statuses
    assert any("Incorrect API key provided: ***" in text for text in seen), seen
    # Nowhere: responses, metrics, health, logs (both streams), spans.
    assert leaks("\n".join(seen)) == []
    assert "access" in output.out or "POST /v1/chat/completions" in output.out
    assert leaks(output.out) == [], output.out[-2000:]
    assert leaks(output.err) == []
    assert spans
    assert leaks("\n".join(spans)) == []


def test_loguru_never_prints_local_variables(capsys: pytest.CaptureFixture[str]) -> None:
    """``diagnose=False``: a traceback through a frame holding a key does not show the key."""
    from inference_server.settings import LogFileSettings, LoggingSettings

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup_logging(
            LoggingSettings(
                level="info",
                format="pretty",
                output="stdout",
                access_log=True,
                file=LogFileSettings(path="unused", rotation="1 MB", retention="1 day"),
            )
        )

        def fail(api_key: str) -> None:
            raise RuntimeError("boom {'a': 1} <red>")

        try:
            fail(KEY)
        except RuntimeError:
            logger.exception("failed")
        for sink in logs._SINKS:
            sink.drain()
        out = capsys.readouterr().out
    finally:
        logger.remove()
        logger.add(sys.stderr)
        root.handlers[:], level = saved
        root.setLevel(level)
    assert "RuntimeError: boom {'a': 1} <red>\n" in out  # the traceback as it is, once
    assert out.count("Traceback") == 1
    assert KEY not in out


def test_direct_access_line_is_scrubbed_even_for_json_escaped_secrets(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    """The JSON access line is checked once, encoded: a secret with a quote or a backslash is
    escaped there, and is still found (and removed)."""
    from inference_server.context import RequestContext
    from inference_server.scrub import Scrubber
    from inference_server.settings import LogFileSettings, LoggingSettings

    secret = 'pa"ss\\word-123456'
    logs.setup_logging(
        LoggingSettings(
            level="info",
            format="json",
            output="stdout",
            access_log=True,
            file=LogFileSettings(path="unused", rotation="1 MB", retention="1 day"),
            scrubber=Scrubber([secret, KEY]),
        )
    )
    ctx = RequestContext(request_id="req-1")
    ctx.model = f"model {secret}"
    logs.access(ctx, "GET", f"/v1/models/{KEY}", 404, 0.001)
    ctx.model = "clean"
    logs.access(ctx, "GET", "/v1/models/x", 404, 0.001)
    for sink in logs._SINKS:
        sink.drain()
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["model"] for line in lines] == ["model ***", "clean"]
    assert lines[0]["path"] == "/v1/models/***"
    assert 'pa\\"ss' not in out
    assert leaks(out) == []
