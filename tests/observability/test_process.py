"""The real server process: a real Prometheus scrapes ``--workers 2`` and PromQL sees every
request whichever worker served it; ``promtool`` accepts the multiprocess exposition; the
standard OTEL_* variables configure tracing of the real process."""

from __future__ import annotations

import http.client
import json
import signal
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.mmap_dict import MmapedDict

from tests.observability.conftest import check_metrics, require_binary, value
from tests.observability.otlp_receiver import HttpReceiver
from tests.observability.test_deploy import as_sent, dashboard_queries
from tests.support.procs import free_port, running_process
from tests.support.procs import gateway_process as gateway

CHAT = "/v1/chat/completions"
MAX_REQUESTS = 400


def mock(**options: Any) -> dict[str, Any]:
    return {
        "inference": {"provider": "mock", "options": {"reply_tokens": 8, **options}},
        "logging": {"level": "warning"},
    }


def chat(port: int, stream: bool) -> None:
    """One request on a new connection (SO_REUSEPORT spreads connections over the workers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    conn.request("POST", CHAT, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read()
    conn.close()


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text: str = resp.read().decode()
        return text


def promql(port: int, query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    reply = json.loads(get(url))
    assert reply["status"] == "success", reply
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def chats_in(db: Path) -> float:
    """Chat requests counted in one worker's mmap file."""
    total = 0.0
    read = MmapedDict.read_all_values_from_file
    for key, val, _, _ in read(str(db)):  # type: ignore[no-untyped-call]
        _, name, labels, _ = json.loads(key)
        if name == "inference_requests_total" and labels.get("endpoint") == CHAT:
            total += val
    return total


def test_prometheus_scrapes_two_workers_as_one(tmp_path: Path) -> None:
    prometheus = require_binary("prometheus")
    promtool = require_binary("promtool")
    mp_dir = tmp_path / "metrics"
    config = {**mock(), "metrics": {"multiprocess_dir": str(mp_dir)}}
    with gateway(tmp_path, config, "--workers", "2") as (_, port):
        # The readiness probe saw one worker; send until both have served chats (the kernel
        # spreads new connections over the listening workers), bounded in count and time.
        sent = 0
        served: dict[str, float] = {}
        deadline = time.monotonic() + 20
        while sent < MAX_REQUESTS and time.monotonic() < deadline:
            for _ in range(10):
                chat(port, stream=sent % 2 == 0)
                sent += 1
            served = {f.name: chats_in(f) for f in mp_dir.glob("counter_*.db")}
            if len(served) == 2 and all(n > 0 for n in served.values()):
                break
        assert len(served) == 2, served
        assert all(n > 0 for n in served.values()), served
        assert sum(served.values()) == sent
        # Every worker's values reach every scrape, whichever worker answers it.
        for _ in range(6):
            out = get(f"http://127.0.0.1:{port}/metrics")
            assert value(out, "inference_requests_total", endpoint=CHAT) == sent
        check_metrics(promtool, out)
        assert len([s for s in out.splitlines() if s.startswith("inference_build_info{")]) == 2

        prom_port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "inference-server",
                            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
                        }
                    ],
                }
            )
        )
        with running_process(
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            env=None,
            ready_url=f"http://127.0.0.1:{prom_port}/-/ready",
            timeout=60,
            log_path=tmp_path / "prometheus.log",
        ):
            query = (
                f'sum by (job) (inference_requests_total{{endpoint="{CHAT}",status_class="2xx"}})'
            )
            deadline = time.monotonic() + 30
            result: list[dict[str, Any]] = []
            while time.monotonic() < deadline:
                result = promql(prom_port, query)
                if result and float(result[0]["value"][1]) == sent:
                    break
                time.sleep(0.5)
            assert result, "no series in Prometheus"
            assert result[0]["metric"] == {"job": "inference-server"}
            assert float(result[0]["value"][1]) == sent
            ttft = promql(
                prom_port,
                "histogram_quantile(0.5, sum by (le, model) "
                "(gen_ai_server_time_to_first_token_seconds_bucket))",
            )
            assert ttft[0]["metric"] == {"model": "gpt-oss-20b"}
            up = promql(prom_port, 'up{job="inference-server"}')
            assert float(up[0]["value"][1]) == 1
            # Every query of the Grafana dashboard is valid PromQL for this Prometheus.
            for expr in dashboard_queries():
                promql(prom_port, as_sent(expr))


async def test_otel_environment_configures_the_real_process(
    tmp_path: Path, otlp_http: HttpReceiver
) -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_http.url.removesuffix("/v1/traces"),
        "OTEL_SERVICE_NAME": "gateway-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    with gateway(tmp_path, mock(), env=env) as (proc, port):
        chat(port, stream=True)  # blocking, but the export waits for us, not the reverse
        wanted = {"POST /v1/chat/completions", "inference.stream", "chat gpt-oss-20b"}
        spans = await otlp_http.wait_for(lambda s: wanted <= {x.name for x in s})
        proc.send_signal(signal.SIGTERM)
    server = next(s for s in spans if s.name == "POST /v1/chat/completions")
    assert server.resource["service.name"] == "gateway-under-test"
    assert server.attributes["gen_ai.usage.output_tokens"] == 8
    assert any(s.name == "chat gpt-oss-20b" and s.parent_span_id == server.span_id for s in spans)
