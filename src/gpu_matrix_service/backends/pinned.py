"""Page-locked host arrays, pooled: what both GPU backends decode uploads into and write results to.

Copies from pinned memory go straight to the DMA engines at full PCIe/NVLink bandwidth;
pageable memory is first copied by the driver through its own staging buffers. Pinning pages
is slow (a few GB/s), so blocks are pinned once, rounded to size classes and reused: a block
goes back to its pool when the last NumPy array viewing it is garbage collected. How a block
is pinned and unpinned is the backend's (``cudaHostAlloc`` through our CUDA library, or
numba's ``memhostalloc``); the pooling is the same for both.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from gpu_matrix_service.errors import BackendFailure

log = logging.getLogger(__name__)

# A pinned block: its address, its size class in bytes, and what the backend needs to unpin it.
Block = tuple[int, int, Any]
# Remembered array interfaces (address, shape, dtype) and size classes (bytes): at most this
# many of each, the least recently used forgotten first (odd sizes from clients cannot grow
# them for good).
MAX_REMEMBERED = 4096


class _PinnedOwner:
    """Owns one lent pinned block: NumPy arrays view it through ``__array_interface__`` and
    keep it as their ``.base``; when the last of them dies, it gives the block back.

    ``__del__`` rather than ``weakref.finalize``: every array the service decodes into or
    computes into is one of these (three per small request), and a finalizer took 3 us to
    register and as much again to run; ``__del__`` costs next to nothing.
    """

    __slots__ = ("__array_interface__", "_block", "_give_back")

    def __del__(self) -> None:
        if not sys.is_finalizing():  # at exit the CUDA runtime may already be gone
            self._give_back(self._block)


def array_interface(address: int, shape: tuple[int, ...], dtype: np.dtype) -> dict[str, Any]:
    """The ``__array_interface__`` of a C-contiguous array at ``address`` (the pool shares one
    per block, shape and dtype: NumPy only reads it)."""
    # strides None: C-contiguous, which NumPy takes without working strides out.
    return {"data": (address, False), "shape": shape, "typestr": dtype.str, "strides": None,
            "version": 3}  # fmt: skip


def in_pinned_block(array: np.ndarray) -> bool:
    """Whether ``array`` is one a pool lent, viewing its pinned (page-aligned) block."""
    return type(array.base) is _PinnedOwner


class PinnedArrayPool:
    """Pinned host arrays from blocks that ``pin(nbytes) -> (address, handle)`` allocates and
    ``unpin(handle)`` frees, reused by size class up to ``max_cached_bytes`` of free blocks.

    When pinning raises one of ``pin_errors``, the cached free blocks are unpinned and it is
    tried once more; failing again, the array comes from plain (pageable) memory. Arrays of at
    most ``pageable_bytes`` always do: for a backend that reaches small host arrays as cheaply
    without pinning, lending a block and taking it back is the dearer way.
    """

    def __init__(
        self,
        pin: Callable[[int], tuple[int, Any]],
        unpin: Callable[[Any], None],
        *,
        size_class: Callable[[int], int],
        max_cached_bytes: int,
        pin_errors: tuple[type[Exception], ...],
        pageable_bytes: int = 0,
    ) -> None:
        self._pin, self._unpin = pin, unpin
        self._pageable_bytes = pageable_bytes
        self._pin_errors = pin_errors
        self._max_cached = max_cached_bytes
        self._lock = threading.Lock()
        self._free: dict[int, list[Block]] = collections.defaultdict(list)
        self._cached = 0
        self._lent = 0
        # Owners die on any thread at any moment (even inside this pool's own code),
        # so they only append here (atomic); the blocks are sorted out under the lock later.
        self._returned: collections.deque[Block] = collections.deque()
        self._closed = False
        # What a lent array's interface and a size's class are, remembered: building the
        # dict (dtype.str alone is 0.4 us) and the class cost about 1 us of the 3.8 an array
        # took to lend and return (CPU machine).
        self._interface = functools.lru_cache(maxsize=MAX_REMEMBERED)(array_interface)
        self._class_of = functools.lru_cache(maxsize=MAX_REMEMBERED)(size_class)

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised C-contiguous array in pinned memory (plain memory if pinning fails,
        or for at most ``pageable_bytes``)."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        plain = nbytes <= self._pageable_bytes or nbytes == 0
        if plain or dtype.hasobject or dtype.fields is not None:
            return np.empty(shape, dtype=dtype)
        block = self._acquire(nbytes)
        if block is None:
            return np.empty(shape, dtype=dtype)
        owner = _PinnedOwner()
        owner.__array_interface__ = self._interface(block[0], tuple(shape), dtype)
        owner._block, owner._give_back = block, self._give_back
        return np.asarray(owner)

    def _acquire(self, nbytes: int) -> Block | None:
        size = self._class_of(nbytes)
        with self._lock:
            if self._closed:
                raise BackendFailure("the pinned memory pool is closed")
            self._collect_returned()
            blocks = self._free[size]
            if blocks:
                self._cached -= size
                self._lent += size
                return blocks.pop()
        # Pinning takes milliseconds for large blocks: outside the lock, so that a decode
        # taking a cached block never waits behind another request's pinning.
        block = self._pin_block(size)
        if block is not None:
            with self._lock:
                self._lent += size
        return block

    def _pin_block(self, size: int) -> Block | None:
        try:
            address, handle = self._pin(size)
        except self._pin_errors:
            self.clear()
            try:
                address, handle = self._pin(size)
            except self._pin_errors as exc:
                log.warning("cannot pin %d bytes, using pageable memory: %s", size, exc)
                return None
        return address, size, handle

    def _give_back(self, block: Block) -> None:
        # From __del__: no lock here, it may run inside this pool's own locked code.
        if self._closed:
            self._unpin(block[2])
            return
        self._returned.append(block)
        if self._closed:  # close() ran in between and may have drained already
            self._unpin_returned()

    def _unpin_returned(self) -> None:
        """After close: unpin whatever came back (each block is popped exactly once)."""
        while True:
            try:
                block = self._returned.popleft()
            except IndexError:
                return
            self._unpin(block[2])

    def _collect_returned(self) -> None:
        while self._returned:
            block = self._returned.popleft()
            size = block[1]
            self._lent -= size
            if self._cached + size > self._max_cached:
                self._unpin(block[2])
            else:
                self._free[size].append(block)
                self._cached += size

    def _unpin_cached(self) -> None:
        for blocks in self._free.values():
            while blocks:
                self._unpin(blocks.pop()[2])
        self._free.clear()
        self._cached = 0

    def stats(self) -> tuple[int, int]:
        """(cached, lent) bytes: free pinned blocks kept for reuse, and blocks in arrays now."""
        with self._lock:
            self._collect_returned()
            return self._cached, self._lent

    def clear(self) -> None:
        """Unpin every cached free block (out of memory elsewhere); the pool stays open."""
        with self._lock:
            self._collect_returned()
            self._unpin_cached()

    def close(self) -> None:
        """Unpin cached blocks; blocks still in arrays are unpinned when those arrays die."""
        with self._lock:
            self._closed = True  # first: a block returned from now on is unpinned at once
            self._unpin_returned()
            self._unpin_cached()
