"""The shipped dashboard and alert rules: valid, complete, and only about metrics we export."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from gpu_matrix_service.gpu import GpuMonitor
from gpu_matrix_service.metrics import GpuCollector, ServiceMetrics

from fake_nvml import FakeGpu, FakeNvml
from promql import (
    ALERTS,
    PROMETHEUS_CONFIG,
    REPO,
    alert_measures,
    alert_rules,
    dashboard,
    dashboard_expressions,
    dashboard_panels,
    metric_names,
)


def exported_series_names() -> set[str]:
    """Every series name /metrics can show, GPU ones included (through a fake NVML)."""
    metrics = ServiceMetrics()
    metrics.add_collector(GpuCollector(GpuMonitor(FakeNvml([FakeGpu()]))))
    metrics.request_count.labels("GET", "/x", "200").inc()
    metrics.request_latency.labels("GET", "/x").observe(0.1)
    metrics.request_errors.labels("/x", "BadRequest").inc()
    metrics.upload_bytes.labels("/x").observe(10)
    metrics.compute_seconds.labels("add", "cpu", "CPU", "total").observe(0.1)
    metrics.elements_processed.labels("add", "cpu").inc()
    metrics.service_info.labels("1", "cpu", "i").set(1)
    text = metrics.render().decode()
    return set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.MULTILINE)) | {"up"}


def test_dashboard_is_valid_json_with_an_instance_variable():
    board = dashboard()
    assert board["uid"] == "gpu-matrix-service"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["instance"]["includeAll"] and variables["instance"]["multi"]
    assert variables["datasource"]["query"] == "prometheus"


def test_every_panel_has_a_datasource_and_a_query():
    panels = dashboard_panels()
    assert len(panels) >= 10
    for panel in panels:
        assert panel["datasource"]["type"] == "prometheus", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${datasource}"


def test_dashboard_covers_what_operators_need():
    titles = " | ".join(panel["title"] for panel in dashboard_panels()).lower()
    for topic in ("gpu memory held per service instance", "gpu memory per gpu", "utilisation",
                  "latency distribution", "p50 / p95 / p99", "calls per second", "error rate",
                  "compute time by phase"):  # fmt: skip
        assert topic in titles, topic
    kinds = {panel["type"] for panel in dashboard_panels()}
    assert "heatmap" in kinds


def test_every_metric_named_in_dashboard_and_alerts_is_exported():
    exported = exported_series_names()
    for where, expr in dashboard_expressions() + alert_measures():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr}"
        unknown = names - exported
        assert not unknown, f"{where} names metrics the service does not export: {unknown}"


def test_alert_rules_cover_the_required_conditions():
    names = {rule["alert"] for rule in alert_rules()}
    assert names == {"GpuMatrixServiceDown", "GpuMatrixServiceHighErrorRatio",
                     "GpuMatrixServiceHighLatency", "GpuMemoryAlmostFull", "GpuTooHot"}  # fmt: skip
    for rule in alert_rules():
        assert rule["for"] and rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]


def test_grafana_provisioning_points_at_the_dashboards():
    provider = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/dashboards/gpu-matrix-service.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert source["datasources"][0]["uid"] == "prometheus"


def test_compose_mounts_the_configs_and_keeps_grafana_closed():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {"gpu-matrix-service", "prometheus", "grafana"}
    volumes = " ".join(services["prometheus"]["volumes"] + services["grafana"]["volumes"])
    for path in ("deploy/prometheus/prometheus.yml", "deploy/prometheus/alerts.yml",
                 "deploy/grafana/provisioning", "deploy/grafana/dashboards"):  # fmt: skip
        assert path in volumes
        assert (REPO / path).exists()
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "${GRAFANA_ANONYMOUS_VIEWING:-false}"
    assert "GRAFANA_ADMIN_PASSWORD" in grafana["GF_SECURITY_ADMIN_PASSWORD"]
    device = services["gpu-matrix-service"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


@pytest.mark.parametrize(
    ("args", "path"), [(["check", "config"], PROMETHEUS_CONFIG), (["check", "rules"], ALERTS)]
)
def test_promtool_accepts_the_shipped_config(args, path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (.ci/run installs Debian's prometheus)")
    done = subprocess.run([promtool, *args, str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
