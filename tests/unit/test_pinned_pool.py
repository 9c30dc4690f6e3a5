"""The pinned-array pool both GPU backends share, with a fake pinning function."""

from __future__ import annotations

import collections
import gc

import numpy as np
import pytest

from gpu_matrix_service.backends import pinned
from gpu_matrix_service.backends.pinned import PinnedArrayPool
from gpu_matrix_service.errors import BackendFailure


class PinFailed(Exception):
    pass


class FakePinning:
    """Pins numpy buffers, up to ``capacity`` bytes at once; records what is pinned."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.pinned: dict[int, np.ndarray] = {}

    def pin(self, nbytes: int) -> tuple[int, np.ndarray]:
        if sum(b.nbytes for b in self.pinned.values()) + nbytes > self.capacity:
            raise PinFailed(f"no room for {nbytes}")
        block = np.zeros(nbytes, np.uint8)
        self.pinned[block.ctypes.data] = block
        return block.ctypes.data, block

    def unpin(self, block: np.ndarray) -> None:
        del self.pinned[block.ctypes.data]


def pool_for(pinning: FakePinning, cached: int = 1 << 20, pageable: int = 0) -> PinnedArrayPool:
    return PinnedArrayPool(
        pinning.pin, pinning.unpin, size_class=lambda n: -(-n // 1024) * 1024,
        max_cached_bytes=cached, pin_errors=(PinFailed,), pageable_bytes=pageable,
    )  # fmt: skip


def test_a_failed_pin_unpins_the_cache_and_retries_then_falls_back_to_pageable():
    pinning = FakePinning(capacity=4096)
    pool = pool_for(pinning)
    cached = pool.empty((2048,), np.uint8)
    del cached
    gc.collect()
    assert pool.stats() == (2048, 0) and len(pinning.pinned) == 1
    # 3 KiB does not fit beside the cached 2 KiB: the cache is unpinned, the retry succeeds.
    fits = pool.empty((3072,), np.uint8)
    assert pool.stats() == (0, 3072)
    assert fits.ctypes.data in pinning.pinned
    # Nothing cached to give up now: 2 KiB more cannot be pinned, so it is pageable memory.
    pageable = pool.empty((2048,), np.uint8)
    assert pageable.ctypes.data not in pinning.pinned
    assert pool.stats() == (0, 3072)


def test_arrays_of_at_most_pageable_bytes_are_plain_memory_and_larger_ones_pinned():
    pinning = FakePinning(capacity=1 << 20)
    pool = pool_for(pinning, pageable=4096)
    plain = pool.empty((64, 16), np.float32)  # 4096 bytes
    assert not pinned.in_pinned_block(plain) and pinning.pinned == {}
    assert plain.shape == (64, 16) and plain.dtype == np.float32 and plain.flags.c_contiguous
    assert pool.stats() == (0, 0)
    lent = pool.empty((4097,), np.uint8)
    assert pinned.in_pinned_block(lent) and lent.ctypes.data in pinning.pinned
    assert pool.stats() == (0, 5120)


def test_arrays_view_their_block_and_values_survive_until_collected():
    pinning = FakePinning(capacity=1 << 20)
    pool = pool_for(pinning)
    array = pool.empty((16, 8), np.float64)
    array[...] = np.arange(128).reshape(16, 8)
    view = array[3:]
    del array
    gc.collect()
    assert pool.stats() == (0, 1024)  # the view still holds the block
    np.testing.assert_array_equal(view[0], np.arange(24, 32))
    del view
    gc.collect()
    assert pool.stats() == (1024, 0)


def test_after_close_new_arrays_are_refused_and_lent_blocks_unpin_when_freed():
    pinning = FakePinning(capacity=1 << 20)
    pool = pool_for(pinning)
    lent = pool.empty((100,), np.int32)
    pool.close()
    with pytest.raises(BackendFailure, match="closed"):
        pool.empty((100,), np.int32)
    assert len(pinning.pinned) == 1
    del lent
    gc.collect()
    assert pinning.pinned == {}


def test_a_block_returned_while_the_pool_closes_is_still_unpinned():
    pinning = FakePinning(capacity=1 << 20)
    pool = pool_for(pinning)
    lent = pool.empty((100,), np.int32)

    class CloseFirst(collections.deque):
        def append(self, block) -> None:
            pool.close()  # close() slips in between the finalizer's check and its append
            super().append(block)

    pool._returned = CloseFirst()
    del lent
    gc.collect()
    assert pinning.pinned == {}


def test_a_reused_block_is_lent_in_each_callers_shape_and_dtype():
    pinning = FakePinning(capacity=1 << 20)
    pool = pool_for(pinning)
    cases = [((64, 64), np.float32), ((32, 128), np.int32), ((64, 64), np.float32),
             ((4096,), np.dtype(">f4")), ((16, 16, 16), np.float64)]  # fmt: skip
    addresses = set()
    for shape, dtype in cases:
        array = pool.empty(shape, dtype)
        assert array.shape == shape and array.dtype == np.dtype(dtype)
        assert array.flags.c_contiguous and array.flags.writeable
        array[...] = np.arange(array.size).reshape(shape)
        assert np.array_equal(array.ravel(), np.arange(array.size, dtype=dtype))
        addresses.add(array.ctypes.data)
        del array
        gc.collect()
    # 16 KiB cases share one block; the 32 KiB one has its own.
    assert len(addresses) == 2 and len(pinning.pinned) == 2


def test_remembered_interfaces_and_size_classes_stay_bounded(monkeypatch):
    monkeypatch.setattr(pinned, "MAX_REMEMBERED", 8)
    pool = pool_for(FakePinning(capacity=1 << 24))
    for n in range(1, 100):
        array = pool.empty((n,), np.uint8)
        assert array.shape == (n,)
        assert pool._interface.cache_info().currsize <= 8
        assert pool._class_of.cache_info().currsize <= 8
