"""GPU tests: skipped, with the reason, when NVML finds no NVIDIA GPU on this machine; and
what the CUDA C backend's test modules share."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from gpu_matrix_service.settings import Settings


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


@pytest.fixture(scope="module")
def backend():
    """The CUDA C backend on every visible GPU, one per test module (test_numba_backend.py
    has its own ``backend``)."""
    from gpu_matrix_service.backends.cuda.backend import CudaBackend

    cuda = CudaBackend(Settings(_env_file=None, backend="cuda"))
    yield cuda
    cuda.close()


@pytest.fixture
def rng(request):
    """Random numbers seeded by the test's name: a failure repeats."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))
