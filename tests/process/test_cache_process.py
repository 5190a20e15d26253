"""Two real gateway processes sharing one real redis-server: an answer one of them got from
the upstream is a hit on the other."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import aiohttp

from tests.support.fake_upstream import FakeUpstream
from tests.support.procs import free_port, running_process
from tests.support.redis_server import RedisServer

CHAT = {"model": "gpt-oss-20b", "messages": [{"role": "user", "content": "hi"}]}


async def test_a_hit_across_two_gateway_processes(
    tmp_path: Path, fake_upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    config = {
        "inference": {"base_url": fake_upstream.base_url, "allowed_models": ["gpt-oss-20b"]},
        "state": {"backend": "redis", "redis_url": redis_server.url},
        "cache": {"enabled": True, "backend": "redis"},
        "logging": {"level": "warning"},
    }
    settings = tmp_path / "settings.yaml"
    settings.write_text(json.dumps({"default": config}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
    ports = [free_port(), free_port()]
    with contextlib.ExitStack() as stack:
        for i, port in enumerate(ports):
            cmd = [sys.executable, "-m", "inference_server", "--config", str(settings)]
            cmd += ["--host", "127.0.0.1", "--port", str(port)]
            proc = running_process(
                cmd,
                env=env,
                ready_url=f"http://127.0.0.1:{port}/",
                timeout=30,
                log_path=tmp_path / f"gateway-{i}.log",
            )
            # In a thread: the fake upstream runs on this test's event loop meanwhile.
            await asyncio.to_thread(stack.enter_context, proc)
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{ports[0]}/v1/chat/completions"
            async with session.post(url, json=CHAT) as resp:
                assert resp.status == 200
                assert resp.headers["x-inference-cache"] == "miss"
                first = await resp.json()
            url = f"http://127.0.0.1:{ports[1]}/v1/chat/completions"
            deadline, misses = time.monotonic() + 5, 0
            while True:  # the first process writes to Redis after answering
                async with session.post(url, json=CHAT) as resp:
                    assert resp.status == 200
                    if resp.headers["x-inference-cache"] == "hit":
                        assert await resp.json() == first
                        break
                    misses += 1
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            async with session.post(url, json={**CHAT, "stream": True}) as resp:
                assert resp.headers["x-inference-cache"] == "hit"
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    # Only misses reached the upstream: the first, and any the second process saw while the
    # first one's write was on its way (normally none).
    assert len(fake_upstream.requests) == 1 + misses
