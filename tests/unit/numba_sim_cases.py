"""The numba backend's kernels and bookkeeping under Numba's CUDA simulator.

Not collected on its own (no ``test_`` prefix): ``test_numba_kernels.py`` runs this file with
pytest in a child process whose environment sets ``NUMBA_ENABLE_CUDASIM=1``, because numba reads
that variable once, at its first import, and the parent test process may already hold a real
numba. Sizes stay small: every simulated GPU thread is a Python thread.
"""

from __future__ import annotations

import gc
import itertools
import os
import threading
import time
from dataclasses import replace

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    pytest.skip(
        "run through test_numba_kernels.py (needs NUMBA_ENABLE_CUDASIM=1)", allow_module_level=True
    )

import numpy as np

cuda = pytest.importorskip("numba.cuda")

from backend_cases import check_run_if_idle  # noqa: E402
from gpu_matrix_service.backends import numba_cuda, numba_kernels, numba_memory  # noqa: E402
from gpu_matrix_service.backends.base import BackendUnavailable, RunOptions  # noqa: E402
from gpu_matrix_service.backends.numba_cuda import NumbaBackend  # noqa: E402
from gpu_matrix_service.errors import (  # noqa: E402
    BackendFailure,
    DeviceOutOfMemory,
    UnsupportedDType,
)
from gpu_matrix_service.ops import get_op  # noqa: E402
from gpu_matrix_service.settings import Settings  # noqa: E402

ELEMENTWISE = ("add", "subtract", "multiply")
DTYPES = (np.float32, np.float64, np.int32, np.int64)
ODD_SHAPES = ((1, 1), (1, 50), (50, 1), (17, 33), (3, 5, 7), (100,))
# Pipeline chunks of 64 bytes: a 17x33 float64 operand becomes 8 chunks over 2 streams.
TINY_CHUNKS = replace(numba_kernels.SIMULATOR_TUNING, chunk_bytes=64, max_chunks=8, streams=2)


@pytest.fixture(scope="module")
def backend():
    be = NumbaBackend(Settings())
    yield be
    be.close()


@pytest.fixture(scope="module")
def chunked_backend():
    be = NumbaBackend(Settings(), tuning=TINY_CHUNKS)
    yield be
    be.close()


def random_operands(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return (rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype))
    return (
        rng.integers(-1000, 1000, size=shape).astype(dtype),
        rng.integers(-1000, 1000, size=shape).astype(dtype),
    )


def test_the_simulator_is_one_gpu_named_as_such(backend):
    [device] = backend.devices()
    assert (device.index, device.kind) == (0, "GPU")
    assert "simulator" in device.name.lower()


@pytest.mark.parametrize("dtype", [*DTYPES, np.float16, np.int8, np.uint32, np.complex64, np.bool_])
@pytest.mark.parametrize("op_name", [*ELEMENTWISE, "matmul"])
def test_supports_exactly_the_dtypes_the_kernels_compute(backend, op_name, dtype):
    expected = np.dtype(dtype) in (DTYPES if op_name != "matmul" else DTYPES[:2])
    assert backend.supports(get_op(op_name), np.dtype(dtype)) is expected


def test_unsupported_dtype_is_refused_not_computed(backend):
    a = np.ones(3, np.float16)
    with pytest.raises(UnsupportedDType):
        backend.run(get_op("add"), a, a, RunOptions())


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op_name", ELEMENTWISE)
def test_elementwise_matches_numpy(backend, op_name, dtype, shape):
    a, b = random_operands(shape, dtype)
    result = backend.run(get_op(op_name), a, b, RunOptions())
    expected = get_op(op_name).reference(a, b)
    assert result.array.shape == expected.shape
    assert result.array.dtype == expected.dtype
    np.testing.assert_array_equal(result.array, expected)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # simulator scalars
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_integer_overflow_wraps_like_numpy(backend, dtype):
    info = np.iinfo(dtype)
    a = np.array([info.max, info.min, info.max], dtype=dtype)
    b = np.array([1, -1, info.max], dtype=dtype)
    with np.errstate(over="ignore"):
        for op_name in ELEMENTWISE:
            expected = get_op(op_name).reference(a, b)
            np.testing.assert_array_equal(
                backend.run(get_op(op_name), a, b, RunOptions()).array, expected
            )


@pytest.mark.parametrize("shape", [(17, 33), (5,), (8, 8)], ids=str)
@pytest.mark.parametrize("op_name", ELEMENTWISE)
def test_chunked_pipeline_matches_numpy(chunked_backend, op_name, shape):
    a, b = random_operands(shape, np.float64, seed=3)
    result = chunked_backend.run(get_op(op_name), a, b, RunOptions())
    np.testing.assert_array_equal(result.array, get_op(op_name).reference(a, b))


@pytest.mark.parametrize(("n", "itemsize"), [(1, 8), (561, 8), (64, 1), (7, 4), (1000, 8)])
def test_chunk_bounds_cover_every_element_once(n, itemsize):
    bounds = numba_kernels.chunk_bounds(n, itemsize, TINY_CHUNKS)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(hi == lo for (_, hi), (lo, _) in itertools.pairwise(bounds))
    assert all(hi > lo for lo, hi in bounds)
    assert len(bounds) <= TINY_CHUNKS.max_chunks


MATMUL_SHAPES = (
    ((1, 1), (1, 1)),
    ((1, 7), (7, 1)),
    ((7, 1), (1, 5)),
    ((16, 16), (16, 16)),  # exactly one simulator tile
    ((17, 3), (3, 9)),
    ((33, 47), (47, 29)),  # no dimension a multiple of the tile or its depth
)


@pytest.mark.parametrize(("a_shape", "b_shape"), MATMUL_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_matmul_matches_numpy(backend, dtype, a_shape, b_shape):
    rng = np.random.default_rng(1)
    a = rng.standard_normal(a_shape).astype(dtype)
    b = rng.standard_normal(b_shape).astype(dtype)
    result = backend.run(get_op("matmul"), a, b, RunOptions())
    assert result.array.shape == (a_shape[0], b_shape[1])
    assert result.array.dtype == np.dtype(dtype)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(result.array, a @ b, rtol=rtol, atol=rtol * a_shape[1])


def test_matmul_with_empty_inner_dimension_is_zeros(backend):
    a, b = np.ones((3, 0), np.float32), np.ones((0, 4), np.float32)
    np.testing.assert_array_equal(
        backend.run(get_op("matmul"), a, b, RunOptions()).array, np.zeros((3, 4), np.float32)
    )


def test_non_contiguous_operands_are_read_correctly(backend):
    a, b = random_operands((9, 12), np.float64, seed=5)
    result = backend.run(get_op("subtract"), a.T, b.T, RunOptions())
    np.testing.assert_array_equal(result.array, a.T - b.T)
    product = backend.run(get_op("matmul"), a[:, ::2], b.T[::2], RunOptions())
    np.testing.assert_allclose(product.array, a[:, ::2] @ b.T[::2], rtol=1e-12)


def test_result_names_the_device_the_backend_and_every_phase(backend):
    a, b = random_operands((4, 4), np.float32)
    result = backend.run(get_op("add"), a, b, RunOptions())
    assert (result.device, result.backend) == ("GPU", "numba")
    assert result.device_name == "Numba CUDA simulator (cuda:0)"
    assert set(result.timings) == {"h2d", "kernel", "d2h", "total"}
    assert all(seconds >= 0 for seconds in result.timings.values())
    assert result.elapsed_time == result.timings["total"]


def test_empty_host_hands_out_reused_staging_buffers(backend):
    shape = (300, 301)  # a size class no other case uses
    first = backend.empty_host(shape, np.dtype(np.float32))
    assert (first.shape, first.dtype, first.flags.c_contiguous) == (shape, np.float32, True)
    first[...] = 1.5
    view = first[2:]  # a view keeps the buffer checked out
    addresses = {first.ctypes.data}
    del first
    gc.collect()
    second = backend.empty_host(shape, np.dtype(np.float32))
    assert second.ctypes.data not in addresses
    addresses.add(second.ctypes.data)
    del view, second
    gc.collect()
    third = backend.empty_host((301, 300), np.dtype(np.float32))  # same size class
    assert third.ctypes.data in addresses


def test_empty_host_of_nothing_is_an_empty_array(backend):
    assert backend.empty_host((0, 3), np.dtype(np.int64)).shape == (0, 3)


def failing_take(message):
    def take(self, nbytes):
        raise cuda.cudadrv.driver.CudaAPIError(message)

    return take


def test_out_of_memory_is_device_out_of_memory_and_the_next_request_works(monkeypatch):
    be = NumbaBackend(Settings())
    a, b = random_operands((4, 5), np.float32)
    with monkeypatch.context() as patch:
        patch.setattr(
            numba_memory.DeviceBuffers,
            "take",
            failing_take("Call to cuMemAlloc results in CUDA_ERROR_OUT_OF_MEMORY"),
        )
        with pytest.raises(DeviceOutOfMemory, match="does not fit on Numba CUDA simulator"):
            be.run(get_op("add"), a, b, RunOptions())
    np.testing.assert_array_equal(be.run(get_op("add"), a, b, RunOptions()).array, a + b)
    assert be._gpus[0].in_flight == 0
    be.close()


def test_other_cuda_errors_are_backend_failures_with_the_cuda_text(monkeypatch):
    be = NumbaBackend(Settings())
    a, b = random_operands((4, 5), np.float32)
    with monkeypatch.context() as patch:
        patch.setattr(
            numba_memory.DeviceBuffers,
            "take",
            failing_take("Call to cuMemAlloc results in CUDA_ERROR_ILLEGAL_ADDRESS"),
        )
        with pytest.raises(BackendFailure, match="CUDA_ERROR_ILLEGAL_ADDRESS"):
            be.run(get_op("multiply"), a, b, RunOptions())
    np.testing.assert_array_equal(be.run(get_op("multiply"), a, b, RunOptions()).array, a * b)
    be.close()


def test_the_backend_records_the_gpus_it_opened_contexts_on(backend):
    # One (simulated) GPU: numba's exit handlers are safe, the process exits normally.
    assert sorted(numba_cuda._ORDINALS_WITH_CONTEXTS) == [0]
    assert not numba_cuda.exits_crash_at_interpreter_exit()


def test_devices_outside_the_visible_ones_are_unavailable():
    with pytest.raises(BackendUnavailable, match="not among the 1 visible"):
        NumbaBackend(Settings(devices=[3]))


def test_runs_after_close_fail_cleanly():
    be = NumbaBackend(Settings())
    be.close()
    a = np.ones(3, np.float32)
    with pytest.raises(BackendFailure, match="shut down"):
        be.run(get_op("add"), a, a, RunOptions())


def test_concurrent_requests_from_threads_all_get_their_own_answer(backend):
    results: dict[int, np.ndarray] = {}

    def work(seed: int) -> None:
        a, b = random_operands((3, 11), np.int64, seed=seed)
        results[seed] = backend.run(get_op("add"), a, b, RunOptions()).array - (a + b)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1, 2, 3]
    assert all(not diff.any() for diff in results.values())


def test_run_if_idle_computes_on_an_idle_gpu_and_declines_while_every_gpu_is_busy(monkeypatch):
    be = NumbaBackend(Settings())
    a, b = random_operands((4, 5), np.float32, seed=7)
    check_run_if_idle(be, monkeypatch, a, b, hold="_compute", busy_op="add", again_op="multiply")
    be.close()


def test_a_request_that_takes_the_gpu_during_run_if_idle_waits_for_it(monkeypatch):
    be = NumbaBackend(Settings())
    a, b = random_operands((4, 5), np.float32, seed=8)
    order: list[str] = []
    compute = be._compute
    worker = threading.Thread(target=be.run, args=(get_op("add"), a, b, RunOptions()))

    def tracking(*args):
        order.append("start")
        if len(order) == 1:  # the run on the caller's thread: a worker takes the device now
            worker.start()
            time.sleep(0.3)  # time enough for it to start its own work, unless it waits
            order.append("caller done")
        return compute(*args)

    monkeypatch.setattr(be, "_compute", tracking)
    assert be.run_if_idle(get_op("add"), a, b, RunOptions()) is not None
    worker.join(20)
    assert order == ["start", "caller done", "start"]
    be.close()


@pytest.mark.parametrize(
    ("nbytes", "expected"),
    [(1, 65536), (65536, 65536), (65537, 81920), (64 << 20, 64 << 20), ((64 << 20) + 1, 80 << 20)],
)
def test_size_classes_round_up_by_at_most_a_quarter(nbytes, expected):
    assert numba_memory.size_class(nbytes) == expected
