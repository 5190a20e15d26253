"""The compose stack's heart for real: two gateway containers behind nginx, sharing Redis.

deploy/compose/ cannot come up here (nginx, Redis and the rest cannot be pulled), so its parts
run as the nearest equivalent: the two replicas are containers of the image built from the
Dockerfile, with the compose stack's settings.yaml mounted and its environment; nginx (Debian's,
with deploy/compose/nginx.conf) and Redis (``redis_server``) run as processes on the host. The
containers use the host's network so they reach that Redis on loopback; they bind 127.0.0.1.

What it shows: an answer one replica cached is a hit on the other (and through nginx), both
replicas export traces with the stack's ``OTEL_*`` settings (to a receiver standing in for the
Collector), Prometheus with the stack's configuration scrapes both, one rate limit holds across both replicas (with each replica counting alone, all of the requests would
pass), and a rolling restart (SIGTERM to one container, start it, then the other) under a client's
load through nginx loses no request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.container.client import call
from tests.observability.otlp_receiver import HttpReceiver
from tests.observability.test_process import promql
from tests.support.podman import REPO, Container, Podman
from tests.support.procs import free_port, running_process
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.container

COMPOSE = REPO / "deploy" / "compose"
RPM = 10


def post(base: str, content: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    return call(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": content}]})


def compose_environment(service: str) -> dict[str, str]:
    """A gateway's environment in docker-compose.yml (the same settings path as the stack)."""
    services = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]
    return {k: str(v) for k, v in services[service]["environment"].items()}


@contextlib.contextmanager
def nginx(tmp_path: Path, upstreams: list[int]) -> Iterator[str]:
    """Debian's nginx with deploy/compose/nginx.conf, the replicas' names → their local ports."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.fail("nginx is not installed: `make system-deps` installs it")
    port = free_port()
    conf = (COMPOSE / "nginx.conf").read_text()
    for i, up in enumerate(upstreams, start=1):
        conf = conf.replace(f"gateway-{i}:8080", f"127.0.0.1:{up}")
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    (tmp_path / "default.conf").write_text(conf)
    (tmp_path / "nginx.conf").write_text(
        "daemon off;\npid nginx.pid;\nerror_log stderr;\nworker_processes 1;\n"
        "events {}\nhttp {\n  access_log off;\n"
        "  client_body_temp_path tmp-body;\n  proxy_temp_path tmp-proxy;\n"
        "  include default.conf;\n}\n"
    )
    with running_process(
        [binary, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        env=None,
        ready_url=f"http://127.0.0.1:{port}/",  # the gateways' `/` through nginx
        timeout=15,
        log_path=tmp_path / "nginx.log",
    ):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def launch(
    podman: Podman,
    image: str,
    redis: RedisServer,
    extra: dict[str, str],
    otlp_endpoint: str | None = None,
) -> Iterator[list[tuple[Container, str]]]:
    """gateway-1 and gateway-2 as containers, with the compose stack's settings and environment
    (+ ``extra``): Redis is ``redis``; traces go to ``otlp_endpoint`` (none when it is None)."""
    started: list[tuple[Container, str]] = []
    try:
        for service in ("gateway-1", "gateway-2"):
            env = compose_environment(service)
            if otlp_endpoint is None:
                env = {k: v for k, v in env.items() if not k.startswith("OTEL_")}
            else:
                env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_endpoint
                env["OTEL_BSP_SCHEDULE_DELAY"] = "200"  # export within 0.2 s, not 5 s
            env["INFERENCE_STATE__REDIS_URL"] = redis.url
            env["INFERENCE_SERVER_HOST"] = "127.0.0.1"
            env.update(extra)
            port = free_port()
            args = ["--network", "host", "-e", f"INFERENCE_SERVER_PORT={port}"]
            for key, value in env.items():
                args += ["-e", f"{key}={value}"]
            args += ["-v", f"{COMPOSE / 'settings.yaml'}:/etc/inference-server/settings.yaml:ro"]
            container = podman.start(image, *args)
            started.append((container, f"http://127.0.0.1:{port}"))
        for container, base in started:
            container.wait_http(f"{base}/")
        yield started
    finally:
        for container, _ in started:
            container.remove()


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


@pytest.fixture
async def otlp(aiohttp_server: Any) -> HttpReceiver:
    """An OTLP/HTTP receiver on loopback, standing in for the stack's Collector."""
    receiver = HttpReceiver()
    server = await aiohttp_server(receiver.app)
    receiver.url = f"http://127.0.0.1:{server.port}/v1/traces"
    return receiver


@pytest.fixture
def replicas(
    podman: Podman, gateway_image: str, redis_server: RedisServer, otlp: HttpReceiver
) -> Iterator[list[tuple[Container, str]]]:
    extra = {"INFERENCE_LIMITS__GLOBAL__RPM": str(RPM)}
    endpoint = otlp.url.removesuffix("/v1/traces")
    with launch(podman, gateway_image, redis_server, extra, endpoint) as started:
        yield started


def prometheus_scrapes_both(replicas: list[tuple[Container, str]], folder: Path) -> None:
    """Debian's Prometheus with deploy/compose/prometheus.yml (and the alert rules beside it, as
    the stack mounts them), the replicas' names → their local ports: both are up and counted."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: `make system-deps` installs it")
    folder.mkdir()
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"  # not 15 s: the test waits for two scrapes
    job = config["scrape_configs"][0]
    job["static_configs"][0]["targets"] = [base.removeprefix("http://") for _, base in replicas]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(REPO / "deploy" / "prometheus" / "alerts.yml", folder / "alerts.yml")
    port = free_port()
    with running_process(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        env=None,
        ready_url=f"http://127.0.0.1:{port}/-/ready",
        timeout=60,
        log_path=folder / "prometheus.log",
    ):
        query = 'sum by (instance) (inference_requests_total{job="inference-server"})'
        deadline = time.monotonic() + 30
        while True:
            up = promql(port, 'up{job="inference-server"} == 1')
            counted = promql(port, query)
            if len(up) == 2 and len(counted) == 2:
                break
            assert time.monotonic() < deadline, (up, counted)
            time.sleep(0.5)
        assert all(float(r["value"][1]) > 0 for r in counted)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=10) as resp:
            groups = json.loads(resp.read())["data"]["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        assert "InferenceServerDown" in rules  # alerts.yml, as the stack mounts it
        assert promql(port, 'ALERTS{alertname="InferenceServerDown"}') == []


async def test_replicas_share_cache_rate_limit_and_trace_through_nginx(
    replicas: list[tuple[Container, str]], otlp: HttpReceiver, tmp_path: Path
) -> None:
    """The blocking part runs on a thread: this loop serves the OTLP receiver meanwhile."""
    await asyncio.to_thread(cache_and_rate_limit, replicas, tmp_path)
    await asyncio.to_thread(prometheus_scrapes_both, replicas, tmp_path / "prometheus")
    # Both replicas export their spans with the compose stack's OTEL_* settings.
    names = {"inference-server-1", "inference-server-2"}
    spans = await otlp.wait_for(
        lambda spans: names <= {s.resource.get("service.name") for s in spans}
    )
    servers = [s for s in spans if s.kind == "server"]
    assert {s.resource.get("service.name") for s in servers} == names


def cache_and_rate_limit(replicas: list[tuple[Container, str]], tmp_path: Path) -> None:
    (one, base1), (two, base2) = replicas
    started = time.monotonic()
    ok = 0

    # An answer cached by replica 1 is a hit on replica 2.
    status, headers, first = post(base1, "which replica answers?")
    assert status == 200, first
    assert headers.get("x-inference-cache") != "hit"
    status, headers, second = post(base2, "which replica answers?")
    assert status == 200, second
    assert headers.get("x-inference-cache") == "hit", one.logs()[-2000:] + two.logs()[-2000:]
    assert second["choices"] == first["choices"]
    ok += 2

    with nginx(tmp_path, [port_of(base1), port_of(base2)]) as lb:
        # Through nginx, round robin over both replicas: a fresh prompt misses once, then hits.
        hits = []
        for _ in range(3):
            status, headers, _ = post(lb, "through nginx")
            assert status == 200
            hits.append(headers.get("x-inference-cache") == "hit")
        assert hits == [False, True, True]
        ok += 3

        # One rate limit for both replicas (Redis): RPM requests a minute in all. Counting alone,
        # each replica would pass every one of these (about half each, under RPM).
        limited = 0
        for i in range(2 * RPM - 4):
            status, _, body = post(lb, f"rate limit probe {i}")
            if status == 200:
                ok += 1
            else:
                assert status == 429, body
                assert body["error"]["code"] == "RATE_LIMITED"
                limited += 1
    elapsed = time.monotonic() - started
    refilled = int(elapsed / (60 / RPM))  # GCRA: one more request every 60/RPM s
    assert RPM <= ok <= RPM + refilled, (ok, limited, elapsed)
    assert limited >= RPM - 4 - refilled


def test_rolling_restart_through_nginx_loses_no_request(
    podman: Podman, gateway_image: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    """`podman stop` (SIGTERM) one replica, start it again, then the other, while a client sends
    requests through nginx: every request succeeds (nginx moves to the other replica when one
    refuses connections; the stopping one finishes what it accepted). With nginx.conf's former
    `max_fails=1 fail_timeout=5s` the restarted replica was still benched when the other
    stopped, and every request in that window was nginx's 502."""
    with (
        launch(podman, gateway_image, redis_server, {}) as started,
        nginx(tmp_path, [port_of(base) for _, base in started]) as lb,
    ):
        results: list[int] = []
        errors: list[str] = []
        stop = threading.Event()

        def client() -> None:
            i = 0
            while not stop.is_set():
                try:
                    status, _, body = post(lb, f"rolling {i}")
                except OSError as exc:  # refused or reset: a lost request too
                    status, body = 0, {"exception": repr(exc)}
                results.append(status)
                if status != 200:
                    errors.append(f"{time.monotonic():.2f} {status} {body}")
                i += 1

        worker = threading.Thread(target=client, daemon=True)
        worker.start()
        try:
            for container, base in started:
                time.sleep(0.5)  # load on both replicas before each restart
                podman.run("stop", "-t", "10", container.name, timeout=30)
                assert container.inspect()["State"]["ExitCode"] == 0, container.logs()[-2000:]
                podman.run("start", container.name)
                container.wait_http(f"{base}/")
            time.sleep(0.5)
        finally:
            stop.set()
            worker.join(timeout=30)
        assert len(results) > 20
        failed = [s for s in results if s != 200]
        assert not failed, f"{len(failed)} of {len(results)} failed:\n" + "\n".join(errors[:10])
