"""Memory pools of the cuda backend: device buffers per GPU, and pinned host arrays.

``cudaMalloc``/``cudaFree`` synchronise the device and ``cudaHostAlloc`` pins pages at a few
GB/s, so both are paid once: blocks are rounded to size classes and reused across requests.
Device pools are trimmed (cached blocks freed) when an allocation runs out of memory; pinned
blocks go back to their pool when the last NumPy array viewing them is garbage collected.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Final

import numpy as np

from gpu_matrix_service.backends.cuda.binding import KernelLibrary
from gpu_matrix_service.errors import BackendFailure, DeviceOutOfMemory

log = logging.getLogger(__name__)

MiB: Final = 1024 * 1024
# Most bytes of free pinned blocks kept for reuse; beyond this they are unpinned.
MAX_CACHED_PINNED_BYTES: Final = 4096 * MiB


def size_class(nbytes: int) -> int:
    """Bytes a pool hands out for ``nbytes``: a power of two up to 2 MiB (at least 512 B),
    then a multiple of 2 MiB (the driver's large-page granularity)."""
    if nbytes <= 2 * MiB:
        return max(512, 1 << (max(nbytes, 1) - 1).bit_length())
    return -(-nbytes // (2 * MiB)) * (2 * MiB)


class DevicePool:
    """Cached ``cudaMalloc`` blocks of one device, keyed by size class. Thread-safe."""

    def __init__(self, library: KernelLibrary, ordinal: int) -> None:
        self._library = library
        self.ordinal = ordinal
        self._lock = threading.Lock()
        self._free: dict[int, list[int]] = collections.defaultdict(list)
        self._in_use: dict[int, int] = {}

    def alloc(self, nbytes: int) -> int:
        """A device address of at least ``nbytes``; ``DeviceOutOfMemory`` when none fits."""
        size = size_class(nbytes)
        with self._lock:
            blocks = self._free[size]
            ptr = blocks.pop() if blocks else self._library.device_alloc(self.ordinal, size)
            self._in_use[ptr] = size
        return ptr

    def release(self, ptr: int) -> None:
        """Give a block from :meth:`alloc` back for reuse."""
        with self._lock:
            size = self._in_use.pop(ptr)
            self._free[size].append(ptr)

    @contextmanager
    def lease(self, sizes: Sequence[int]) -> Iterator[list[int]]:
        """Blocks of the given byte sizes for one request, all released when it ends."""
        taken: list[int] = []
        try:
            for nbytes in sizes:
                taken.append(self.alloc(nbytes))
            yield taken
        finally:
            for ptr in taken:
                self.release(ptr)

    def trim(self) -> int:
        """Free every cached block (after an out-of-memory); the bytes freed."""
        with self._lock:
            freed = 0
            for size, blocks in self._free.items():
                while blocks:
                    self._library.device_free(self.ordinal, blocks.pop())
                    freed += size
            self._free.clear()
        return freed

    def cached_bytes(self) -> int:
        """Bytes held in free blocks, ready for reuse."""
        with self._lock:
            return sum(size * len(blocks) for size, blocks in self._free.items())

    def in_use_bytes(self) -> int:
        """Bytes lent to requests now."""
        with self._lock:
            return sum(self._in_use.values())

    def close(self) -> None:
        """Free all blocks; requests must be over (a block still lent is freed too)."""
        self.trim()
        with self._lock:
            for ptr in self._in_use:
                self._library.device_free(self.ordinal, ptr)
            self._in_use.clear()


class _PinnedOwner:
    """Owns one lent pinned block: NumPy arrays view it through ``__array_interface__`` and
    keep it as their ``.base``; when the last of them dies, a finalizer returns the block."""

    __slots__ = ("__array_interface__", "__weakref__")


class PinnedHostPool:
    """Page-locked host arrays for decoding operands into and for results (all devices).

    Copies from pinned memory go straight to the DMA engines at full PCIe/NVLink bandwidth;
    pageable memory is first copied by the driver through its own staging buffers.
    """

    def __init__(
        self, library: KernelLibrary, max_cached_bytes: int = MAX_CACHED_PINNED_BYTES
    ) -> None:
        self._library = library
        self._max_cached = max_cached_bytes
        self._lock = threading.Lock()
        self._free: dict[int, list[int]] = collections.defaultdict(list)
        self._cached = 0
        self._lent = 0
        # Finalizers may run on any thread at any moment (even inside this pool's own code),
        # so they only append here (atomic); the blocks are sorted out under the lock later.
        self._returned: collections.deque[tuple[int, int]] = collections.deque()
        self._closed = False

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised C-contiguous array in pinned memory (plain memory if pinning fails)."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0 or dtype.hasobject or dtype.fields is not None:
            return np.empty(shape, dtype=dtype)
        block = self._acquire(nbytes)
        if block is None:
            return np.empty(shape, dtype=dtype)
        owner = _PinnedOwner()
        owner.__array_interface__ = {
            "data": (block[0], False),
            "shape": tuple(shape),
            "typestr": dtype.str,
            "version": 3,
        }
        finalizer = weakref.finalize(owner, self._give_back, block)
        finalizer.atexit = False  # at exit the CUDA runtime may already be gone
        return np.asarray(owner)

    def _acquire(self, nbytes: int) -> tuple[int, int] | None:
        size = size_class(nbytes)
        with self._lock:
            if self._closed:
                raise BackendFailure("the pinned memory pool is closed")
            self._collect_returned()
            blocks = self._free[size]
            if blocks:
                self._cached -= size
                self._lent += size
                return blocks.pop(), size
            try:
                ptr = self._library.host_alloc(size)
            except DeviceOutOfMemory:
                self._unpin_cached()
                try:
                    ptr = self._library.host_alloc(size)
                except DeviceOutOfMemory as exc:
                    log.warning("cannot pin %d bytes, using pageable memory: %s", size, exc)
                    return None
            self._lent += size
            return ptr, size

    def _give_back(self, block: tuple[int, int]) -> None:
        if self._closed:
            self._unpin(block[0])
        else:
            self._returned.append(block)

    def _collect_returned(self) -> None:
        while self._returned:
            ptr, size = self._returned.popleft()
            self._lent -= size
            if self._cached + size > self._max_cached:
                self._unpin(ptr)
            else:
                self._free[size].append(ptr)
                self._cached += size

    def _unpin(self, ptr: int) -> None:
        try:
            self._library.host_free(ptr)
        except BackendFailure as exc:
            log.warning("cudaFreeHost failed: %s", exc.detail)

    def _unpin_cached(self) -> None:
        for blocks in self._free.values():
            while blocks:
                self._unpin(blocks.pop())
        self._free.clear()
        self._cached = 0

    def stats(self) -> tuple[int, int]:
        """(cached, lent) bytes: free pinned blocks kept for reuse, and blocks in arrays now."""
        with self._lock:
            self._collect_returned()
            return self._cached, self._lent

    def close(self) -> None:
        """Unpin cached blocks; blocks still in arrays are unpinned when those arrays die."""
        with self._lock:
            self._collect_returned()
            self._unpin_cached()
            self._closed = True
