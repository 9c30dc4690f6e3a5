"""A real Prometheus scrapes a real service: every dashboard and alert expression has data.

.ci/run installs Debian's prometheus; elsewhere the test skips without it (but never in CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from arrayfiles import npz_bytes
from promql import ALERTS, PROMETHEUS_CONFIG, alert_measures, dashboard_expressions, is_gpu_only
from servers import LiveServer, free_port

SCRAPE_SECONDS = 1


@pytest.fixture
def prometheus(live_server: LiveServer, tmp_path: Path) -> Iterator[str]:
    """Prometheus with the shipped config and rules, its target pointed at the live server."""
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed; .ci/run must install it")
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval=f"{SCRAPE_SECONDS}s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    # Only the service's job; its target moved to the test's port (dcgm is optional).
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "gpu-matrix-service")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{live_server.port}"]}]
    config["scrape_configs"] = [job]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_target_up(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def _wait_for_target_up(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited: {process.stderr.read()}")
        try:
            targets = httpx.get(f"{url}/api/v1/targets", timeout=2).json()["data"]
            if any(t["health"] == "up" for t in targets["activeTargets"]):
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError("prometheus never scraped the service")


def _traffic(service_url: str, seconds: float) -> None:
    """Good and bad requests for a while, so rates, quantiles and error series exist."""
    rng = np.random.default_rng()
    good = npz_bytes(rng.standard_normal((64, 64)).astype(np.float32))
    other = npz_bytes(rng.standard_normal((32, 64)).astype(np.float32))
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=service_url, timeout=30) as http:
        while time.monotonic() < deadline:
            for op in ("add", "matmul"):
                ok = http.post(f"/v1/ops/{op}", files={"a": ("a", good), "b": ("b", good)})
                assert ok.status_code == 200
            bad = http.post("/add", files={"a": ("a", good), "b": ("b", other)})
            assert bad.status_code == 400
            assert (
                http.post("/add", files={"a": ("a", b"junk"), "b": ("b", good)}).status_code == 400
            )
            http.get("/health")
            time.sleep(0.05)


def _query(url: str, expr: str) -> list[dict]:
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def _instantiate(expr: str) -> str:
    """Grafana's variables as Grafana would fill them in for 'All' and a 1 s scrape."""
    return expr.replace("$__rate_interval", "30s").replace("$instance", ".*")


def test_every_dashboard_and_alert_expression_returns_data(live_server, prometheus):
    _traffic(live_server.url, seconds=6)
    time.sleep(3 * SCRAPE_SECONDS)  # let the last scrapes land
    expressions = dashboard_expressions() + alert_measures()
    empty, gpu_only = [], []
    for where, expr in expressions:
        result = _query(prometheus, _instantiate(expr))
        if is_gpu_only(expr):
            gpu_only.append(where)  # NVML series: absent on a host without a GPU
        elif not result:
            empty.append(f"{where}: {expr}")
    print("GPU-only expressions, allowed to be empty here:", *gpu_only, sep="\n  ")
    assert not empty, "expressions without data:\n" + "\n".join(empty)
    assert len(gpu_only) < len(expressions) / 2


def test_error_ratio_counts_only_5xx_and_the_service_is_up(live_server, prometheus):
    _traffic(live_server.url, seconds=3)
    time.sleep(3 * SCRAPE_SECONDS)
    up = _query(prometheus, 'up{job="gpu-matrix-service"}')
    assert up and up[0]["value"][1] == "1"
    (ratio,) = _query(prometheus, dict(alert_measures())["alert GpuMatrixServiceHighErrorRatio"])
    assert float(ratio["value"][1]) == 0.0  # 400s are the client's errors, not ours
    errors = _query(prometheus, 'sum by (reason) (request_errors_total{job="gpu-matrix-service"})')
    reasons = {e["metric"]["reason"] for e in errors}
    assert {"ShapeMismatch", "BadArrayInput"} <= reasons
