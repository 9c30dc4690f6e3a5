"""``bench http`` end to end: it starts the service and the floor, loads both in alternating
rounds, and reports what they answered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_matrix_service.bench.http import merge_runs

from servers import REPO, server_env


def test_merge_runs_pools_latencies_and_sums_counts_and_time():
    first = ([0.1, 0.2], {"200": 2}, 1.5, {"decode": [0.01, 0.02]})
    second = ([0.3], {"200": 1, "503": 4}, 0.5, {"decode": [0.03], "total": [0.5]})
    latencies, statuses, wall, phases = merge_runs([first, second])
    assert latencies == [0.1, 0.2, 0.3]
    assert statuses == {"200": 3, "503": 4}
    assert wall == pytest.approx(2.0)
    assert phases == {"decode": [0.01, 0.02, 0.03], "total": [0.5]}


@pytest.mark.parametrize("clients", [1, 2])
def test_bench_http_loads_service_and_floor_in_rounds(tmp_path: Path, clients: int):
    out = tmp_path / "bench.json"
    command = [
        sys.executable, "-m", "gpu_matrix_service", "bench", "http", "--backend", "cpu",
        "--size", "8", "--concurrency", "2", "--duration", "1", "--rounds", "2",
        "--clients", str(clients), "--json", str(out), "--plot", str(tmp_path / "bench.png"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=server_env(), capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    report = json.loads(out.read_text())
    results = {r["target"]: r for r in report["results"]}
    assert set(results) == {"service", "floor"}
    for result in results.values():
        assert result["requests"] > 0 and result["errors"] == 0
        assert set(result["statuses"]) == {"200"}
        assert (result["rounds"], result["clients"]) == (2, clients)
        assert 0.9 < result["duration_s"] < 10
        assert result["p50_s"] <= result["p95_s"] <= result["p99_s"]
    assert "decode" in results["service"]["server_timings_s"]  # the service's own timings
    assert results["floor"]["server_timings_s"] == {}
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ratio,) = report["ratios"]
    assert ratio["rate_ratio"] == pytest.approx(results["service"]["rps"] / results["floor"]["rps"])
