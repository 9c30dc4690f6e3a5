"""Tiny work on a backend that launches (the CUDA C one): started from the event loop,
answered when the backend reports it finished, timed out like any computation, and never
launched where the backend declines or fails. The backend is a fake one (tests/gpu has the
real one)."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np

from gpu_matrix_service.app import create_app
from gpu_matrix_service.errors import BackendFailure
from gpu_matrix_service.settings import Settings

from arrayfiles import npz_bytes
from fake_backends import LaunchingFakeBackend


def serve(backend: LaunchingFakeBackend, scenario, **settings: object) -> None:
    """Run ``scenario(http, app)`` against the app on one event loop, lifespan included."""
    settings = {"launch_tiny": True, **settings}
    app = create_app(Settings(backend="cpu", _env_file=None, **settings), backend=backend)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as http,
        ):
            await scenario(http, app)

    asyncio.run(main())


def operands(seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((2, 16, 8)).astype(np.float32)
    return a, b, {"file_a": ("a.npz", npz_bytes(a)), "file_b": ("b.npz", npz_bytes(b))}


def test_tiny_work_is_launched_and_answered_when_the_backend_reports_it():
    backend = LaunchingFakeBackend()

    async def scenario(http, app):
        a, b, files = operands()
        response = await http.post("/v1/ops/subtract?result=npy", files=files)
        assert response.status_code == 200, response.text
        assert response.headers["X-Device"] == "GPU"
        got = np.load(io.BytesIO(response.content))
        np.testing.assert_array_equal(got, a - b)
        answer = (await http.post("/add", files=files)).json()
        assert answer["matrix_shape"] == [16, 8] and answer["device"] == "GPU"
        assert (backend.launches, backend.inline_runs, backend.worker_runs) == (2, 0, 0)
        assert app.state.compute.admission.active == 0

    serve(backend, scenario)


def test_a_launched_job_over_the_timeout_is_504_and_keeps_its_place_until_it_finishes():
    backend = LaunchingFakeBackend(hold=True)

    async def scenario(http, app):
        *_, files = operands()
        slow = await http.post("/add", files=files)
        assert slow.status_code == 504
        assert "GMS_COMPUTE_TIMEOUT_SECONDS" in slow.json()["detail"]
        # The GPU still has it: no place for another request until it finishes.
        assert (await http.post("/add", files=files)).status_code == 503
        backend.finish_held()
        await asyncio.sleep(0.05)  # the loop reads the eventfd and reports the job
        assert app.state.compute.admission.active == 0
        backend.hold = False
        assert (await http.post("/add", files=files)).status_code == 200

    serve(backend, scenario, compute_timeout_seconds=0.2, compute_threads=1, max_queued=0)


def test_a_declined_launch_is_computed_on_the_loop_as_before():
    backend = LaunchingFakeBackend(decline=True)

    async def scenario(http, app):
        a, b, files = operands(1)
        response = await http.post("/v1/ops/multiply?result=json", files=files)
        assert response.status_code == 200
        np.testing.assert_array_equal(np.array(response.json()["result"], np.float32), a * b)
        assert (backend.launches, backend.inline_runs) == (0, 1)

    serve(backend, scenario)


def test_work_larger_than_tiny_goes_to_a_worker_thread_not_a_launch():
    backend = LaunchingFakeBackend()

    async def scenario(http, app):
        big = np.ones((512, 512), np.float32)  # 1 MiB each: over the tiny limit together
        files = {"a": ("a.npz", npz_bytes(big)), "b": ("b.npz", npz_bytes(big))}
        assert (await http.post("/add", files=files)).status_code == 200
        assert (backend.launches, backend.worker_runs) == (0, 1)

    serve(backend, scenario)


def test_a_launch_that_fails_fails_that_request_only():
    backend = LaunchingFakeBackend(failure=BackendFailure("GPU computation failed: boom"))

    async def scenario(http, app):
        *_, files = operands()
        failed = await http.post("/add", files=files)
        assert failed.status_code == 503
        assert "boom" in failed.json()["detail"]
        backend.failure = None
        assert (await http.post("/add", files=files)).status_code == 200
        assert app.state.compute.admission.active == 0

    serve(backend, scenario)


def test_launching_is_off_unless_asked_for():
    assert Settings(_env_file=None).launch_tiny is False


def test_with_launching_off_tiny_work_is_computed_on_the_loop():
    backend = LaunchingFakeBackend()

    async def scenario(http, app):
        a, b, files = operands(2)
        response = await http.post("/v1/ops/add?result=json", files=files)
        assert response.status_code == 200
        np.testing.assert_array_equal(np.array(response.json()["result"], np.float32), a + b)
        assert (backend.launches, backend.inline_runs) == (0, 1)

    serve(backend, scenario, launch_tiny=False)


def test_a_launched_job_that_fails_on_the_device_fails_its_request_and_frees_its_place():
    backend = LaunchingFakeBackend(hold=True)

    async def scenario(http, app):
        *_, files = operands()
        pending = asyncio.create_task(http.post("/add", files=files))
        while not backend.held:
            await asyncio.sleep(0.01)
        backend.finish_held(BackendFailure("GPU computation failed: an illegal memory access"))
        failed = await pending
        assert failed.status_code == 503
        assert "illegal memory access" in failed.json()["detail"]
        assert app.state.compute.admission.active == 0

    serve(backend, scenario)
