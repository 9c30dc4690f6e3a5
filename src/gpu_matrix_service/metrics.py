"""Every Prometheus metric of the service, defined once, here, in its own registry.

Each app gets its own :class:`ServiceMetrics` (and registry), so tests can build many apps in
one process. GPU readings come from :class:`GpuCollector`, which asks NVML when Prometheus
scrapes; without a GPU its series are simply absent.

With several server workers, prometheus-client's multiprocess mode is used: each worker
writes its values to files under ``multiprocess_dir`` (the CLI sets that up, together with
``PROMETHEUS_MULTIPROC_DIR``, before the workers start) and a scrape of any worker merges them.

With one process, what a request records is written to the metrics in batches
(:meth:`ServiceMetrics.flush`: before every exposition and once a second), not one value at a
time: a request records up to a dozen values, and each costs prometheus-client a lock and a
bucket search (about 1 us, 15-20 us a request in place, ``docs/benchmarks.md``), while a
batch costs one lock per bucket touched. A scrape flushes first, so it sees every request
that ended before it. In multiprocess mode a scrape reads the other workers' files, so values
are written as they are recorded.
"""

from __future__ import annotations

import bisect
import collections
import os
import threading
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
        # What record_* calls append to: per labelled child, values not yet written to it.
        self._series: dict[tuple[object, tuple[str, ...]], Series] = {}
        self._request_series: dict[tuple[str, str, int], tuple[Series, Series]] = {}
        self._computation_series: dict[tuple[str, ...], tuple[tuple[Series, ...], Series]] = {}
        self._flush_lock = threading.Lock()
        # Requests in progress, counted here and written to requests_in_flight on flush.
        self.in_flight = 0
        self.batched = multiprocess_dir is None
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

    def series(self, metric: MetricWrapperBase, *labels: str) -> Series:
        """The :class:`Series` of ``metric``'s child with ``labels``, remembered (labels from
        small fixed sets, as for :meth:`child`)."""
        key = (metric, labels)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = Series(self.child(metric, *labels), self.batched)
        return found

    def request_started(self) -> None:
        """One more HTTP request in progress (``requests_in_flight``)."""
        self.in_flight += 1
        if not self.batched:
            self.requests_in_flight.inc()

    def request_ended(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        """An HTTP request answered with ``status`` after ``seconds``."""
        self.in_flight -= 1
        if not self.batched:
            self.requests_in_flight.dec()
        key = (method, endpoint, status)
        found = self._request_series.get(key)
        if found is None:
            found = self._request_series[key] = (
                self.series(self.request_count, method, endpoint, str(status)),
                self.series(self.request_latency, method, endpoint),
            )
        count, latency = found
        count.record(1.0)
        latency.record(seconds)

    def record_computation(
        self, op: str, backend: str, device: str, timings: dict[str, float], elements: int
    ) -> None:
        """One computation: ``timings`` (seconds per phase) into ``compute_seconds`` and its
        output ``elements``. The series are remembered per op, backend, device and set of
        phases, all from small fixed sets: a request records five or six phases."""
        key = (op, backend, device, *timings)
        found = self._computation_series.get(key)
        if found is None:
            phases = tuple(self.series(self.compute_seconds, op, backend, device, p)
                           for p in timings)  # fmt: skip
            found = (phases, self.series(self.elements_processed, op, backend))
            self._computation_series[key] = found
        phase_series, elements_series = found
        for series, seconds in zip(phase_series, timings.values(), strict=True):
            series.record(seconds)
        elements_series.record(elements)

    def flush(self) -> None:
        """Write the values recorded since the last flush to the metrics (any thread)."""
        with self._flush_lock:
            if self.batched:
                self.requests_in_flight.set(self.in_flight)
            for series in list(self._series.values()):
                series.flush()

    def add_collector(self, collector: Collector) -> None:
        """Add a collector read at scrape time (GPU readings), in either mode."""
        if self.multiprocess_dir is None:
            self.registry.register(collector)
        else:
            self._scrape_time_collectors.append(collector)

    def render(self) -> bytes:
        """All metrics in Prometheus' text exposition format (merged across workers)."""
        self.flush()
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


class Series:
    """One labelled child of a counter or histogram and the values recorded for it that are
    not written to it yet (batched), or written at once (not batched)."""

    __slots__ = ("_bounds", "_child", "_pending", "record")

    def __init__(self, child: Any, batched: bool) -> None:
        self._child = child
        self._pending: list[float] = []
        histogram = isinstance(child, Histogram)
        # A histogram's buckets, to write a batch with one increment per bucket: the
        # children's _upper_bounds, _buckets and _sum are prometheus-client's, unchanged
        # since 0.4 (test_service_metrics holds a flushed batch to observe()'s exposition).
        self._bounds = child._upper_bounds if histogram and _has_buckets(child) else None
        if not batched:
            self.record = child.observe if histogram else child.inc
        else:
            self.record = self._pending.append

    def flush(self) -> None:
        """Write the pending values. Only appends race with this: it takes the first ``n``
        and deletes just those, so a value appended meanwhile waits for the next flush."""
        pending = self._pending
        n = len(pending)
        if not n:
            return
        batch = pending[:n]
        del pending[:n]
        child, bounds = self._child, self._bounds
        if bounds is None and isinstance(child, Histogram):
            for value in batch:
                child.observe(value)
        elif bounds is None:
            child.inc(sum(batch))
        else:
            # observe() puts a value in the first bucket whose bound is >= it (none for NaN).
            for index, count in collections.Counter(
                bisect.bisect_left(bounds, value) for value in batch if value == value
            ).items():
                child._buckets[index].inc(count)
            child._sum.inc(sum(batch))


def _has_buckets(child: Any) -> bool:
    return all(hasattr(child, name) for name in ("_upper_bounds", "_buckets", "_sum"))


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
