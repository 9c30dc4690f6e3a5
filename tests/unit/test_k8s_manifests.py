"""deploy/k8s/ against the Kubernetes schemas, offline, and against what the service needs.

Core kinds (Deployment, Service, HorizontalPodAutoscaler, and the RayService's pod templates)
are validated with kubernetes-validate's bundled strict schemas (unknown fields fail), for the
oldest Kubernetes we support and the newest it knows. The custom resources get their required
fields checked here: the RayService's serveConfigV2 against Ray Serve's own config schema
(when Ray is installed) and against deploy/ray/serve.yaml, which it must repeat.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import yaml

from servers import REPO

try:
    import kubernetes_validate
except ImportError:
    if os.environ.get("CI"):
        raise  # the dev group has it: in CI its absence is a broken setup, not a skip
    pytest.skip("kubernetes-validate is not installed", allow_module_level=True)

K8S = REPO / "deploy" / "k8s"
SERVE_CONFIG = REPO / "deploy" / "ray" / "serve.yaml"
OLDEST_KUBERNETES = "1.27"
KUBERNETES_VERSIONS = [OLDEST_KUBERNETES, kubernetes_validate.latest_version()]
PLAIN_PATH = ["deployment.yaml", "service.yaml", "hpa.yaml", "servicemonitor.yaml"]
CORE_KINDS = {"Deployment", "Service", "HorizontalPodAutoscaler"}


def load(name: str) -> dict[str, Any]:
    (document,) = yaml.safe_load_all((K8S / name).read_text())
    return document


def manifests() -> dict[str, dict[str, Any]]:
    return {path.name: load(path.name) for path in sorted(K8S.glob("*.yaml"))}


def validate(document: dict[str, Any], version: str) -> None:
    """Strict schema validation; a readable failure names the field."""
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(part) for part in exc.path)
        pytest.fail(f"{document['kind']} {where}: {exc.message}")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", ["deployment.yaml", "service.yaml", "hpa.yaml"])
def test_core_manifest_matches_the_kubernetes_schema(name: str, version: str):
    document = load(name)
    assert document["kind"] in CORE_KINDS
    validate(document, version)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rayservice_pod_templates_match_the_kubernetes_schema(version: str):
    cluster = load("rayservice.yaml")["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "check"},
            "template": group["template"],
        }
        validate(pod_template, version)


def test_kustomization_lists_the_plain_path_and_every_file_exists():
    kustomization = load("kustomization.yaml")
    assert kustomization["resources"] == PLAIN_PATH
    assert all((K8S / name).is_file() for name in kustomization["resources"])
    # Every manifest here is either part of the plain path or the KubeRay alternative.
    assert set(manifests()) == {"kustomization.yaml", "rayservice.yaml", *PLAIN_PATH}


def container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod_spec["containers"]
    return only


def test_deployment_holds_one_gpu_and_probes_the_health_endpoints():
    pod = load("deployment.yaml")["spec"]["template"]["spec"]
    main = container(pod)
    assert str(main["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    port_names = {port["name"] for port in main["ports"]}
    assert main["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert main["livenessProbe"]["httpGet"]["path"] == "/health/live"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert main[probe]["httpGet"]["port"] in port_names
    env = {item["name"]: item.get("value") for item in main["env"]}
    grace = pod["terminationGracePeriodSeconds"]
    assert float(env["GMS_SHUTDOWN_TIMEOUT_SECONDS"]) < grace, "pods killed mid-drain"
    assert main["command"] == ["gpu-matrix-service", "serve"]


def test_service_hpa_and_servicemonitor_point_at_the_deployment():
    deployment, service = load("deployment.yaml"), load("service.yaml")
    hpa, monitor = load("hpa.yaml"), load("servicemonitor.yaml")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {
        p["name"] for p in container(deployment["spec"]["template"]["spec"])["ports"]
    }
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports

    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_rayservice_has_kuberays_required_fields():
    rayservice = load("rayservice.yaml")
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    assert rayservice["metadata"]["name"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    head, workers = cluster["headGroupSpec"], cluster["workerGroupSpecs"]
    # KubeRay's rayStartParams is map[string]string: a bare number would be rejected.
    for group in [head, *workers]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert container(group["template"]["spec"])["image"]
    for worker in workers:
        assert worker["groupName"]
        assert worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
        limits = container(worker["template"]["spec"])["resources"]["limits"]
        assert str(limits["nvidia.com/gpu"]) == "1"
    assert isinstance(cluster["rayVersion"], str) and cluster["rayVersion"].startswith("2.")


def test_rayservice_serves_the_applications_of_the_serve_config():
    serve_config = yaml.safe_load(SERVE_CONFIG.read_text())
    embedded = yaml.safe_load(load("rayservice.yaml")["spec"]["serveConfigV2"])
    assert embedded["applications"] == serve_config["applications"]


def test_rayservice_serve_config_passes_ray_serves_schema():
    schema = pytest.importorskip("ray.serve.schema")
    embedded = yaml.safe_load(load("rayservice.yaml")["spec"]["serveConfigV2"])
    schema.ServeDeploySchema.model_validate(embedded)


def test_strict_validation_catches_a_misspelt_field():
    # The guard itself: a typo a loose schema would let through must fail here.
    deployment = load("deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)
