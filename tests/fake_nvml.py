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
    # Readings doctor takes; None means the board or driver answers "Not Supported".
    compute_capability: tuple[int, int] = (9, 0)
    mig_mode: tuple[int, int] | None = (0, 0)
    mig_devices: int = 0
    ecc_mode: tuple[int, int] | None = (1, 1)
    ecc_corrected: int = 0
    ecc_uncorrected: int = 0
    ecc_uncorrected_lifetime: int = 0
    remapped_rows: tuple[int, int, int, int] | None = (0, 0, 0, 0)
    persistence: int | None = 1
    sm_clock: int = 1980
    sm_clock_max: int = 1980
    memory_clock: int = 2619
    memory_clock_max: int = 2619
    throttle_reasons: int = 0
    pcie_max: tuple[int, int] | None = (5, 16)
    pcie_now: tuple[int, int] | None = (5, 16)
    cuda_cores: int | None = 16896
    minor: int | None = None


class FakeNvml:
    """Enough of pynvml for GpuMonitor and doctor; ``init_error`` simulates a host with no
    driver. Set ``driver_version`` / ``cuda_driver_version`` on an instance to change them."""

    NVMLError = NVMLError
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    NVML_VOLATILE_ECC = 0
    NVML_AGGREGATE_ECC = 1
    driver_version = "580.159.04"
    cuda_driver_version = 13000

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
        return self.driver_version

    def nvmlSystemGetCudaDriverVersion(self):
        return self.cuda_driver_version

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

    # --- what doctor reads beyond GpuMonitor (same names and return shapes as pynvml) ---

    def _index(self, gpu):
        return next(i for i, g in enumerate(self.gpus) if g is gpu)

    def nvmlDeviceGetMinorNumber(self, gpu):
        return self._index(gpu) if gpu.minor is None else gpu.minor

    def nvmlDeviceGetPciInfo(self, gpu):
        return SimpleNamespace(busId=f"00000000:{0x18 + self._index(gpu):02X}:00.0".encode())

    def nvmlDeviceGetCudaComputeCapability(self, gpu):
        return gpu.compute_capability

    def nvmlDeviceGetMigMode(self, gpu):
        return list(_supported(gpu.mig_mode))

    def nvmlDeviceGetMaxMigDeviceCount(self, gpu):
        _supported(gpu.mig_mode)
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, gpu, index):
        if index >= gpu.mig_devices:
            raise NVMLError("Not Found")
        return SimpleNamespace(parent=gpu, index=index)

    def nvmlDeviceGetEccMode(self, gpu):
        return list(_supported(gpu.ecc_mode))

    def nvmlDeviceGetTotalEccErrors(self, gpu, error_type, counter_type):
        _supported(gpu.ecc_mode)
        if error_type == self.NVML_MEMORY_ERROR_TYPE_CORRECTED:
            return gpu.ecc_corrected
        if counter_type == self.NVML_VOLATILE_ECC:
            return gpu.ecc_uncorrected
        return gpu.ecc_uncorrected_lifetime

    def nvmlDeviceGetRemappedRows(self, gpu):
        return _supported(gpu.remapped_rows)

    def nvmlDeviceGetPersistenceMode(self, gpu):
        return _supported(gpu.persistence)

    def nvmlDeviceGetClockInfo(self, gpu, clock):
        return gpu.sm_clock if clock == self.NVML_CLOCK_SM else gpu.memory_clock

    def nvmlDeviceGetMaxClockInfo(self, gpu, clock):
        return gpu.sm_clock_max if clock == self.NVML_CLOCK_SM else gpu.memory_clock_max

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, gpu):
        return gpu.throttle_reasons

    def nvmlDeviceGetMaxPcieLinkGeneration(self, gpu):
        return _supported(gpu.pcie_max)[0]

    def nvmlDeviceGetMaxPcieLinkWidth(self, gpu):
        return _supported(gpu.pcie_max)[1]

    def nvmlDeviceGetCurrPcieLinkGeneration(self, gpu):
        return _supported(gpu.pcie_now)[0]

    def nvmlDeviceGetCurrPcieLinkWidth(self, gpu):
        return _supported(gpu.pcie_now)[1]

    def nvmlDeviceGetNumGpuCores(self, gpu):
        return _supported(gpu.cuda_cores)


def _supported(value):
    """``value``, or NVML's "Not Supported" error when the fake GPU sets it to None."""
    if value is None:
        raise NVMLError("Not Supported")
    return value
