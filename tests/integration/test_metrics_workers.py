"""With several server workers, /metrics merges every worker's counts (multiprocess mode)."""

from __future__ import annotations

import re
import sys

import httpx
import numpy as np

from arrayfiles import npz_bytes
from servers import LiveServer, free_port, server_env


def test_two_workers_report_the_sum_of_their_requests(tmp_path):
    port = free_port()
    args = [sys.executable, "-m", "gpu_matrix_service", "serve", "--port", str(port),
            "--workers", "2", "--metrics-dir", str(tmp_path / "metrics")]  # fmt: skip
    server = LiveServer(args, server_env(GMS_BACKEND="cpu", GMS_LOG_LEVEL="warning"), port)
    data = npz_bytes(np.random.default_rng().standard_normal((8, 8)))
    try:
        server.wait_ready()
        for _ in range(40):  # new connections, so both workers take some
            with httpx.Client(base_url=server.url) as http:
                assert http.post("/add", files={"a": ("a", data), "b": ("b", data)}).is_success
        for _ in range(6):
            with httpx.Client(base_url=server.url) as http:
                text = http.get("/metrics").text
            found = re.search(
                r'request_count_total\{endpoint="/add",method="POST",status="200"\} (\S+)', text
            )
            assert found and float(found[1]) == 40.0, text[:2000]
            assert 'service_info{backend="cpu"' in text
        # Both workers write their values there (each has its in-flight gauge file).
        workers = {f.name for f in (tmp_path / "metrics").glob("gauge_livesum_*.db")}
        assert len(workers) == 2, workers
    finally:
        server.stop()
