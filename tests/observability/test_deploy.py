"""deploy/: the Grafana dashboard only queries metrics the gateway exports, and the Prometheus
examples pass promtool.  (test_process.py also runs every dashboard query on a real Prometheus.)"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from inference_server.context import RequestContext
from inference_server.metrics import Metrics, MetricsSettings
from tests.observability.conftest import samples

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "inference-server.json"
_METRIC = re.compile(r"\b((?:inference|gen_ai)_[a-z_]+)\b")
#: Grafana's variables, as a dashboard user would have them.
VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$job": ".*", "$model": ".*"}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]


def as_sent(expr: str) -> str:
    for name, val in VARIABLES.items():
        expr = expr.replace(name, val)
    return expr


def full_exposition() -> set[str]:
    """Every sample name the gateway can export (each kind of event recorded once)."""
    m = Metrics(MetricsSettings())
    ctx = RequestContext("r")
    ctx.endpoint, ctx.model, ctx.route, ctx.provider = "/v1/chat/completions", "m", "m", "p"
    ctx.deployment, ctx.stream, ctx.attempts, ctx.status = "p/m", True, 1, 200
    ctx.first_token_secs, ctx.stream_secs = 0.1, 0.5
    ctx.usage = {"prompt_tokens": 3, "completion_tokens": 4}
    ctx.usage_estimated, ctx.experiment, ctx.variant = True, "e", "v"
    m.request_started(ctx.endpoint)
    m.request_finished(ctx, 0.7)
    m.attempt_finished("p", "p/m", "ok", 0.1)
    m.retry("p/m")
    m.fallback("a", "b")
    m.breaker_transition("p/m", "closed", "open")
    m.shadow_finished("e", "ok", 0.2)
    ctx.cache = "hit"
    m.request_finished(ctx, 0.001)
    m.cache_coalesced_request("m")
    m.cache_stored(100)
    m.cache_size(100, 1)
    m.cache_evicted("size")
    m.cache_error("get")
    from inference_server.limits import Decision, Dimension
    from inference_server.tenancy import TenantMetrics

    tenants = TenantMetrics(m, 10)
    tenants.admission("k", "rpm")
    tenants.decision("k", Decision(requests=Dimension(10, 5, 1.0)))
    tenants.tokens("k", ctx.usage)
    tenants.redis("admit", 0.001)
    tenants.redis("admit", None)
    tenants.publish()
    return {name for name, _, _ in samples(m.render()[0].decode())}


def test_dashboard_queries_only_exported_metrics() -> None:
    exported = full_exposition()
    queries = dashboard_queries()
    assert len(queries) >= 20
    used = {name for expr in queries for name in _METRIC.findall(expr)}
    assert used <= exported, used - exported
    # The dashboard covers what the issue asks for.
    for wanted in (
        "inference_requests_total",
        "inference_request_duration_seconds_bucket",
        "gen_ai_server_time_to_first_token_seconds_bucket",
        "gen_ai_server_time_per_output_token_seconds_bucket",
        "inference_tokens_total",
        "inference_gateway_overhead_seconds_bucket",
        "inference_circuit_breaker_state",
        "inference_experiment_requests_total",
        "inference_cache_requests_total",
        "inference_key_tokens_total",
        "inference_admissions_total",
    ):
        assert wanted in used, wanted


def test_dashboard_is_importable_json() -> None:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "inference-server"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for expr in dashboard_queries():
        for var in re.findall(r"\$(\w+)", expr):
            assert var.startswith("__") or var in variables, var
    # Every panel reads the chosen Prometheus data source.
    assert all(
        p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"] if "targets" in p
    )


def test_prometheus_examples_pass_promtool(promtool: str) -> None:
    for args in (["check", "config"], ["check", "rules"]):
        target = "prometheus.yml" if args[1] == "config" else "alerts.yml"
        result = subprocess.run(
            [promtool, *args, str(DEPLOY / "prometheus" / target)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, (result.stdout + result.stderr).decode()
