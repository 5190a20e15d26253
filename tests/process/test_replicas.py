"""Issue 16: two gateway replicas as real processes behind a real nginx, sharing a real
redis-server: one rate limit across replicas, a cache hit across replicas, a rolling restart
and a hot reload (SIGHUP, also with ``--workers 2``) under steady load with no failed request.

nginx's upstream settings and why they are what they are: tests/support/nginx.py.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.nginx import nginx
from tests.support.procs import free_port, gateway_process, wait_for_lines
from tests.support.redis_server import RedisServer

CHAT = json.dumps(
    {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
).encode()
#: At most this many requests per load run (bounded whatever the timing).
MAX_REQUESTS = 600


def config(redis_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "inference": {"provider": "mock", "options": {"latency_ms": 10}},
        "logging": {"level": "info", "access_log": False},
        "server": {"drain_delay_secs": 1.0, "shutdown_timeout_secs": 5},
        "state": {"backend": "redis", "redis_url": redis_url, "timeout_secs": 0.5},
        **extra,
    }


@contextlib.contextmanager
def replica(
    d: Path, port: int, cfg: dict[str, Any], *args: str
) -> Iterator[subprocess.Popen[bytes]]:
    """One gateway process on ``port``, serving ``d/settings.yaml``; ready once
    ``/health/ready`` answers 200."""
    with gateway_process(d, cfg, *args, port=port, ready_path="/health/ready") as (proc, _):
        yield proc


def request(
    port: int, method: str = "POST", path: str = "/v1/chat/completions", body: bytes | None = CHAT
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class Load:
    """Steady chat traffic through ``port`` from a few threads until stopped (at most
    ``MAX_REQUESTS``); every outcome is kept: a status, or the exception's text."""

    def __init__(self, port: int, threads: int = 3) -> None:
        self.port = port
        self.stop = threading.Event()
        self.outcomes: list[int | str] = []
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(threads)
        self.futures = [self.pool.submit(self._run) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                if len(self.outcomes) >= MAX_REQUESTS:
                    return
            try:
                outcome: int | str = request(self.port)[0]
            except (OSError, http.client.HTTPException) as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            with self.lock:
                self.outcomes.append(outcome)

    def wait_for(self, count: int, timeout: float = 30) -> None:
        """Until ``count`` more requests completed."""
        target = len(self.outcomes) + count
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < min(target, MAX_REQUESTS):
            assert time.monotonic() < deadline, f"load stalled at {len(self.outcomes)}"
            time.sleep(0.02)

    def finish(self) -> list[int | str]:
        self.stop.set()
        for future in self.futures:
            future.result(timeout=30)
        self.pool.shutdown()
        return self.outcomes


def failures(outcomes: list[int | str]) -> list[int | str]:
    return [o for o in outcomes if o != 200]


class Replicas:
    """Two replicas on fixed free ports; one can be stopped and started again on its port."""

    def __init__(self, tmp_path: Path, cfg: dict[str, Any], *args: str) -> None:
        self.tmp_path, self.cfg, self.args = tmp_path, cfg, args
        self.ports = [free_port(), free_port()]
        self.stacks = [contextlib.ExitStack(), contextlib.ExitStack()]
        self.procs: list[subprocess.Popen[bytes]] = []
        for i in range(2):
            self.procs.append(self.start(i))

    def start(self, i: int) -> subprocess.Popen[bytes]:
        self.stacks[i] = contextlib.ExitStack()
        return self.stacks[i].enter_context(
            replica(self.tmp_path / f"r{i}", self.ports[i], self.cfg, *self.args)
        )

    def close(self) -> None:
        for stack in self.stacks:
            stack.close()


@contextlib.contextmanager
def two_replicas_behind_nginx(
    tmp_path: Path, cfg: dict[str, Any], *args: str
) -> Iterator[tuple[int, Replicas]]:
    """(nginx's port, the replicas)."""
    replicas = Replicas(tmp_path, cfg, *args)
    try:
        with nginx(tmp_path / "nginx", replicas.ports) as front:
            yield front, replicas
    finally:
        replicas.close()


def test_one_rate_limit_across_replicas_through_nginx(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    cfg = config(redis_server.url, limits={"global": {"rpm": 6}})
    with two_replicas_behind_nginx(tmp_path, cfg) as (front, replicas):
        answers = [request(front) for _ in range(14)]
    statuses = [status for status, _, _ in answers]
    assert statuses.count(200) == 6
    assert statuses.count(429) == 8
    # Both replicas answered (nginx alternates), and each counted against the one limit.
    served = {headers["x-upstream"] for _, headers, _ in answers}
    assert served == {f"127.0.0.1:{p}" for p in replicas.ports}


def test_a_cache_hit_across_replicas_through_nginx(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    cfg = config(redis_server.url, cache={"enabled": True, "backend": "redis"})
    with two_replicas_behind_nginx(tmp_path, cfg) as (front, replicas):
        status, headers, first = request(front)
        assert status == 200
        assert headers["x-inference-cache"] == "miss"
        hits: set[str] = set()
        deadline = time.monotonic() + 5
        while hits != {
            f"127.0.0.1:{p}" for p in replicas.ports
        }:  # the writer stores after answering
            assert time.monotonic() < deadline, f"hits only from {hits}"
            status, headers, body = request(front)
            assert status == 200
            if headers["x-inference-cache"] == "hit":
                assert json.loads(body)["choices"] == json.loads(first)["choices"]
                hits.add(headers["x-upstream"])


def test_a_rolling_restart_under_load_fails_no_request(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    cfg = config(redis_server.url)
    with two_replicas_behind_nginx(tmp_path, cfg) as (front, replicas):
        load = Load(front)
        try:
            load.wait_for(30)
            for i, port in enumerate(replicas.ports):
                replicas.procs[i].send_signal(signal.SIGTERM)
                # Readiness drops first: 503 on /health/ready while the listener still serves.
                _until(lambda p=port: _status(p, "/health/ready") == 503, 1.0)
                assert _status(port, "/health/live") == 200
                load.wait_for(10)
                assert replicas.procs[i].wait(timeout=15) == 0
                replicas.stacks[i].close()
                replicas.procs[i] = replicas.start(i)  # on the same port
                load.wait_for(30)
        finally:
            outcomes = load.finish()
    assert len(outcomes) >= 100
    assert failures(outcomes) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_a_hot_reload_under_load_fails_no_request(
    tmp_path: Path, redis_server: RedisServer, workers: int
) -> None:
    cfg = config(redis_server.url)
    args = ("--workers", str(workers)) if workers > 1 else ()
    with two_replicas_behind_nginx(tmp_path, cfg, *args) as (front, replicas):
        load = Load(front)
        try:
            load.wait_for(30)
            # New settings: another latency and model list (a new provider object is built).
            new = config(redis_server.url)
            new["inference"]["options"] = {"latency_ms": 5, "models": ["mock-model", "reloaded"]}
            for i, proc in enumerate(replicas.procs):  # the supervisor with --workers
                (tmp_path / f"r{i}" / "settings.yaml").write_text(json.dumps({"default": new}))
                proc.send_signal(signal.SIGHUP)
            for i in range(2):
                wait_for_lines(
                    tmp_path / f"r{i}" / "server.log",
                    lambda line: "settings reloaded (generation 1)" in line,
                    workers,
                    timeout=15,
                )
            load.wait_for(60)
        finally:
            outcomes = load.finish()
        # Every worker of every replica serves the new settings.
        for _ in range(10):
            status, _, body = request(front, "GET", "/v1/models", None)
            assert status == 200
            assert "reloaded" in {m["id"] for m in json.loads(body)["data"]}
    assert len(outcomes) >= 90
    assert failures(outcomes) == []


def _status(port: int, path: str) -> int | None:
    """The status of GET ``path`` on a replica, None when it refuses the connection."""
    try:
        return request(port, "GET", path, None)[0]
    except OSError:
        return None


def _until(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_sighup_with_an_invalid_file_keeps_serving_the_old_settings(tmp_path: Path) -> None:
    cfg = {
        "inference": {"provider": "mock"},
        "logging": {"level": "info", "access_log": False},
        "server": {"drain_delay_secs": 0},
    }
    port = free_port()
    with replica(tmp_path, port, cfg, "--workers", "2") as proc:
        (tmp_path / "settings.yaml").write_text(json.dumps({"default": {**cfg, "bogus": 1}}))
        proc.send_signal(signal.SIGHUP)
        # The supervisor and both workers each validate and refuse it, naming the problem.
        lines = wait_for_lines(
            tmp_path / "server.log", lambda line: "reload rejected" in line, 3, timeout=15
        )
        assert all("bogus" in line for line in lines)
        for _ in range(6):
            status, _, body = request(port, "GET", "/health/ready", None)
            assert status == 200
            assert json.loads(body)["generation"] == 0
            assert request(port)[0] == 200


def test_admin_reload_under_workers_reloads_every_worker_once(tmp_path: Path) -> None:
    token = "admin-reload-token-123"
    cfg = {
        "inference": {"provider": "mock"},
        "logging": {"level": "info", "access_log": False},
        "server": {"drain_delay_secs": 0, "admin_token": token},
    }
    port = free_port()
    with replica(tmp_path, port, cfg, "--workers", "2"):
        new = {**cfg, "inference": {"provider": "mock", "options": {"models": ["m2"]}}}
        (tmp_path / "settings.yaml").write_text(json.dumps({"default": new}))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/admin/reload", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        report = json.loads(resp.read())
        conn.close()
        assert resp.status == 200, report
        assert report["generation"] == 1
        assert report["new_providers"] == ["local"]
        # The supervisor forwarded it: each worker reloaded once (not the one asked twice).
        lines = wait_for_lines(
            tmp_path / "server.log", lambda line: "settings reloaded (generation" in line, 2, 15
        )
        assert all("generation 1" in line for line in lines)
        for _ in range(10):  # new connections: both workers answer over the run
            status, _, body = request(port, "GET", "/health/ready", None)
            assert status == 200
            assert json.loads(body)["generation"] == 1
        text = (tmp_path / "server.log").read_text()
        assert text.count("settings reloaded (generation") == 2
