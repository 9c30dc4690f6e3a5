"""GPU tests: skipped, with the reason, when NVML finds no NVIDIA GPU on this machine."""

from __future__ import annotations

import os

import pytest


def _nvml_gpu_count() -> tuple[int, str]:
    """(GPUs NVML sees, why none when 0)."""
    try:
        import pynvml
    except ImportError:
        return 0, "nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount(), "NVML sees no GPU"
    except pynvml.NVMLError as exc:
        return 0, f"NVML cannot start: {exc}"


def pytest_collection_modifyitems(config, items):
    count, reason = _nvml_gpu_count()
    if count > 0:
        return
    skip = pytest.mark.skip(reason=f"needs an NVIDIA GPU: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def nvml_total_bytes():
    """``f(ordinal)``: memory of that GPU in bytes, as NVML reports it."""
    import pynvml

    pynvml.nvmlInit()

    def total(ordinal: int = 0) -> int:
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(ordinal)).total

    return total


@pytest.fixture
def nvml_used_bytes():
    """``f(ordinal)``: GPU memory this process uses there, in bytes (the device's used memory
    where NVML does not list processes)."""
    import pynvml

    pynvml.nvmlInit()

    def used(ordinal: int = 0) -> int:
        handle = pynvml.nvmlDeviceGetHandleByIndex(ordinal)
        for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == os.getpid() and process.usedGpuMemory is not None:
                return process.usedGpuMemory
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used

    return used
