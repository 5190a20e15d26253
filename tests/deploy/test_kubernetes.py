"""deploy/kubernetes/: the kustomize manifests render offline, validate against the Kubernetes
schemas (kubernetes-validate) and agree with the image and with each other.

No cluster runs here, so "works" is held by what can be checked without one: every resource passes
the schema of its kind (strict: an unknown or misspelt field fails); the ServiceMonitor is a CRD
with no schema in kubernetes-validate, so its fields are checked by hand below; every selector
finds the pods; the ports, probes, user and mount path are the Dockerfile's; the settings the
pods get (ConfigMap + Secret + the Deployment's INFERENCE_* variables) pass the gateway's own
validation in RUN_ENV=production.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from inference_server.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "deploy" / "kubernetes"
DOCKERFILE = (REPO / "Dockerfile").read_text()
K8S_VERSION = "1.37.0"
#: Kinds kubernetes-validate has no schema for (CRDs), checked by hand instead.
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def render(target: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip(
            "KUBECTL IS NOT INSTALLED: the Kubernetes manifests were not rendered or validated"
        )
    proc = subprocess.run(
        [kubectl, "kustomize", str(KUBE / target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def by_prefix(docs: list[dict[str, Any]], kind: str, prefix: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(prefix)]
    assert len(found) == 1, f"{kind}/{prefix}*: {len(found)} found"
    return found[0]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def gateway_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "inference-server")


@pytest.fixture(scope="module", params=["base", "overlays/production"])
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def test_every_resource_passes_the_kubernetes_schemas(rendered: list[dict[str, Any]]) -> None:
    kinds = set()
    for doc in rendered:
        kinds.add(doc["kind"])
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError
    wanted = {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    assert wanted | {"ConfigMap", "Secret"} <= kinds


def test_strict_validation_catches_a_misspelt_field() -> None:
    """The check above can fail: a typo in a manifest is an error, not ignored."""
    docs = render("base")
    deployment = one(docs, "Deployment", "inference-server")
    gateway_container(deployment)["readinesProbe"] = {"httpGet": {"path": "/", "port": 8080}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_deployment_matches_the_image(rendered: list[dict[str, Any]]) -> None:
    deployment = one(rendered, "Deployment", "inference-server")
    pod = deployment["spec"]["template"]["spec"]
    container = gateway_container(deployment)
    expose = re.search(r"^EXPOSE (\d+)$", DOCKERFILE, re.M)
    user = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE, re.M)
    config = re.search(r'"--config", "(/[^"]+)/settings\.yaml"', DOCKERFILE)
    assert expose
    assert user
    assert config
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(expose.group(1))
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert "/health/live" in DOCKERFILE  # the image's HEALTHCHECK probes the same endpoint
    assert container["resources"]["requests"]["cpu"]  # the HPA's utilisation needs a request
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(user.group(1))
    assert pod["securityContext"]["runAsGroup"] == int(user.group(2))
    sec = container["securityContext"]
    assert sec["readOnlyRootFilesystem"] is True
    assert sec["allowPrivilegeEscalation"] is False
    assert sec["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[config.group(1)] == "config"
    assert mounts["/tmp"] == "tmp"  # noqa: S108  the only writable path (read-only root filesystem)


def test_selectors_find_the_pods(rendered: list[dict[str, Any]]) -> None:
    deployment = one(rendered, "Deployment", "inference-server")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = one(rendered, "Service", "inference-server")
    assert matches(service["spec"]["selector"], pod_labels)
    container = gateway_container(deployment)
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    pdb = one(rendered, "PodDisruptionBudget", "inference-server")
    assert matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    hpa = one(rendered, "HorizontalPodAutoscaler", "inference-server")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "inference-server")
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]
    # No other Service selects the gateway's pods (e.g. the Redis component's).
    others = [d for d in rendered if d["kind"] == "Service" and d is not service]
    assert not any(matches(s["spec"]["selector"], pod_labels) for s in others)


def test_servicemonitor_scrapes_the_service() -> None:
    """The CRD the schemas do not cover: its fields, by hand, against the rendered Service."""
    docs = render("overlays/production")
    monitor = one(docs, "ServiceMonitor", "inference-server")
    service = one(docs, "Service", "inference-server")
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"
    # The Redis Service is not scraped as a gateway.
    redis = one(docs, "Service", "inference-server-redis")
    assert not matches(monitor["spec"]["selector"]["matchLabels"], redis["metadata"]["labels"])


def test_pods_settings_pass_the_gateways_validation(
    rendered: list[dict[str, Any]], tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    """settings.yaml (ConfigMap) + .secrets.yaml (Secret) + the Deployment's env, as a pod sees
    them, load in production with no problem; the shutdown fits the grace period."""
    deployment = one(rendered, "Deployment", "inference-server")
    volume = next(
        v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"
    )
    sources = volume["projected"]["sources"]
    cm_name = next(s["configMap"]["name"] for s in sources if "configMap" in s)
    secret_name = next(s["secret"]["name"] for s in sources if "secret" in s)
    configmap = one(rendered, "ConfigMap", cm_name)  # the generated name, hash suffix and all
    secret = one(rendered, "Secret", secret_name)
    (tmp_path / "settings.yaml").write_text(configmap["data"]["settings.yaml"])
    (tmp_path / ".secrets.yaml").write_bytes(base64.b64decode(secret["data"][".secrets.yaml"]))
    container = gateway_container(deployment)
    clean_env.setenv("INFERENCE_SERVER_PORT", "8080")  # the image's ENV
    for var in container.get("env", []):
        clean_env.setenv(var["name"], var["value"])
    settings = load_settings(tmp_path / "settings.yaml", env="production")
    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == 8080
    assert settings.logging.format == "json"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert settings.server.shutdown_timeout_secs + pre_stop <= grace
    if any(d["kind"] == "Service" and d["metadata"]["name"].endswith("-redis") for d in rendered):
        redis_service = by_prefix(rendered, "Service", "inference-server-redis")
        url = urlsplit(settings.state.redis_url or "")
        assert settings.state.backend == "redis"
        assert url.hostname == redis_service["metadata"]["name"]
        assert url.port in {p["port"] for p in redis_service["spec"]["ports"]}
