"""Backends that stand in for a GPU one in API tests, failing where a test says."""

from __future__ import annotations

from gpu_matrix_service.backends.base import DeviceInfo, Result
from gpu_matrix_service.backends.cpu import CpuBackend


class FailingBackend(CpuBackend):
    """A GPU backend whose next calls fail the way CUDA can, simulated at the boundary."""

    name = "fake-gpu"
    device_kind = "GPU"

    def __init__(self, failures: list[Exception]) -> None:
        super().__init__()
        self.failures = failures

    def devices(self):
        return [DeviceInfo(0, "Fake GPU (cuda:0)", "GPU")]

    def run(self, op, a, b, options):
        if self.failures:
            raise self.failures.pop(0)
        result = super().run(op, a, b, options)
        return Result(result.array, "GPU", "Fake GPU (cuda:0)", self.name, result.timings)
