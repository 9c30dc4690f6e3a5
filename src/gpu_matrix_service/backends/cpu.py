"""The NumPy backend: runs everywhere, and is the fallback when a GPU cannot take a request."""

from __future__ import annotations

import time

import numpy as np

from gpu_matrix_service.backends.base import DeviceInfo, DeviceKind, Result, RunOptions
from gpu_matrix_service.ops import Op
from gpu_matrix_service.settings import Settings


class CpuBackend:
    """Computes with NumPy on the host (matmul through NumPy's BLAS)."""

    name = "cpu"
    device_kind: DeviceKind = "CPU"

    def __init__(self, settings: Settings | None = None) -> None:
        self._device = DeviceInfo(index=-1, name="cpu", kind="CPU")

    def devices(self) -> list[DeviceInfo]:
        """The host CPU, as one device."""
        return [self._device]

    def supports(self, op: Op, dtype: np.dtype) -> bool:
        """NumPy computes every numeric dtype."""
        return True

    def empty_host(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Plain host memory: NumPy needs nothing special."""
        return np.empty(shape, dtype=dtype)

    def run(self, op: Op, a: np.ndarray, b: np.ndarray, options: RunOptions) -> Result:
        """``op.reference(a, b)``, timed with the monotonic clock."""
        start = time.perf_counter()
        with np.errstate(all="ignore"):  # overflow gives inf as in NumPy, not a log line
            out = op.reference(a, b)
        elapsed = time.perf_counter() - start
        return Result(
            array=np.asarray(out),
            device="CPU",
            device_name=self._device.name,
            backend=self.name,
            timings={"compute": elapsed, "total": elapsed},
        )

    def run_if_idle(
        self, op: Op, a: np.ndarray, b: np.ndarray, options: RunOptions
    ) -> Result | None:
        """:meth:`run`: NumPy never waits for another request."""
        return self.run(op, a, b, options)

    def close(self) -> None:
        """Nothing to release."""
