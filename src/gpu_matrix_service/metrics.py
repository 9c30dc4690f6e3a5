"""Every Prometheus metric of the service, defined once, here, in its own registry.

Each app gets its own :class:`ServiceMetrics` (and registry), so tests can build many apps in
one process. GPU readings come from :class:`GpuCollector`, which asks NVML when Prometheus
scrapes; without a GPU its series are simply absent.

With several server workers, prometheus-client's multiprocess mode is used: each worker
writes its values to files under ``multiprocess_dir`` (the CLI sets that up, together with
``PROMETHEUS_MULTIPROC_DIR``, before the workers start) and a scrape of any worker merges them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from gpu_matrix_service.gpu import GpuMonitor

# From 1 ms (a small add on a warm GPU) to 60 s (a huge matmul on the CPU fallback).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# 1 KiB to 4 GiB, by factors of 4.
UPLOAD_BUCKETS = tuple(float(1024 * 4**i) for i in range(12))

CONTENT_TYPE = CONTENT_TYPE_LATEST

# The *_created series double the exposition size and no dashboard or alert of ours uses them.
disable_created_metrics()


class ServiceMetrics:
    """The service's request and compute metrics, in a registry of their own."""

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry(auto_describe=True)
        self._scrape_time_collectors: list[Collector] = []
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        self._computation_children: dict[tuple[str, ...], tuple[tuple[Any, ...], Any]] = {}
        r = self.registry
        self.request_count = Counter(
            "request_count",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "endpoint", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "request_latency_seconds",
            "Wall time from request start to the end of the response, in seconds.",
            ["method", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_errors = Counter(
            "request_errors",
            "Requests answered with an error, by route template and reason (error type).",
            ["endpoint", "reason"],
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "requests_in_flight",
            "HTTP requests being handled right now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upload_bytes = Histogram(
            "upload_bytes",
            "Size of request bodies carrying matrices, in bytes.",
            ["endpoint"],
            buckets=UPLOAD_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "compute_seconds",
            "Time spent per phase of a computation (decode, h2d, kernel, d2h, compute, total), "
            "in seconds.",
            ["op", "backend", "device", "phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.elements_processed = Counter(
            "matrix_elements_processed",
            "Output elements computed, by operation and backend.",
            ["op", "backend"],
            registry=r,
        )
        self.service_info = Gauge(
            "service_info",
            "Constant 1, labelled with the version, backend and instance name.",
            ["version", "backend", "instance"],
            registry=r,
            multiprocess_mode="livemax",
        )

    def child(self, metric: MetricWrapperBase, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: prometheus-client checks and locks on every
        ``labels`` call (about 2 us), and a request records up to ten values. Every label
        here comes from a small fixed set (routes, ops, backends, phases, status codes)."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def record_computation(
        self, op: str, backend: str, device: str, timings: dict[str, float], elements: int
    ) -> None:
        """One computation: ``timings`` (seconds per phase) into ``compute_seconds`` and its
        output ``elements``. The children are remembered per op, backend, device and set of
        phases, all from small fixed sets: a request records five or six phases."""
        key = (op, backend, device, *timings)
        found = self._computation_children.get(key)
        if found is None:
            phases = tuple(self.compute_seconds.labels(op, backend, device, p) for p in timings)
            found = (phases, self.elements_processed.labels(op, backend))
            self._computation_children[key] = found
        phase_children, elements_child = found
        for child, seconds in zip(phase_children, timings.values(), strict=True):
            child.observe(seconds)
        elements_child.inc(elements)

    def add_collector(self, collector: Collector) -> None:
        """Add a collector read at scrape time (GPU readings), in either mode."""
        if self.multiprocess_dir is None:
            self.registry.register(collector)
        else:
            self._scrape_time_collectors.append(collector)

    def render(self) -> bytes:
        """All metrics in Prometheus' text exposition format (merged across workers)."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=str(self.multiprocess_dir))
        for collector in self._scrape_time_collectors:
            merged.register(collector)
        return generate_latest(merged)

    def close(self) -> None:
        """In multiprocess mode, drop this worker's live gauges (it is exiting)."""
        if self.multiprocess_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), path=str(self.multiprocess_dir))


class GpuCollector(Collector):
    """Per-GPU gauges read from NVML at scrape time (microseconds per device)."""

    def __init__(self, monitor: GpuMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        """One family per reading, one sample per GPU; nothing without a GPU."""
        labels = ["gpu", "uuid", "name"]
        families = {
            "used": GaugeMetricFamily(
                "gpu_memory_used_bytes", "GPU memory in use (all processes), bytes.", labels=labels
            ),
            "total": GaugeMetricFamily(
                "gpu_memory_total_bytes", "GPU memory on the device, bytes.", labels=labels
            ),
            "util": GaugeMetricFamily(
                "gpu_utilization_ratio", "Fraction of time a kernel ran (0-1).", labels=labels
            ),
            "temp": GaugeMetricFamily(
                "gpu_temperature_celsius", "GPU core temperature, Celsius.", labels=labels
            ),
            "power": GaugeMetricFamily(
                "gpu_power_watts", "GPU board power draw, watts.", labels=labels
            ),
            "process": GaugeMetricFamily(
                "gpu_process_memory_bytes",
                "GPU memory held by this service process, bytes.",
                labels=labels,
            ),
        }
        for gpu in self.monitor.snapshot().gpus:
            values = [str(gpu.index), gpu.uuid, gpu.name]
            families["used"].add_metric(values, gpu.memory_used_bytes)
            families["total"].add_metric(values, gpu.memory_total_bytes)
            if gpu.utilization_percent is not None:
                families["util"].add_metric(values, gpu.utilization_percent / 100.0)
            if gpu.temperature_celsius is not None:
                families["temp"].add_metric(values, gpu.temperature_celsius)
            if gpu.power_watts is not None:
                families["power"].add_metric(values, gpu.power_watts)
            if gpu.process_memory_bytes is not None:
                families["process"].add_metric(values, gpu.process_memory_bytes)
        yield from families.values()

    def describe(self) -> Iterator[Metric]:
        """Nothing up front, so registering never touches NVML."""
        return iter(())
