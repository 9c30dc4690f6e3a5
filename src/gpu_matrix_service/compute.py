"""The core of a request: decode operands, check them, run the op on a backend, off the loop.

:class:`ComputeService` owns the chosen backend, the CPU backend it falls back to, and the
worker threads that run decoding and computation so the event loop keeps answering
``/health`` and ``/metrics`` while a large matmul runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from gpu_matrix_service.arrays import ArrayLimits, decode_array
from gpu_matrix_service.backends.base import Backend, Result, RunOptions
from gpu_matrix_service.backends.cpu import CpuBackend
from gpu_matrix_service.backends.registry import select_backend
from gpu_matrix_service.errors import DeviceOutOfMemory
from gpu_matrix_service.ops import Op, plan
from gpu_matrix_service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NamedBytes:
    """One uploaded operand: the field name it came in (for error messages) and its bytes."""

    name: str
    data: bytes | bytearray | memoryview


class ComputeService:
    """Runs operations for the API on the configured backend, with the CPU as fallback."""

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.skipped_backends: list[str] = []
        if backend is None:
            backend, self.skipped_backends = select_backend(settings)
        self.backend = backend
        self.cpu = backend if backend.device_kind == "CPU" else CpuBackend(settings)
        self.limits = ArrayLimits(
            max_bytes=settings.max_array_bytes,
            max_elements=settings.max_array_elements,
            max_dims=settings.max_array_dims,
        )
        self._executor = ThreadPoolExecutor(
            max_workers=settings.compute_threads, thread_name_prefix="gms-compute"
        )

    async def compute(
        self, op: Op, a: NamedBytes, b: NamedBytes, options: RunOptions
    ) -> tuple[Result, float]:
        """Decode both operands and compute ``op``; returns the result and the decode seconds."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.compute_sync, op, a, b, options)

    def compute_sync(
        self, op: Op, a: NamedBytes, b: NamedBytes, options: RunOptions
    ) -> tuple[Result, float]:
        """The blocking body of :meth:`compute`, also used by the command line."""
        start = time.perf_counter()
        left = decode_array(a.data, name=a.name, limits=self.limits, allocate=self._allocate)
        right = decode_array(b.data, name=b.name, limits=self.limits, allocate=self._allocate)
        decode_seconds = time.perf_counter() - start
        return self.run_arrays(op, left, right, options), decode_seconds

    def run_arrays(self, op: Op, a: np.ndarray, b: np.ndarray, options: RunOptions) -> Result:
        """Check ``a`` and ``b`` for ``op``, promote them, and compute on the best backend."""
        checked = plan(op, a, b)
        a = a.astype(checked.dtype, copy=False)
        b = b.astype(checked.dtype, copy=False)
        backend = self.backend
        if a.size == 0 or b.size == 0 or not backend.supports(op, checked.dtype):
            # Nothing for a device to do, or a dtype its kernels lack: NumPy answers.
            backend = self.cpu
        try:
            return backend.run(op, a, b, options)
        except DeviceOutOfMemory:
            if self.settings.fallback != "cpu" or backend is self.cpu:
                raise
            log.warning(
                "%s out of memory for %s %s; computing on the CPU",
                backend.name,
                op.name,
                list(checked.shape),
            )
            return self.cpu.run(op, a, b, options)

    def _allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return self.backend.empty_host(shape, dtype)

    def close(self) -> None:
        """Wait for running computations, then release the backend's devices."""
        self._executor.shutdown(wait=True)
        self.backend.close()
        if self.cpu is not self.backend:
            self.cpu.close()
