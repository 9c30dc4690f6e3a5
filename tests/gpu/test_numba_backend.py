"""The numba backend on real GPUs: answers against NumPy, odd shapes, threads, out-of-memory.

Run on a GPU machine with ``pytest -m gpu``; every test here skips where numba cannot reach a
CUDA device (and under the simulator, which ``tests/unit/test_numba_kernels.py`` covers).
"""

from __future__ import annotations

import gc
import math
import threading

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda")

from backend_cases import check_run_if_idle  # noqa: E402
from gpu_matrix_service.backends.base import BackendUnavailable, RunOptions  # noqa: E402
from gpu_matrix_service.errors import DeviceOutOfMemory  # noqa: E402
from gpu_matrix_service.ops import get_op  # noqa: E402
from gpu_matrix_service.settings import Settings  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.filterwarnings("ignore:.*Grid size"),  # small grids are expected for small arrays
    pytest.mark.skipif(bool(cuda.config.ENABLE_CUDASIM), reason="needs a real GPU"),
]

ELEMENTWISE = ("add", "subtract", "multiply")
DTYPES = (np.float32, np.float64, np.int32, np.int64)
MiB = 1 << 20


def make_backend(**settings):
    from gpu_matrix_service.backends.numba_cuda import NumbaBackend

    try:
        return NumbaBackend(Settings(**settings))
    except BackendUnavailable as exc:
        pytest.skip(f"numba backend unavailable here: {exc}")


@pytest.fixture(scope="module")
def backend():
    be = make_backend()
    yield be
    be.close()


def operands(backend, shape, dtype, seed=0):
    """Random operands in the backend's pinned staging memory, as the service decodes them."""
    rng = np.random.default_rng(seed)
    pair = []
    for _ in range(2):
        host = backend.empty_host(shape, np.dtype(dtype))
        if np.dtype(dtype).kind == "f":
            host[...] = rng.standard_normal(shape, dtype=np.float64)
        else:
            host[...] = rng.integers(-(2**20), 2**20, size=shape)
        pair.append(host)
    return pair


def assert_matmul_close(got, a, b):
    exact = a.astype(np.float64) @ b.astype(np.float64)
    eps = np.finfo(a.dtype).eps
    # Rounding grows with the inner dimension; inputs are standard normal.
    tol = 4 * eps * a.shape[1] ** 0.5 * max(1.0, a.shape[1] ** 0.5)
    np.testing.assert_allclose(got, exact, rtol=tol, atol=tol)


def test_every_visible_gpu_is_listed_and_named(backend):
    devices = backend.devices()
    assert [d.index for d in devices] == list(range(len(cuda.gpus)))
    assert all(d.kind == "GPU" and d.name for d in devices)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op_name", ELEMENTWISE)
def test_elementwise_matches_numpy_on_random_data(backend, op_name, dtype):
    a, b = operands(backend, (513, 1031), dtype)
    result = backend.run(get_op(op_name), a, b, RunOptions())
    np.testing.assert_array_equal(result.array, get_op(op_name).reference(a, b))
    assert (result.device, result.backend) == ("GPU", "numba")
    assert result.device_name.endswith(")") and "(cuda:" in result.device_name
    assert set(result.timings) == {"h2d", "kernel", "d2h", "total"}
    assert all(t > 0 for t in result.timings.values())


@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 4097), (4097, 1), (1023, 1025), (4096, 4096), (64, 65, 66)], ids=str
)
@pytest.mark.parametrize("dtype", [np.float32, np.int64], ids=lambda d: np.dtype(d).name)
def test_elementwise_odd_shapes(backend, dtype, shape):
    a, b = operands(backend, shape, dtype, seed=2)
    for op_name in ELEMENTWISE:
        got = backend.run(get_op(op_name), a, b, RunOptions()).array
        np.testing.assert_array_equal(got, get_op(op_name).reference(a, b))


@pytest.mark.parametrize(
    ("a_shape", "b_shape"),
    [
        ((1, 1), (1, 1)),
        ((1, 1000), (1000, 1)),
        ((1000, 1), (1, 999)),
        ((64, 64), (64, 64)),
        ((33, 47), (47, 29)),
        ((1023, 1025), (1025, 1027)),
        ((4096, 4096), (4096, 4096)),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_matmul_matches_numpy(backend, dtype, a_shape, b_shape):
    rng = np.random.default_rng(3)
    a = rng.standard_normal(a_shape).astype(dtype)
    b = rng.standard_normal(b_shape).astype(dtype)
    result = backend.run(get_op("matmul"), a, b, RunOptions())
    assert result.array.shape == (a_shape[0], b_shape[1]) and result.array.dtype == dtype
    assert_matmul_close(result.array, a, b)


def test_integer_overflow_wraps_like_numpy(backend):
    info = np.iinfo(np.int32)
    a = np.full(1000, info.max, np.int32)
    b = np.arange(1000, dtype=np.int32)
    with np.errstate(over="ignore"):
        for op_name in ELEMENTWISE:
            got = backend.run(get_op(op_name), a, b, RunOptions()).array
            np.testing.assert_array_equal(got, get_op(op_name).reference(a, b))


def test_concurrent_requests_from_threads_all_get_their_own_answer(backend):
    failures: list[str] = []

    def work(worker: int) -> None:
        for i in range(5):
            op_name = (*ELEMENTWISE, "matmul")[(worker + i) % 4]
            shape = (300 + worker, 300 + worker) if op_name == "matmul" else (700 + worker, 900)
            a, b = operands(backend, shape, np.float64, seed=worker * 10 + i)
            got = backend.run(get_op(op_name), a, b, RunOptions()).array
            expected = get_op(op_name).reference(a, b)
            if not np.allclose(got, expected, rtol=1e-12, atol=1e-10):
                failures.append(f"worker {worker} request {i} ({op_name}) differs")

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert all(gpu.in_flight == 0 for gpu in backend._gpus)


def test_out_of_memory_is_device_out_of_memory_and_the_next_request_works():
    be = make_backend(devices=[0])
    n = 128 * MiB  # elements: three float32 buffers of 512 MiB each
    a = np.ones(n, np.float32)
    b = np.full(n, 2.0, np.float32)
    with cuda.gpus[0]:
        free, _ = cuda.current_context().get_memory_info()
        hog = cuda.device_array(free - 1024 * MiB, dtype=np.uint8)  # leaves 1 GiB < 1.5 GiB
    try:
        with pytest.raises(DeviceOutOfMemory, match="does not fit"):
            be.run(get_op("add"), a, b, RunOptions())
    finally:
        del hog
        gc.collect()
        with cuda.gpus[0]:
            cuda.current_context().deallocations.clear()
    result = be.run(get_op("add"), a, b, RunOptions())
    assert math.isclose(float(result.array[-1]), 3.0) and bool((result.array == 3.0).all())
    be.close()


def test_run_if_idle_computes_on_an_idle_gpu_and_declines_while_every_gpu_is_busy(
    backend, monkeypatch
):
    a, b = operands(backend, (64, 64), np.float32, seed=3)
    check_run_if_idle(backend, monkeypatch, a, b, hold="_compute", busy_op="add",
                      again_op="multiply")  # fmt: skip
