"""The CUDA C backend on a real GPU: results against NumPy, pinned memory, concurrency, TF32,
out-of-memory and steady device memory. Skipped without a GPU (see conftest.py)."""

from __future__ import annotations

import ctypes
import gc
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from backend_cases import check_run_if_idle, poison_pinned_pool, random_array
from gpu_matrix_service.backends.base import BackendUnavailable, RunOptions
from gpu_matrix_service.backends.cuda.pools import size_class
from gpu_matrix_service.backends.pinned import in_pinned_block
from gpu_matrix_service.errors import BackendFailure, DeviceOutOfMemory, UnsupportedDType
from gpu_matrix_service.ops import OPS
from gpu_matrix_service.settings import Settings

pytestmark = pytest.mark.gpu

DTYPES = [np.float32, np.float64, np.int32, np.int64]
ELEMENTWISE = ["add", "subtract", "multiply"]
SHAPES = [(1, 1), (1, 4099), (4099, 1), (1023, 1025), (3, 5, 7), (4096, 4096)]
MiB = 1024 * 1024


def relative_error(out, reference):
    return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op_name", ELEMENTWISE)
def test_elementwise_matches_numpy_exactly(backend, rng, op_name, dtype, shape):
    op = OPS[op_name]
    a = backend.empty_host(shape, dtype)
    a[...] = random_array(rng, shape, dtype)
    b = random_array(rng, shape, dtype)  # pageable: goes through the staging ring
    poison_pinned_pool(backend, shape, dtype)
    result = backend.run(op, a, b, RunOptions())
    assert result.array.shape == shape
    assert result.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(result.array, op.reference(a, b))


@pytest.mark.parametrize(
    "mkn", [(1, 1, 1), (1, 257, 1), (1, 7, 300), (300, 7, 1), (1023, 1025, 517), (3001, 257, 1023)]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_matmul_matches_float64_reference(backend, rng, dtype, mkn):
    m, k, n = mkn
    a, b = random_array(rng, (m, k), dtype), random_array(rng, (k, n), dtype)
    poison_pinned_pool(backend, (m, n), dtype)
    result = backend.run(OPS["matmul"], a, b, RunOptions())
    reference = a.astype(np.float64) @ b.astype(np.float64)
    assert result.array.shape == (m, n)
    assert result.array.dtype == np.dtype(dtype)
    assert relative_error(result.array, reference) < (1e-5 if dtype == np.float32 else 1e-12)


def test_large_float32_matmul_is_exact_float32(backend, rng):
    a, b = random_array(rng, (4096, 4096), np.float32), random_array(rng, (4096, 4096), np.float32)
    result = backend.run(OPS["matmul"], a, b, RunOptions())
    assert relative_error(result.array, a.astype(np.float64) @ b.astype(np.float64)) < 1e-5
    assert set(result.timings) == {"h2d", "kernel", "d2h", "total"}


def test_tf32_only_when_allowed(backend, rng):
    a, b = random_array(rng, (2048, 2048), np.float32), random_array(rng, (2048, 2048), np.float32)
    reference = a.astype(np.float64) @ b.astype(np.float64)
    exact = relative_error(backend.run(OPS["matmul"], a, b, RunOptions()).array, reference)
    tf32 = relative_error(
        backend.run(OPS["matmul"], a, b, RunOptions(allow_tf32=True)).array, reference
    )
    assert exact < 1e-5
    assert 5e-5 < tf32 < 5e-3
    assert tf32 > 5 * exact


def test_empty_operands_give_empty_or_zero_results(backend):
    empty = np.empty((0, 5), np.float32)
    assert backend.run(OPS["add"], empty, empty, RunOptions()).array.shape == (0, 5)
    a, b = np.empty((3, 0), np.float64), np.empty((0, 4), np.float64)
    np.testing.assert_array_equal(backend.run(OPS["matmul"], a, b, RunOptions()).array, 0.0)


@pytest.mark.parametrize(
    "view",
    [
        lambda x: x[::2, ::3],
        lambda x: x.T,
        np.asfortranarray,
        lambda x: x[:, 1:],
    ],
    ids=["strided", "transposed", "fortran", "offset"],
)
def test_non_contiguous_inputs(backend, rng, view):
    a, b = random_array(rng, (1201, 1203), np.float64), random_array(rng, (1201, 1203), np.float64)
    a, b = view(a), view(b)
    np.testing.assert_array_equal(backend.run(OPS["subtract"], a, b, RunOptions()).array, a - b)
    left = view(random_array(rng, (301, 301), np.float64))
    right = view(random_array(rng, (301, 301), np.float64)).T
    got = backend.run(OPS["matmul"], left, right, RunOptions()).array
    assert relative_error(got, left @ right) < 1e-12


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op_name", ELEMENTWISE)
def test_small_operands_take_the_zero_copy_kernel_up_to_its_limit(backend, rng, op_name, dtype):
    from gpu_matrix_service.backends.cuda.backend import ZERO_COPY_BYTES

    op, itemsize = OPS[op_name], np.dtype(dtype).itemsize
    most = ZERO_COPY_BYTES // itemsize
    for count, zero_copy in [(most, True), (most + 1, False), (4099, True)]:
        a = backend.empty_host((count,), dtype)  # pinned (4099 of 4 bytes: plain, staged)
        a[...] = random_array(rng, count, dtype)
        b = np.empty(count + 1, dtype)[1:]  # pageable and not 16-byte aligned: staged
        b[...] = random_array(rng, count, dtype)
        poison_pinned_pool(backend, (count,), dtype)
        result = backend.run(op, a, b, RunOptions())
        np.testing.assert_array_equal(result.array, op.reference(a, b))
        # The zero-copy kernel moves the bytes itself: no copy phases.
        assert (result.timings["h2d"] == 0.0) is zero_copy
        assert result.timings["kernel"] > 0 and result.timings["total"] > 0


def test_zero_copy_writes_a_pageable_result_through_staging_and_refuses_large_operands(rng):
    from gpu_matrix_service.backends.cuda.binding import LIBRARY_NAME, PACKAGE_DIR, KernelLibrary

    library = KernelLibrary(PACKAGE_DIR / LIBRARY_NAME)
    context = library.context_create(0)
    try:
        a, b = random_array(rng, (64, 64), np.float32), random_array(rng, (64, 64), np.float32)
        out = np.full((64, 64), np.nan, np.float32)  # pageable, as when pinning fails
        timings = library.elementwise_zero_copy(context, "subtract", a, b, out)
        np.testing.assert_array_equal(out, a - b)
        assert timings["total"] > 0
        big = np.zeros(8 * MiB // 4 + 1, np.float32)  # more than a staging buffer
        with pytest.raises(BackendFailure, match="bad arguments"):
            library.elementwise_zero_copy(context, "add", big, big, big.copy())
        # A count whose byte size wraps around to 8 is refused, not run over 2**62 elements.
        status = library._lib.gms_elementwise_zero_copy(
            context, 0, 3, a.ctypes.data, b.ctypes.data, out.ctypes.data, (1 << 62) + 1,
            (ctypes.c_double * 4)(), None, 0,
        )  # fmt: skip
        assert status != 0
    finally:
        library.context_destroy(context)


def test_large_pageable_inputs_stream_through_staging(backend, rng):
    a, b = random_array(rng, (3000, 3000), np.int64), random_array(rng, (3000, 3000), np.int64)
    np.testing.assert_array_equal(backend.run(OPS["multiply"], a, b, RunOptions()).array, a * b)


def test_small_host_arrays_are_plain_memory_unless_tiny_work_is_launched(backend, rng):
    from gpu_matrix_service.backends.cuda.backend import PAGEABLE_HOST_BYTES, CudaBackend

    most = PAGEABLE_HOST_BYTES // 4
    a = backend.empty_host((most,), np.float32)
    assert not in_pinned_block(a) and in_pinned_block(backend.empty_host((most + 1,), np.float32))
    a[...] = random_array(rng, most, np.float32)
    b = random_array(rng, most, np.float32)
    # Another result first: the staging buffer the next one comes back through holds it.
    backend.run(OPS["add"], a, b, RunOptions())
    result = backend.run(OPS["multiply"], a, b, RunOptions())
    assert not in_pinned_block(result.array)
    np.testing.assert_array_equal(result.array, a * b)
    assert result.timings["h2d"] == 0.0  # the zero-copy kernel, through the staging buffers
    launching = CudaBackend(Settings(_env_file=None, backend="cuda", launch_tiny=True))
    try:
        tiny = launching.empty_host((1,), np.float32)
        assert in_pinned_block(tiny)
        del tiny
    finally:
        launching.close()


def test_empty_host_is_pinned_pool_memory_returned_on_collection(backend):
    gc.collect()  # earlier tests' arrays go back first, so the counts below are this test's
    array = backend.empty_host((777, 1013), np.float32)
    assert array.flags.c_contiguous and array.flags.writeable
    assert array.shape == (777, 1013) and array.dtype == np.float32
    assert type(array.base).__name__ == "_PinnedOwner"
    address = array.ctypes.data
    lent = backend.memory_usage()["pinned_lent_bytes"]
    view = array[10:20]
    del array
    gc.collect()
    assert backend.memory_usage()["pinned_lent_bytes"] == lent  # the view keeps it
    del view
    gc.collect()
    assert backend.memory_usage()["pinned_lent_bytes"] < lent
    assert backend.empty_host((777, 1013), np.float32).ctypes.data == address


def test_result_reports_gpu_device_and_timings(backend, rng):
    a, b = random_array(rng, (2048, 2048), np.float32), random_array(rng, (2048, 2048), np.float32)
    result = backend.run(OPS["add"], a, b, RunOptions())
    assert result.device == "GPU" and result.backend == "cuda"
    assert result.device_name.endswith(")") and "(cuda:" in result.device_name
    assert all(result.timings[key] > 0 for key in ("h2d", "kernel", "d2h", "total"))
    assert result.elapsed_time == result.timings["total"]


def test_supports_exactly_the_gpu_dtypes(backend):
    for name in ELEMENTWISE:
        assert {d for d in DTYPES if backend.supports(OPS[name], np.dtype(d))} == set(DTYPES)
        assert not backend.supports(OPS[name], np.dtype(np.float16))
        assert not backend.supports(OPS[name], np.dtype(np.complex64))
    matmul = {d for d in DTYPES if backend.supports(OPS["matmul"], np.dtype(d))}
    assert matmul == {np.float32, np.float64}
    with pytest.raises(UnsupportedDType):
        backend.run(
            OPS["matmul"], np.ones((2, 2), np.int32), np.ones((2, 2), np.int32), RunOptions()
        )


def test_concurrent_requests_from_threads(backend):
    cases = [
        (op, dtype, shape)
        for op in [*ELEMENTWISE, "matmul"]
        for dtype in DTYPES
        for shape in [(517, 999), (1024, 1024), (2000, 300)]
        if op != "matmul" or np.dtype(dtype).kind == "f"
    ]
    devices_used = set()
    lock = threading.Lock()

    def check(index):
        op, dtype, shape = cases[index % len(cases)]
        rng = np.random.default_rng(index)
        a = random_array(rng, shape, dtype)
        b = random_array(rng, shape[::-1] if op == "matmul" else shape, dtype)
        result = backend.run(OPS[op], a, b, RunOptions())
        with lock:
            devices_used.add(result.device_name)
        if op == "matmul":
            reference = a.astype(np.float64) @ b.astype(np.float64)
            tolerance = 1e-5 if np.dtype(dtype) == np.float32 else 1e-12
            assert relative_error(result.array, reference) < tolerance
        else:
            np.testing.assert_array_equal(result.array, OPS[op].reference(a, b))

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(check, range(3 * len(cases))))
    if len(backend.devices()) > 1:
        assert len(devices_used) > 1  # the least busy device is not always the first


def test_run_if_idle_computes_on_an_idle_gpu_and_declines_while_every_gpu_is_busy(
    backend, rng, monkeypatch
):
    a, b = random_array(rng, (64, 64), np.float32), random_array(rng, (64, 64), np.float32)
    busy = check_run_if_idle(backend, monkeypatch, a, b, hold="_matmul", busy_op="matmul",
                             again_op="subtract")  # fmt: skip
    for result in busy:
        np.testing.assert_allclose(result.array, a @ b, rtol=1e-4, atol=1e-2)


@pytest.fixture
def one_gpu_backend():
    """GPU 0 alone: its pool's cache is then the whole of ``memory_usage``."""
    from gpu_matrix_service.backends.cuda.backend import CudaBackend

    cuda = CudaBackend(Settings(_env_file=None, backend="cuda", devices="0"))
    yield cuda
    cuda.close()


def test_a_request_that_takes_the_gpu_during_run_if_idle_waits_for_it(
    one_gpu_backend, rng, monkeypatch
):
    backend = one_gpu_backend
    a, b = random_array(rng, (64, 64), np.float32), random_array(rng, (64, 64), np.float32)
    order, products = [], []
    elementwise, matmul = backend._elementwise, backend._matmul
    worker = threading.Thread(
        target=lambda: products.append(backend.run(OPS["matmul"], a, b, RunOptions()).array)
    )

    def tracking_matmul(*args):
        order.append("matmul")
        return matmul(*args)

    def tracking_add(*args):
        order.append("tiny add")
        worker.start()  # takes the same GPU while the tiny add holds it
        time.sleep(0.3)  # time enough for the matmul to start, unless it waits
        order.append("tiny add done")
        return elementwise(*args)

    monkeypatch.setattr(backend, "_elementwise", tracking_add)
    monkeypatch.setattr(backend, "_matmul", tracking_matmul)
    result = backend.run_if_idle(OPS["add"], a, b, RunOptions())
    worker.join(20)
    assert order == ["tiny add", "tiny add done", "matmul"]
    np.testing.assert_array_equal(result.array, a + b)
    np.testing.assert_allclose(products[0], a @ b, rtol=1e-4, atol=1e-2)


def test_out_of_memory_raises_and_the_next_request_works(one_gpu_backend, rng, nvml_total_bytes):
    backend = one_gpu_backend
    x, y = random_array(rng, (4096, 4096), np.float32), random_array(rng, (4096, 4096), np.float32)
    backend.run(OPS["matmul"], x, y, RunOptions())  # leaves 3 x 64 MiB cached in the pool
    total = max(nvml_total_bytes(d.index) for d in backend.devices())
    side = math.isqrt(int(1.2 * total / 4)) + 1  # an (m, 1) @ (1, n) product bigger than the GPU
    a, b = random_array(rng, (side, 1), np.float32), random_array(rng, (1, side), np.float32)
    with pytest.raises(DeviceOutOfMemory):
        backend.run(OPS["matmul"], a, b, RunOptions())
    # Trimmed: only the retry's two small operand blocks are cached now.
    assert backend.memory_usage()["device_cached_bytes"] <= 2 * size_class(side * 4)
    np.testing.assert_array_equal(backend.run(OPS["add"], x, y, RunOptions()).array, x + y)


def test_device_memory_stays_flat_over_repeated_requests(backend, rng, nvml_used_bytes):
    pinned_a = backend.empty_host((4096, 4096), np.float32)
    pinned_a[...] = random_array(rng, (4096, 4096), np.float32)
    b = random_array(rng, (4096, 4096), np.float32)
    m1, m2 = (
        random_array(rng, (1024, 1024), np.float64),
        random_array(rng, (1024, 1024), np.float64),
    )

    def requests():
        backend.run(OPS["add"], pinned_a, b, RunOptions())
        backend.run(OPS["multiply"], b[:1000], b[1000:2000], RunOptions())
        backend.run(OPS["matmul"], m1, m2, RunOptions())

    for _ in range(3):
        requests()
    ordinals = [d.index for d in backend.devices()]
    before = [nvml_used_bytes(o) for o in ordinals]
    cached = backend.memory_usage()["device_cached_bytes"]
    for _ in range(40):
        requests()
    after = [nvml_used_bytes(o) for o in ordinals]
    assert all(a - b_ <= 2 * MiB for a, b_ in zip(after, before, strict=True)), (before, after)
    assert backend.memory_usage()["device_cached_bytes"] == cached


def test_failing_calls_raise_typed_errors_without_crashing():
    from gpu_matrix_service.backends.cuda.binding import LIBRARY_NAME, PACKAGE_DIR, KernelLibrary

    library = KernelLibrary(PACKAGE_DIR / LIBRARY_NAME)
    with pytest.raises(BackendFailure, match="invalid device ordinal"):
        library.context_create(999)
    with pytest.raises(DeviceOutOfMemory, match="cudaErrorMemoryAllocation"):
        library.device_alloc(0, 1 << 52)
    assert library.device_count() >= 1


def test_unknown_device_ordinal_is_unavailable():
    from gpu_matrix_service.backends.cuda.backend import CudaBackend

    with pytest.raises(BackendUnavailable, match="no GPU"):
        CudaBackend(Settings(_env_file=None, backend="cuda", devices=[999]))
