"""GpuMonitor over a fake NVML: no driver, no GPU, two GPUs, missing readings."""

from __future__ import annotations

from prometheus_client import generate_latest

from gpu_matrix_service.gpu import GpuMonitor
from gpu_matrix_service.metrics import GpuCollector, ServiceMetrics

from fake_nvml import FakeGpu, FakeNvml


def test_no_driver_gives_an_empty_list_and_a_reason():
    monitor = GpuMonitor(FakeNvml([], init_error="Driver Not Loaded"))
    snapshot = monitor.snapshot()
    assert snapshot.gpus == [] and "Driver Not Loaded" in snapshot.reason
    monitor.close()


def test_zero_gpus_says_so():
    snapshot = GpuMonitor(FakeNvml([])).snapshot()
    assert snapshot.gpus == [] and snapshot.reason == "NVML found no GPU"
    assert snapshot.driver_version == "580.159.04" and snapshot.cuda_version == "13.0"


def test_two_gpus_are_read_with_this_process_memory():
    nvml = FakeNvml([FakeGpu(uuid="GPU-a"), FakeGpu(uuid="GPU-b", used=3 << 30, power_mw=None)])
    monitor = GpuMonitor(nvml)
    first, second = monitor.snapshot().gpus
    assert (first.index, first.uuid, second.uuid) == (0, "GPU-a", "GPU-b")
    assert first.process_memory_bytes == 512 << 20
    assert second.memory_free_bytes == (80 << 30) - (3 << 30)
    assert first.power_watts == 120.0 and second.power_watts is None
    fields = first.as_dict()
    assert fields["memory_total_mib"] == 81920.0 and fields["utilization_percent"] == 37.0
    monitor.close()
    assert nvml.shutdowns == 1


def test_gpu_collector_exports_per_gpu_series_and_nothing_without_gpus():
    metrics = ServiceMetrics()
    metrics.registry.register(GpuCollector(GpuMonitor(FakeNvml([FakeGpu(uuid="GPU-a")]))))
    text = generate_latest(metrics.registry).decode()
    assert (
        'gpu_memory_used_bytes{gpu="0",name="NVIDIA H100 80GB HBM3",uuid="GPU-a"} 2.147483648e+09'
        in text
    )
    assert "gpu_utilization_ratio{" in text and "} 0.37" in text
    assert "gpu_process_memory_bytes{" in text
    empty = ServiceMetrics()
    empty.registry.register(GpuCollector(GpuMonitor(FakeNvml([], init_error="no driver"))))
    assert "gpu_memory_used_bytes{" not in generate_latest(empty.registry).decode()
