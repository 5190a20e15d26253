"""Fixtures for the observability tests: OTLP receivers, promtool, exposition parsing."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.observability.otlp_receiver import GrpcReceiver, HttpReceiver

#: Debian packages these tests need (``make test`` installs them): the Prometheus server and
#: promtool come with ``prometheus``.
APT_PACKAGES = ("prometheus",)


def require_binary(name: str) -> str:
    """The path of ``name``; outside CI a missing binary skips, in CI it fails (never hidden)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found: apt-get install {' '.join(APT_PACKAGES)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def promtool() -> str:
    return require_binary("promtool")


def check_metrics(promtool: str, text: str) -> None:
    """``promtool check metrics`` must accept the exposition (lint problems included)."""
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, output
    assert output.strip() == "", output  # lint findings are printed even with exit 0


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of an exposition as (name, labels, value)."""
    out = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.append((s.name, dict(s.labels), s.value))
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(
        v
        for n, ls, v in samples(text)
        if n == name and all(ls.get(k) == x for k, x in labels.items())
    )


def series(text: str, name: str) -> list[dict[str, str]]:
    return [ls for n, ls, _ in samples(text) if n == name]


@pytest.fixture
async def otlp_http(aiohttp_server: Any) -> HttpReceiver:
    receiver = HttpReceiver()
    server = await aiohttp_server(receiver.app)
    receiver.url = f"http://127.0.0.1:{server.port}/v1/traces"
    return receiver


@pytest.fixture
async def otlp_grpc() -> AsyncIterator[GrpcReceiver]:
    receiver = GrpcReceiver()
    await receiver.start()
    yield receiver
    await receiver.stop()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
