"""Device buffers the Numba backend reuses across requests (pinned host arrays come from
:mod:`gpu_matrix_service.backends.pinned`, shared with the cuda backend).

Allocating is what makes a GPU request slow: ``cuMemAlloc``/``cuMemFree`` cost milliseconds
and ``cuMemFree`` synchronises the whole device. The pool hands out buffers by size class, so
nearby sizes share them.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Final

import numpy as np
from numba import cuda
from numba.cuda.cudadrv import driver as cuda_driver
from numba.cuda.cudadrv import error as cuda_error

log = logging.getLogger(__name__)

# The CUDA errors a request can meet; anything else is a bug and propagates as such.
CUDA_ERRORS: Final[tuple[type[Exception], ...]] = tuple(
    cls
    for cls in (
        getattr(cuda_driver, "CudaAPIError", None),
        getattr(cuda_error, "CudaDriverError", None),
        getattr(cuda_error, "CudaSupportError", None),
    )
    if cls is not None
)


def size_class(nbytes: int) -> int:
    """Bytes reserved for a buffer of ``nbytes``: at least 64 KiB, above that rounded up to a
    quarter of the next power of two (at most 25% slack), so nearby sizes share buffers."""
    if nbytes <= 64 << 10:
        return 64 << 10
    step = 1 << (nbytes.bit_length() - 3)
    return -(-nbytes // step) * step


class DeviceBuffers:
    """Free device allocations of one GPU, by size class, kept up to ``keep_bytes``."""

    def __init__(self, keep_bytes: int) -> None:
        self._keep_bytes = keep_bytes
        self._free: dict[int, list[Any]] = {}
        self._free_bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> Any:
        """A uint8 device array of at least ``nbytes``; call in the device's context."""
        size = size_class(nbytes)
        with self._lock:
            free = self._free.get(size)
            if free:
                self._free_bytes -= size
                return free.pop()
        return cuda.device_array(size, dtype=np.uint8)

    def give_back(self, buffers: list[Any]) -> None:
        """Return buffers taken with :meth:`take`, once no queued work uses them."""
        with self._lock:
            for buf in buffers:
                if self._free_bytes + buf.size <= self._keep_bytes:
                    self._free.setdefault(buf.size, []).append(buf)
                    self._free_bytes += buf.size

    def clear(self) -> None:
        """Drop every free buffer (freed at numba's next deallocation flush)."""
        with self._lock:
            self._free.clear()
            self._free_bytes = 0
