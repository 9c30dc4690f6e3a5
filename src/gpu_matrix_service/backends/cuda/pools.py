"""Memory pools of the cuda backend: device buffers per GPU, and pinned host arrays.

``cudaMalloc``/``cudaFree`` synchronise the device and ``cudaHostAlloc`` pins pages at a few
GB/s, so both are paid once: blocks are rounded to size classes and reused across requests.
Device pools are trimmed (cached blocks freed) when an allocation runs out of memory; pinned
blocks go back to their pool when the last NumPy array viewing them is garbage collected.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Final

from gpu_matrix_service.backends.cuda.binding import KernelLibrary
from gpu_matrix_service.backends.pinned import PinnedArrayPool
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


class PinnedHostPool(PinnedArrayPool):
    """Page-locked host arrays (``cudaHostAlloc``) for operands and results, all devices;
    those of at most ``pageable_bytes`` are plain memory (see ``PinnedArrayPool``)."""

    def __init__(
        self,
        library: KernelLibrary,
        max_cached_bytes: int = MAX_CACHED_PINNED_BYTES,
        pageable_bytes: int = 0,
    ) -> None:
        def pin(nbytes: int) -> tuple[int, int]:
            ptr = library.host_alloc(nbytes)
            return ptr, ptr

        def unpin(ptr: int) -> None:
            try:
                library.host_free(ptr)
            except BackendFailure as exc:
                log.warning("cudaFreeHost failed: %s", exc.detail)

        super().__init__(
            pin,
            unpin,
            size_class=size_class,
            max_cached_bytes=max_cached_bytes,
            pin_errors=(DeviceOutOfMemory,),
            pageable_bytes=pageable_bytes,
        )
