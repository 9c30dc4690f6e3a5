"""Memory the Numba backend reuses across requests: pinned host buffers and device buffers.

Allocating is what makes a GPU request slow: ``cuMemAlloc``/``cuMemFree`` cost milliseconds
and ``cuMemFree`` synchronises the whole device, and page-locking host memory is slower
still. Both pools hand out buffers by size class, so nearby sizes share them.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable
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


class _PinnedLease:
    """The owner numpy sees behind a pooled pinned array: while any view of the array lives,
    this lives; when the last one goes, the block returns to the pool."""

    __slots__ = ("__array_interface__", "_block", "_returned")

    def __init__(self, block: np.ndarray, shape: tuple[int, ...], dtype: np.dtype, returned: deque):
        self._block = block
        self._returned = returned
        self.__array_interface__ = {
            "data": (block.ctypes.data, False),
            "shape": shape,
            "typestr": dtype.str,
            "descr": dtype.descr,
            "version": 3,
        }

    def __del__(self) -> None:
        # Runs in whichever thread drops the last view: only an atomic append, no lock.
        self._returned.append(self._block)


class PinnedPool:
    """Page-locked host buffers reused across requests, shared by every device.

    ``allocate(nbytes)`` returns fresh pinned memory as a uint8 array. Buffers come back when
    the arrays handed out are garbage collected; up to ``keep_bytes`` of them stay for reuse.
    """

    def __init__(self, allocate: Callable[[int], np.ndarray], keep_bytes: int) -> None:
        self._allocate = allocate
        self._keep_bytes = keep_bytes
        self._free: dict[int, list[np.ndarray]] = {}
        self._free_bytes = 0
        self._returned: deque[np.ndarray] = deque()
        self._lock = threading.Lock()

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised C-ordered array in pinned memory (plain memory if pinning fails)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0 or dtype.hasobject:
            return np.empty(shape, dtype=dtype)
        block = self._take(size_class(nbytes))
        if block is None:
            return np.empty(shape, dtype=dtype)
        return np.asarray(_PinnedLease(block, shape, dtype, self._returned))

    def _take(self, nbytes: int) -> np.ndarray | None:
        with self._lock:
            self._collect_returned()
            free = self._free.get(nbytes)
            if free:
                self._free_bytes -= nbytes
                return free.pop()
        try:
            return self._allocate(nbytes)
        except CUDA_ERRORS as exc:
            self.clear()
            try:
                return self._allocate(nbytes)
            except CUDA_ERRORS:
                log.warning(
                    "pinned host allocation of %d bytes failed (%s); using pageable memory",
                    nbytes,
                    exc,
                )
                return None

    def _collect_returned(self) -> None:
        while self._returned:
            block = self._returned.popleft()
            if self._free_bytes + block.nbytes <= self._keep_bytes:
                self._free.setdefault(block.nbytes, []).append(block)
                self._free_bytes += block.nbytes

    def clear(self) -> None:
        """Drop every free buffer (their pinned memory is freed with numba's next flush)."""
        with self._lock:
            self._returned.clear()
            self._free.clear()
            self._free_bytes = 0


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
