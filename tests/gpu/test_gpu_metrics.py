"""On a GPU machine: after a GPU request, /metrics carries plausible NVML series."""

from __future__ import annotations

import re

import numpy as np
import pytest
from fastapi.testclient import TestClient

from gpu_matrix_service.app import create_app
from gpu_matrix_service.settings import Settings

from arrayfiles import npz_bytes


def _values(text: str, name: str) -> list[float]:
    return [float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)]


@pytest.mark.gpu
def test_metrics_show_gpu_series_after_a_gpu_request(rng):
    a = rng.standard_normal((2048, 2048)).astype(np.float32)
    with TestClient(create_app(Settings(backend="auto", _env_file=None))) as client:
        response = client.post("/add", files={"a": ("a", npz_bytes(a)), "b": ("b", npz_bytes(a))})
        assert response.json()["device"] == "GPU"
        text = client.get("/metrics").text
    used, total = _values(text, "gpu_memory_used_bytes"), _values(text, "gpu_memory_total_bytes")
    assert used and all(0 < u <= t for u, t in zip(used, total, strict=True))
    assert sum(_values(text, "gpu_process_memory_bytes")) > 0  # this process holds memory
    assert all(0 <= u <= 1 for u in _values(text, "gpu_utilization_ratio"))
    assert all(10 < t < 100 for t in _values(text, "gpu_temperature_celsius"))
