"""A stand-in for the ``pynvml`` module, for tests of code that reads GPUs through NVML."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace


class NVMLError(Exception):
    """Mirrors pynvml.NVMLError."""


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    total: int = 80 * 2**30
    used: int = 2 * 2**30
    utilization: int = 37
    temperature: int = 45
    power_mw: int = 120_000
    process_bytes: int = 512 * 2**20
    extra: dict = field(default_factory=dict)


class FakeNvml:
    """Enough of pynvml for GpuMonitor; ``init_error`` simulates a host with no driver."""

    NVMLError = NVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, gpus: list[FakeGpu], init_error: str | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.shutdowns = 0

    def nvmlInit(self):
        if self.init_error:
            raise NVMLError(self.init_error)

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlSystemGetDriverVersion(self):
        return "580.159.04"

    def nvmlSystemGetCudaDriverVersion(self):
        return 13000

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.gpus[index]

    def nvmlDeviceGetName(self, gpu):
        return gpu.name

    def nvmlDeviceGetUUID(self, gpu):
        return gpu.uuid

    def nvmlDeviceGetMemoryInfo(self, gpu):
        return SimpleNamespace(total=gpu.total, used=gpu.used, free=gpu.total - gpu.used)

    def nvmlDeviceGetUtilizationRates(self, gpu):
        return SimpleNamespace(gpu=gpu.utilization, memory=10)

    def nvmlDeviceGetTemperature(self, gpu, sensor):
        return gpu.temperature

    def nvmlDeviceGetPowerUsage(self, gpu):
        if gpu.power_mw is None:
            raise NVMLError("Not Supported")
        return gpu.power_mw

    def nvmlDeviceGetComputeRunningProcesses(self, gpu):
        return [
            SimpleNamespace(pid=os.getpid(), usedGpuMemory=gpu.process_bytes),
            SimpleNamespace(pid=1, usedGpuMemory=999),
        ]
