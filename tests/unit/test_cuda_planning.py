"""The cuda backend's pure parts: chunk and block planning, device choice, and its memory
pools over a fake library (no GPU needed)."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from gpu_matrix_service.backends.base import least_busy_device, take_device
from gpu_matrix_service.backends.cuda import binding
from gpu_matrix_service.backends.cuda.backend import (
    GpuDevice,
    plan_chunks,
    plan_matmul_block_rows,
)
from gpu_matrix_service.backends.cuda.pools import DevicePool, PinnedHostPool, size_class
from gpu_matrix_service.errors import DeviceOutOfMemory

MiB = 1024 * 1024


class FakeLibrary:
    """Stands in for KernelLibrary: host memory from NumPy, device memory as counters."""

    def __init__(self, device_capacity: int = 1 << 40) -> None:
        self.host = {}
        self.device = {}
        self.capacity = device_capacity
        self.next_address = 1 << 20

    def host_alloc(self, nbytes):
        buffer = np.empty(nbytes, np.uint8)
        self.host[buffer.ctypes.data] = buffer
        return buffer.ctypes.data

    def host_free(self, ptr):
        del self.host[ptr]

    def device_alloc(self, ordinal, nbytes):
        if sum(self.device.values()) + nbytes > self.capacity:
            raise DeviceOutOfMemory("cudaMalloc failed: out of memory")
        self.next_address += nbytes
        self.device[self.next_address] = nbytes
        return self.next_address

    def device_free(self, ordinal, ptr):
        del self.device[ptr]


def test_size_classes_are_powers_of_two_then_multiples_of_2_mib():
    assert [size_class(n) for n in (0, 1, 512, 513, 3000, 2 * MiB)] == [
        512,
        512,
        512,
        1024,
        4096,
        2 * MiB,
    ]
    assert size_class(2 * MiB + 1) == 4 * MiB
    assert size_class(64 * MiB) == 64 * MiB


def test_small_elementwise_request_is_one_chunk():
    assert plan_chunks(3, 4) == plan_chunks(3, 4).__class__(chunk_elems=3, slots=1)


def test_4096_square_float32_is_cut_into_eight_chunks_over_three_slots():
    plan = plan_chunks(4096 * 4096, 4)
    assert plan.chunk_elems * 4 == 8 * MiB
    assert plan.slots == 3


def test_chunks_stay_between_1_and_16_mib():
    assert plan_chunks(1 << 28, 8).chunk_elems * 8 == 16 * MiB
    assert plan_chunks(1 << 20, 4).chunk_elems * 4 == 1 * MiB


def test_matmul_blocks_cover_all_rows_in_at_most_four_blocks():
    for m in (1, 1023, 1024, 3001, 8192, 100_000):
        rows = plan_matmul_block_rows(m)
        assert -(-m // rows) <= 4
        assert rows >= min(m, 1024) or m < 1024
    assert plan_matmul_block_rows(8192) == 2048
    assert plan_matmul_block_rows(1000) == 1000


def test_least_busy_device_has_fewest_requests_in_flight_then_fewest_served():
    loads = [(2, 0), (0, 5), (1, 0), (0, 3)]
    devices = [
        GpuDevice(i, "gpu", 1, 0, None, in_flight=f, served=s) for i, (f, s) in enumerate(loads)
    ]
    assert least_busy_device(devices).ordinal == 3
    assert least_busy_device(devices[:2]).ordinal == 1


def test_take_device_idle_only_skips_busy_devices_and_holds_the_first_lock():
    devices = [GpuDevice(i, "gpu", 1, 0, None, in_flight=f) for i, f in enumerate((1, 0, 0))]
    taken = take_device(devices, idle_only=True)
    assert taken is devices[1] and taken.in_flight == 1 and taken.served == 1
    assert taken.first.locked()
    devices[2].first.acquire()  # another caller's request runs on it at once
    assert take_device(devices, idle_only=True) is None
    assert devices[2].in_flight == 0
    assert take_device(devices) is devices[2]  # a worker's request may still take it
    assert devices[2].in_flight == 1


def test_device_pool_reuses_blocks_and_trims_cache():
    library = FakeLibrary()
    pool = DevicePool(library, 0)
    with pool.lease([5 * MiB, 100]) as (big, _small):
        assert pool.in_use_bytes() == 6 * MiB + 512
    assert pool.cached_bytes() == 6 * MiB + 512
    with pool.lease([5 * MiB]) as (again,):
        assert again == big  # no new cudaMalloc
    assert len(library.device) == 2
    assert pool.trim() == 6 * MiB + 512
    assert library.device == {}


def test_device_pool_lease_releases_what_it_got_when_an_allocation_fails():
    library = FakeLibrary(device_capacity=10 * MiB)
    pool = DevicePool(library, 0)
    with pytest.raises(DeviceOutOfMemory), pool.lease([4 * MiB, 8 * MiB]):
        pass
    assert pool.in_use_bytes() == 0
    assert pool.cached_bytes() == 4 * MiB


def test_pinned_arrays_return_their_block_when_collected():
    library = FakeLibrary()
    pool = PinnedHostPool(library)
    array = pool.empty((100, 300), np.float64)
    assert array.shape == (100, 300) and array.dtype == np.float64
    assert array.flags.c_contiguous and array.flags.writeable
    address = array.ctypes.data
    assert pool.stats() == (0, size_class(100 * 300 * 8))
    del array
    gc.collect()
    assert pool.stats() == (size_class(100 * 300 * 8), 0)
    assert pool.empty((300, 100), np.float64).ctypes.data == address


def test_pinned_pool_unpins_beyond_its_cache_limit_and_on_close():
    library = FakeLibrary()
    pool = PinnedHostPool(library, max_cached_bytes=4 * MiB)
    arrays = [pool.empty((MiB,), np.uint8) for _ in range(6)]
    del arrays
    gc.collect()
    assert pool.stats() == (4 * MiB, 0)
    assert len(library.host) == 4
    survivor = pool.empty((10,), np.int32)
    pool.close()
    assert len(library.host) == 1
    del survivor
    gc.collect()
    assert library.host == {}


def test_zero_size_pinned_request_is_plain_memory():
    pool = PinnedHostPool(FakeLibrary())
    assert pool.empty((0, 4), np.float32).shape == (0, 4)


def test_array_addresses_handed_to_the_library_are_their_first_bytes():
    base = np.arange(64, dtype=np.float32).reshape(8, 8)
    read_only = base.copy()
    read_only.flags.writeable = False
    cases = {
        "whole": base,
        "rows from the second": base[1:],
        "read-only": read_only,
        "empty": base[:0],
        "transposed": base.T,
        "every other column": base[:, ::2],
    }
    for label, array in cases.items():
        assert binding.address(array) == array.ctypes.data, label


def test_each_thread_has_its_own_error_buffer():
    buffers = []
    thread = threading.Thread(target=lambda: buffers.append(binding._error_buffer()))
    thread.start()
    thread.join()
    assert binding._error_buffer() is binding._error_buffer()
    assert buffers[0] is not binding._error_buffer()
    assert len(buffers[0]) == binding.ERROR_BUFFER_BYTES
