"""Two real gateway processes sharing one real Redis: one exact limit, keys everywhere at once."""

from __future__ import annotations

import hashlib
import http.client
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from tests.support.procs import gateway_process as gateway
from tests.support.redis_server import RedisServer

KEY = "sk-process-test-0123456789"
ADMIN = "admin-process-token"
CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()


def config(redis_url: str, **key: Any) -> dict[str, Any]:
    return {
        "inference": {"provider": "mock", "options": {"latency_ms": 50}},
        "logging": {"level": "warning"},
        "server": {"admin_token": ADMIN},
        "auth": {
            "enabled": True,
            "key_refresh_secs": 0.1,
            "keys": {"team": {"key_sha256": hashlib.sha256(KEY.encode()).hexdigest(), **key}},
        },
        "state": {"backend": "redis", "redis_url": redis_url, "timeout_secs": 0.3},
    }


def call(port: int, method: str, path: str, body: bytes | None, token: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else None
    finally:
        conn.close()


def chat(port: int, token: str = KEY) -> int:
    return call(port, "POST", "/v1/chat/completions", CHAT, token)[0]


@contextmanager
def two_gateways(tmp_path: Path, cfg: dict[str, Any]) -> Iterator[tuple[int, int]]:
    with ExitStack() as stack:
        ports = []
        for name in ("a", "b"):
            d = tmp_path / name
            d.mkdir()
            _, port = stack.enter_context(gateway(d, cfg))
            ports.append(port)
        yield ports[0], ports[1]


def test_two_processes_admit_exactly_the_limit(tmp_path: Path, redis_server: RedisServer) -> None:
    limit, n = 5, 16
    with (
        two_gateways(tmp_path, config(redis_server.url, rpm=limit)) as (a, b),
        ThreadPoolExecutor(n) as pool,
    ):
        statuses = list(pool.map(chat, [a, b] * (n // 2)))
        assert statuses.count(200) == limit
        assert statuses.count(429) == n - limit


def test_deleted_key_stops_on_both_processes_within_a_second(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    with two_gateways(tmp_path, config(redis_server.url)) as (a, b):
        status, created = call(a, "POST", "/admin/keys", b'{"name": "temp"}', ADMIN)
        assert status == 201
        key = created["key"]
        deadline = time.monotonic() + 1.0
        while chat(b, key) != 200:  # created on a, visible on b
            assert time.monotonic() < deadline, "new key not seen by the other process in 1 s"
            time.sleep(0.02)
        status, _ = call(b, "DELETE", f"/admin/keys/{created['id']}", None, ADMIN)
        assert status == 204
        started = time.monotonic()
        while chat(a, key) != 401:
            assert time.monotonic() - started < 1.0, "deleted key still works after 1 s"
            time.sleep(0.02)
        assert chat(b, key) == 401


def test_redis_killed_mid_test_then_exact_again(tmp_path: Path, redis_server: RedisServer) -> None:
    with two_gateways(tmp_path, config(redis_server.url, rpm=3)) as (a, b):
        assert [chat(a), chat(b)] == [200, 200]
        redis_server.stop()
        # state.on_error: allow (the default): admitted without limits, nothing crashes
        assert [chat(a) for _ in range(5)] == [200] * 5
        assert [chat(b) for _ in range(5)] == [200] * 5
        redis_server.start()  # an empty Redis: the limit starts over and is exact again
        statuses = [chat(p) for p in (a, b, a, b, a)]
        assert statuses == [200, 200, 200, 429, 429]
        conn = http.client.HTTPConnection("127.0.0.1", a, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        assert 'inference_state_redis_errors_total{op="admit"} 5.0' in text
        assert 'inference_admissions_total{key="team",outcome="unchecked"} 5.0' in text
        assert 'inference_admissions_total{key="team",outcome="rpm"} 1.0' in text
