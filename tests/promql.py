"""The PromQL the project ships (dashboard panels, alert rules), as (where, expression) pairs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy/grafana/dashboards/gpu-matrix-service.json"
ALERTS = REPO / "deploy/prometheus/alerts.yml"
PROMETHEUS_CONFIG = REPO / "deploy/prometheus/prometheus.yml"

# `<measure> <comparison> <number>` at the end of an alert expression.
THRESHOLD = re.compile(r"^(?P<measure>.*?)\s*(?:==|!=|>=|<=|>|<)\s*[0-9.]+\s*$", re.DOTALL)
METRIC_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def dashboard_expressions() -> list[tuple[str, str]]:
    return [
        (f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in dashboard_panels()
        for target in panel["targets"]
    ]


def alert_rules() -> list[dict]:
    return [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]


def alert_measures() -> list[tuple[str, str]]:
    """Each alert's expression without its threshold: what must return data when healthy."""
    measures = []
    for rule in alert_rules():
        match = THRESHOLD.match(rule["expr"].strip())
        assert match, f"alert {rule['alert']} is not '<measure> <op> <threshold>'"
        measures.append((f"alert {rule['alert']}", match["measure"]))
    return measures


def metric_names(expr: str) -> set[str]:
    """Metric names used in selectors (``name{...}``) of an expression."""
    keywords = {"by", "without", "on", "ignoring", "group_left", "group_right"}
    return {name for name in METRIC_SELECTOR.findall(expr) if name not in keywords}


def is_gpu_only(expr: str) -> bool:
    """Expressions over NVML series, which are absent on a host without a GPU."""
    return any(name.startswith("gpu_") for name in metric_names(expr))
