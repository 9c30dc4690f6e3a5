"""ServiceMetrics records requests and computations under the right labels, and a batch
written by flush() reads exactly as the same values observed one at a time."""

from __future__ import annotations

import random
import sys
import threading

import pytest

from gpu_matrix_service.metrics import LATENCY_BUCKETS, ServiceMetrics


def test_each_phase_of_each_computation_lands_in_its_own_series():
    metrics = ServiceMetrics()
    metrics.record_computation("add", "cuda", "GPU", {"decode": 0.5, "total": 2.0}, 16)
    metrics.record_computation("add", "cuda", "GPU", {"decode": 0.25, "total": 1.0}, 4)
    metrics.record_computation("add", "cuda", "GPU", {"h2d": 3.0, "total": 4.0}, 1)
    metrics.record_computation("matmul", "cpu", "CPU", {"total": 8.0}, 9)
    metrics.flush()

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


def test_values_wait_for_a_flush_and_a_render_flushes_first():
    metrics = ServiceMetrics()
    metrics.request_started()
    metrics.request_started()
    metrics.request_ended("POST", "/add", 200, 0.003)
    count = {"method": "POST", "endpoint": "/add", "status": "200"}
    assert metrics.registry.get_sample_value("request_count_total", count) == 0.0
    text = metrics.render().decode()
    assert 'request_count_total{endpoint="/add",method="POST",status="200"} 1.0' in text
    assert "requests_in_flight 1.0" in text  # the one still in progress
    latency = {"method": "POST", "endpoint": "/add", "le": "0.005"}
    assert metrics.registry.get_sample_value("request_latency_seconds_bucket", latency) == 1.0


def exposition(metrics: ServiceMetrics) -> str:
    return metrics.render().decode()


@pytest.mark.parametrize("seed", range(5))
def test_a_flushed_batch_reads_as_the_same_values_observed_one_at_a_time(seed):
    rng = random.Random(seed)
    # Values on every bucket bound, just beside them, beyond the last, zero and negative.
    values = [*LATENCY_BUCKETS, *(b * (1 + 1e-12) for b in LATENCY_BUCKETS), 0.0, -1.0, 1e9]
    values += [rng.uniform(0, 70) for _ in range(200)]
    rng.shuffle(values)
    batched, direct = ServiceMetrics(), ServiceMetrics()
    direct.batched = False  # what multiprocess mode does: write every value at once
    for value in values:
        for metrics in (batched, direct):
            metrics.request_started()
            metrics.request_ended("POST", "/v1/ops/{op}", 200, value)
            metrics.record_computation("add", "cpu", "CPU", {"decode": value, "total": 1}, 3)
            metrics.series(metrics.upload_bytes, "/add").record(value * 1e6)
    assert exposition(batched) == exposition(direct)
    labels = {"method": "POST", "endpoint": "/v1/ops/{op}"}
    count = batched.registry.get_sample_value("request_latency_seconds_count", labels)
    assert count == len(values)


def test_values_recorded_while_another_thread_flushes_are_all_written():
    metrics = ServiceMetrics()
    stop = threading.Event()

    def flush_until_stopped() -> None:
        while not stop.is_set():
            metrics.flush()

    flusher = threading.Thread(target=flush_until_stopped)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show
    flusher.start()
    try:
        for _ in range(20000):
            metrics.request_started()
            metrics.request_ended("GET", "/health", 200, 0.001)
    finally:
        stop.set()
        flusher.join()
        sys.setswitchinterval(interval)
    labels = {"method": "GET", "endpoint": "/health", "status": "200"}
    metrics.flush()
    assert metrics.registry.get_sample_value("request_count_total", labels) == 20000.0
    assert metrics.registry.get_sample_value("requests_in_flight", {}) == 0.0


class AppendsWhileTaken(list):
    """A pending list that gets a value appended just as flush() takes its batch: what a
    request on another thread can do between the two steps."""

    def __getitem__(self, index):
        taken = super().__getitem__(index)
        if isinstance(index, slice):
            self.append(1.0)
        return taken


def test_a_value_appended_while_a_flush_takes_its_batch_waits_for_the_next_flush():
    metrics = ServiceMetrics()
    series = metrics.series(metrics.request_count, "GET", "/health", "200")
    series._pending = pending = AppendsWhileTaken([1.0, 1.0])
    series.record = pending.append
    labels = {"method": "GET", "endpoint": "/health", "status": "200"}
    metrics.flush()
    assert metrics.registry.get_sample_value("request_count_total", labels) == 2.0
    assert pending == [1.0]  # the value appended meanwhile is kept, not dropped
