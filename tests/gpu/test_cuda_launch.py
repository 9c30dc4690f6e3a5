"""Launched jobs of the CUDA C backend on a real GPU: started without waiting, reported
through the device's eventfd, each exactly once, with NumPy's results; declined where a
launch is not safe; and the service's event loop answering with them. Skipped without a GPU
(see conftest.py)."""

from __future__ import annotations

import asyncio
import io
import select

import httpx
import numpy as np
import pytest

from backend_cases import poison_pinned_pool, random_array
from gpu_matrix_service.app import create_app
from gpu_matrix_service.backends.base import RunOptions
from gpu_matrix_service.errors import BackendFailure
from gpu_matrix_service.ops import OPS
from gpu_matrix_service.settings import Settings

from arrayfiles import npz_bytes

pytestmark = pytest.mark.gpu

DTYPES = [np.float32, np.float64, np.int32, np.int64]
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def backend():
    """The CUDA C backend as the service makes it to launch tiny work (GMS_LAUNCH_TINY):
    every host array it lends, small ones too, in a pinned block."""
    from gpu_matrix_service.backends.cuda.backend import CudaBackend

    cuda = CudaBackend(Settings(_env_file=None, backend="cuda", launch_tiny=True))
    yield cuda
    cuda.close()


def pinned(backend, rng, shape, dtype):
    """Random values in an array of the backend's pinned pool."""
    array = backend.empty_host(shape, dtype)
    array[...] = random_array(rng, shape, dtype)
    return array


def finish_all(backend, results: dict, expected: int, timeout: float = 20.0) -> None:
    """Wait on the completion fds and report until ``expected`` results are in."""
    fds = backend.completion_fds()
    while len(results) < expected:
        readable, _, _ = select.select(fds, [], [], timeout)
        assert readable, f"only {len(results)} of {expected} launched jobs were reported"
        for fd in readable:
            backend.finish_launched(fd)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op_name", ["add", "subtract", "multiply"])
def test_a_launched_job_gives_numpys_result(backend, rng, op_name, dtype):
    from gpu_matrix_service.backends.cuda.backend import ZERO_COPY_BYTES

    op = OPS[op_name]
    for count in (1, 3, 4099, ZERO_COPY_BYTES // np.dtype(dtype).itemsize):
        a, b = pinned(backend, rng, (count,), dtype), pinned(backend, rng, (count,), dtype)
        poison_pinned_pool(backend, (count,), dtype)  # the result must overwrite all of it
        results: dict[int, object] = {}
        assert backend.launch_if_idle(op, a, b, lambda r, found=results: found.setdefault(0, r))
        finish_all(backend, results, 1)
        result = results[0]
        np.testing.assert_array_equal(result.array, op.reference(a, b))
        assert result.device == "GPU" and result.backend == "cuda"
        assert result.timings["h2d"] == 0.0 and result.timings["total"] > 0
    assert backend.launched_jobs() == 0


def test_hundreds_of_jobs_in_flight_are_each_reported_once_with_their_own_result(backend, rng):
    jobs = []
    results: dict[int, list] = {}
    for i in range(400):
        a, b = (pinned(backend, rng, (64, 64), np.float32) for _ in range(2))
        jobs.append((a, b))
        launched = backend.launch_if_idle(
            OPS["add"], a, b, lambda r, i=i: results.setdefault(i, []).append(r)
        )
        assert launched
    finish_all(backend, results, len(jobs))
    assert all(len(found) == 1 for found in results.values())
    for i, (a, b) in enumerate(jobs):
        np.testing.assert_array_equal(results[i][0].array, a + b)
    assert backend.launched_jobs() == 0


def test_launches_are_declined_where_they_are_not_safe(backend, rng):
    from gpu_matrix_service.backends.cuda.backend import ZERO_COPY_BYTES

    a, b = (pinned(backend, rng, (64, 64), np.float32) for _ in range(2))
    never = lambda result: pytest.fail("a declined launch reported a result")  # noqa: E731
    assert not backend.launch_if_idle(OPS["matmul"], a, b, never)
    assert not backend.launch_if_idle(OPS["add"], a, a.copy(), never)  # pageable operand
    big = ZERO_COPY_BYTES // 4 + 4
    x, y = pinned(backend, rng, (big,), np.float32), pinned(backend, rng, (big,), np.float32)
    assert not backend.launch_if_idle(OPS["add"], x, y, never)
    device = backend._devices[0]
    others = [d for d in backend._devices if d is not device]
    for busy in [device, *others]:
        busy.in_flight += 1  # a worker's request on every GPU: nothing is idle
    try:
        assert not backend.launch_if_idle(OPS["add"], a, b, never)
    finally:
        for busy in [device, *others]:
            busy.in_flight -= 1
    assert backend.launched_jobs() == 0


def test_the_library_refuses_pageable_operands_instead_of_faulting(backend, rng):
    a = np.ones((64, 64), np.float32)
    device = backend._devices[0]
    with pytest.raises(BackendFailure, match="pinned"):
        backend._library.elementwise_launch(device.context, "add", a, a, a.copy(), 1)
    # The context is unharmed: the next request computes.
    x, y = (pinned(backend, rng, (64, 64), np.float32) for _ in range(2))
    np.testing.assert_array_equal(backend.run(OPS["add"], x, y, RunOptions()).array, x + y)


def test_the_service_answers_tiny_requests_from_launched_jobs():
    app = create_app(Settings(_env_file=None, backend="cuda", launch_tiny=True))
    rng = np.random.default_rng(7)
    pairs = [rng.standard_normal((2, 64, 64)).astype(np.float32) for _ in range(64)]

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as http,
        ):
            launched = 0
            backend = app.state.compute.backend
            launch = backend.launch_if_idle

            def counting(*args):
                nonlocal launched
                started = launch(*args)
                launched += started
                return started

            backend.launch_if_idle = counting

            async def post(a, b):
                files = {"a": ("a.npz", npz_bytes(a)), "b": ("b.npz", npz_bytes(b))}
                return await http.post("/v1/ops/subtract?result=npy", files=files)

            answers = await asyncio.gather(*(post(a, b) for a, b in pairs))
            for (a, b), answer in zip(pairs, answers, strict=True):
                assert answer.status_code == 200, answer.text
                assert answer.headers["X-Device"] == "GPU"
                got = np.load(io.BytesIO(answer.content))
                np.testing.assert_array_equal(got, a - b)
            assert launched > 0
            assert app.state.compute.admission.active == 0

    asyncio.run(main())
