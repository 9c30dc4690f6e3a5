"""ServiceMetrics records a computation's phases and elements under the right labels."""

from __future__ import annotations

from gpu_matrix_service.metrics import ServiceMetrics


def test_each_phase_of_each_computation_lands_in_its_own_series():
    metrics = ServiceMetrics()
    metrics.record_computation("add", "cuda", "GPU", {"decode": 0.5, "total": 2.0}, 16)
    metrics.record_computation("add", "cuda", "GPU", {"decode": 0.25, "total": 1.0}, 4)
    metrics.record_computation("add", "cuda", "GPU", {"h2d": 3.0, "total": 4.0}, 1)
    metrics.record_computation("matmul", "cpu", "CPU", {"total": 8.0}, 9)

    def seconds(op: str, backend: str, device: str, phase: str) -> tuple[float, float] | None:
        labels = {"op": op, "backend": backend, "device": device, "phase": phase}
        count = metrics.registry.get_sample_value("compute_seconds_count", labels)
        total = metrics.registry.get_sample_value("compute_seconds_sum", labels)
        return None if count is None else (count, total)

    assert seconds("add", "cuda", "GPU", "decode") == (2.0, 0.75)
    assert seconds("add", "cuda", "GPU", "h2d") == (1.0, 3.0)
    assert seconds("add", "cuda", "GPU", "total") == (3.0, 7.0)
    assert seconds("matmul", "cpu", "CPU", "total") == (1.0, 8.0)
    assert seconds("matmul", "cpu", "CPU", "decode") is None
    elements = "matrix_elements_processed_total"
    assert metrics.registry.get_sample_value(elements, {"op": "add", "backend": "cuda"}) == 21
    assert metrics.registry.get_sample_value(elements, {"op": "matmul", "backend": "cpu"}) == 9
