"""deploy/compose/: the compose stack is consistent without bringing it up.

Its images (nginx, Redis, Prometheus, Grafana, the Collector) cannot be pulled on the machines
the suite runs on, so what can be held here is held: every mounted file exists, every name one
service uses for another is a service, the ports agree with the image's, the gateways' settings
(file + environment) pass the gateway's own validation, Prometheus' configuration passes
``promtool check config`` and nginx's passes ``nginx -t``. tests/container/test_stack.py runs the
same nginx configuration and settings for real in front of two gateway containers and Redis.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from inference_server.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
DOCKERFILE = (REPO / "Dockerfile").read_text()
GATEWAYS = ("gateway-1", "gateway-2")


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
    return data


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """target path in the container → source path on the host, for every bind mount."""
    out = {}
    for spec in service.get("volumes", []):
        source, target, *_ = spec.split(":")
        out[target] = (COMPOSE_DIR / source).resolve()
    return out


def image_port() -> int:
    match = re.search(r"^EXPOSE (\d+)$", DOCKERFILE, re.M)
    assert match
    return int(match.group(1))


def upstream_servers(nginx_conf: str) -> list[str]:
    block = re.search(r"upstream inference_gateways \{(.*?)\}", nginx_conf, re.S)
    assert block
    return re.findall(r"^\s*server\s+(\S+?)(?:\s|;)", block.group(1), re.M)


def test_services_and_references() -> None:
    services = compose()["services"]
    assert set(services) == {*GATEWAYS, "nginx", "redis", "prometheus", "grafana", "otel-collector"}
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for target, source in mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
            # A file mounted where a file is expected, a folder where a folder is.
            assert source.is_file() == bool(re.search(r"\.(ya?ml|conf|json)$", target)), target
    for name in GATEWAYS:
        build = services[name]["build"]
        assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve().is_file()
        assert str(image_port()) in services[name]["expose"]
    # Only nginx (and the UIs) publish ports: clients reach the replicas through it.
    assert services["nginx"]["ports"] == [f"{image_port()}:{image_port()}"]
    assert not any("ports" in services[name] for name in GATEWAYS)


def test_gateway_settings_pass_validation(clean_env: pytest.MonkeyPatch) -> None:
    """The mounted settings.yaml is the one the image reads, and with the compose environment
    it passes the gateway's own validation (Redis state + cache, OTLP to the Collector)."""
    services = compose()["services"]
    config = re.search(r'"--config", "(/[^"]+)"', DOCKERFILE)
    assert config
    for name in GATEWAYS:
        service = services[name]
        settings_file = mounts(service)[config.group(1)]
        for key in list(service["environment"]):
            if key.startswith("OTEL_"):
                continue  # telemetry.resolve() reads them when the app starts
            clean_env.setenv(key, str(service["environment"][key]))
        clean_env.setenv("INFERENCE_SERVER_PORT", str(image_port()))  # the image's ENV
        settings = load_settings(settings_file, env=service["environment"]["RUN_ENV"])
        assert settings.server.host == "0.0.0.0"
        assert settings.state.backend == "redis"
        assert settings.cache.backend == "redis"
        url = urlsplit(settings.state.redis_url or "")
        assert url.hostname in services
        assert "redis-server" in services[url.hostname]["command"]
        assert settings.providers["local"].plugin == "mock"
        otlp = urlsplit(service["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert otlp.hostname == "otel-collector"
        assert str(otlp.port) in services["otel-collector"]["expose"]


def test_collector_receives_otlp_and_prints_traces() -> None:
    collector = compose()["services"]["otel-collector"]
    config_path = mounts(collector)["/etc/otelcol/config.yaml"]
    assert f"--config={'/etc/otelcol/config.yaml'}" in collector["command"]
    config = yaml.safe_load(config_path.read_text())
    pipeline = config["service"]["pipelines"]["traces"]
    assert set(pipeline["receivers"]) <= set(config["receivers"])
    assert set(pipeline.get("processors", [])) <= set(config.get("processors", {}))
    assert set(pipeline["exporters"]) <= set(config["exporters"])
    assert "debug" in pipeline["exporters"]
    http = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert http.endswith(":4318")
    assert http.startswith("0.0.0.0")  # reachable from the gateway containers


def test_grafana_provisions_the_dashboard() -> None:
    services = compose()["services"]
    grafana = mounts(services["grafana"])
    dashboards = yaml.safe_load(
        (grafana["/etc/grafana/provisioning/dashboards"] / "inference-server.yaml").read_text()
    )
    folder = dashboards["providers"][0]["options"]["path"]
    json_mounts = {t: s for t, s in grafana.items() if t.startswith(folder + "/")}
    assert json_mounts == {
        f"{folder}/inference-server.json": REPO / "deploy" / "grafana" / "inference-server.json"
    }
    sources = yaml.safe_load(
        (grafana["/etc/grafana/provisioning/datasources"] / "prometheus.yaml").read_text()
    )
    prometheus = sources["datasources"][0]
    assert prometheus["type"] == "prometheus"
    assert prometheus["isDefault"] is True  # the dashboard's datasource variable picks it
    url = urlsplit(prometheus["url"])
    assert url.hostname == "prometheus"
    assert f"{url.port}:{url.port}" in services["prometheus"]["ports"]


def test_prometheus_scrapes_both_replicas_and_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("PROMTOOL IS NOT INSTALLED (`make system-deps`): prometheus.yml not checked")
    prometheus = mounts(compose()["services"]["prometheus"])
    # Lay the files out as the container sees them (alerts.yml beside prometheus.yml).
    for target, source in prometheus.items():
        assert target.startswith("/etc/prometheus/")
        shutil.copy(source, tmp_path / Path(target).name)
    config = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = [t for sc in jobs["inference-server"]["static_configs"] for t in sc["targets"]]
    assert sorted(targets) == [f"{g}:{image_port()}" for g in GATEWAYS]
    proc = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_nginx_balances_both_replicas_and_passes_nginx_t(tmp_path: Path) -> None:
    conf = (COMPOSE_DIR / "nginx.conf").read_text()
    assert mounts(compose()["services"]["nginx"]) == {
        "/etc/nginx/conf.d/default.conf": COMPOSE_DIR / "nginx.conf"
    }
    assert sorted(upstream_servers(conf)) == [f"{g}:{image_port()}" for g in GATEWAYS]
    assert re.search(rf"^\s*listen {image_port()};", conf, re.M)
    assert "proxy_buffering off;" in conf  # streams
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx is None:
        pytest.skip("NGINX IS NOT INSTALLED (`make system-deps`): nginx.conf not checked")
    # The official image includes conf.d/*.conf inside `http {}`; the service names resolve only
    # on the compose network, so they stand for loopback here.
    local = conf
    for name in GATEWAYS:
        local = local.replace(f"{name}:", "127.0.0.1:")
    (tmp_path / "default.conf").write_text(local)
    (tmp_path / "nginx.conf").write_text(
        "pid nginx.pid;\nerror_log stderr;\nevents {}\n"
        "http {\n  access_log off;\n  include default.conf;\n}\n"
    )
    proc = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "test is successful" in proc.stderr
