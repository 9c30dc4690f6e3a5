"""Bearer tokens, CORS, backpressure (503 + Retry-After) and the compute timeout (504)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from gpu_matrix_service import compute
from gpu_matrix_service.app import create_app
from gpu_matrix_service.auth import token_accepted
from gpu_matrix_service.backends.cpu import CpuBackend
from gpu_matrix_service.settings import Settings

from arrayfiles import npz_bytes


def two_files() -> dict:
    # Large enough to be computed on a worker thread, not inline (compute.TINY_BYTES).
    data = npz_bytes(np.arange(6.0 * 256 * 256).reshape(2 * 256, 3 * 256))
    return {"a": ("a.npz", data), "b": ("b.npz", data)}


@pytest.fixture
def secured() -> TestClient:
    settings = Settings(backend="cpu", api_tokens="alpha-token,beta-token", _env_file=None)
    with TestClient(create_app(settings)) as client:
        yield client


def test_compute_needs_a_bearer_token_when_tokens_are_set(secured):
    response = secured.post("/add", files=two_files())
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="gpu-matrix-service"'
    assert "Bearer" in response.json()["detail"]


def test_a_wrong_token_is_401_invalid_token(secured):
    response = secured.post(
        "/v1/ops/add", files=two_files(), headers={"Authorization": "Bearer nope"}
    )
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


@pytest.mark.parametrize("token", ["alpha-token", "beta-token"])
def test_every_configured_token_is_accepted(secured, token):
    response = secured.post("/add", files=two_files(), headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert response.json()["matrix_shape"] == [512, 768]


def test_health_and_metrics_stay_open_by_default(secured):
    for path in ("/health", "/health/live", "/health/ready", "/metrics"):
        assert secured.get(path).status_code == 200, path


def test_metrics_can_be_protected():
    settings = Settings(backend="cpu", api_tokens="t0k", metrics_auth=True, _env_file=None)
    with TestClient(create_app(settings)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer t0k"}).status_code == 200
        assert client.get("/health").status_code == 200


def test_tokens_never_show_in_settings_repr():
    settings = Settings(backend="cpu", api_tokens="super-secret", _env_file=None)
    assert "super-secret" not in repr(settings)
    assert "super-secret" not in str(settings.model_dump())


def test_token_comparison():
    tokens = [SecretStr("abc"), SecretStr("def")]
    assert token_accepted("def", tokens)
    assert not token_accepted("abd", tokens)
    assert not token_accepted("", tokens)


def test_cors_is_off_unless_configured(client):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    response = client.options("/add", headers=preflight)
    assert "access-control-allow-origin" not in response.headers
    settings = Settings(backend="cpu", cors_origins="https://app.example", _env_file=None)
    with TestClient(create_app(settings)) as cors_client:
        response = cors_client.options("/add", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://app.example"


class GatedBackend(CpuBackend):
    """Every run() waits until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.running = threading.Semaphore(0)

    def run(self, op, a, b, options):
        self.running.release()
        assert self.gate.wait(20)
        return super().run(op, a, b, options)


def _serve(settings: Settings, backend, scenario) -> None:
    app = create_app(settings, backend=backend)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as http,
        ):
            await scenario(http)

    asyncio.run(main())


def test_beyond_threads_and_queue_the_answer_is_503_with_retry_after():
    backend = GatedBackend()
    settings = Settings(backend="cpu", compute_threads=1, max_queued=1, _env_file=None)

    async def scenario(http: httpx.AsyncClient) -> None:
        running = asyncio.create_task(http.post("/add", files=two_files()))
        await asyncio.to_thread(backend.running.acquire, True, 10)
        queued = asyncio.create_task(http.post("/add", files=two_files()))
        await asyncio.sleep(0.2)
        refused = await http.post("/add", files=two_files())
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert "too many requests" in refused.json()["detail"]
        backend.gate.set()
        assert (await running).status_code == 200
        assert (await queued).status_code == 200
        assert (await http.post("/add", files=two_files())).status_code == 200

    _serve(settings, backend, scenario)


def test_a_computation_over_the_timeout_is_504_and_keeps_its_place_until_done():
    backend = GatedBackend()
    settings = Settings(
        backend="cpu", compute_threads=1, max_queued=0, compute_timeout_seconds=0.3,
        _env_file=None,
    )  # fmt: skip

    async def scenario(http: httpx.AsyncClient) -> None:
        slow = await http.post("/add", files=two_files())
        assert slow.status_code == 504
        assert "0.3 s" in slow.json()["detail"]
        # Its thread still runs: no place for another until it finishes.
        assert (await http.post("/add", files=two_files())).status_code == 503
        backend.gate.set()
        for _ in range(50):
            response = await http.post("/add", files=two_files())
            if response.status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert response.status_code == 200

    _serve(settings, backend, scenario)


def test_an_upload_slower_than_the_upload_timeout_is_408_and_frees_its_place():
    settings = Settings(
        backend="cpu", upload_timeout_seconds=0.3, compute_threads=1, max_queued=0,
        _env_file=None,
    )  # fmt: skip
    body = (
        b'--xx\r\nContent-Disposition: form-data; name="a"; filename="a"\r\n\r\n'
        + npz_bytes(np.ones(8))
        + b"\r\n--xx--\r\n"
    )

    async def trickle():
        for start in range(0, len(body), 16):
            await asyncio.sleep(0.05)
            yield body[start : start + 16]

    async def scenario(http: httpx.AsyncClient) -> None:
        slow = await http.post(
            "/add", content=trickle(), headers={"content-type": "multipart/form-data; boundary=xx"}
        )
        assert slow.status_code == 408
        assert "GMS_UPLOAD_TIMEOUT_SECONDS" in slow.json()["detail"]
        assert (await http.post("/add", files=two_files())).status_code == 200  # place freed

    _serve(settings, CpuBackend(), scenario)


def test_fifty_bad_requests_leave_no_place_taken():
    settings = Settings(backend="cpu", compute_threads=1, max_queued=0, _env_file=None)
    with TestClient(create_app(settings)) as client:
        for i in range(50):
            bad = [{"files": {"a": ("a", b"junk"), "b": ("b", b"junk")}}, {"json": {}}][i % 2]
            assert client.post("/add", **bad).status_code in (400, 415)
        assert client.post("/add", files=two_files()).status_code == 200


TINY = {"a": ("a.npz", npz_bytes(np.ones((2, 2)))), "b": ("b.npz", npz_bytes(np.ones((2, 2))))}


def test_tiny_work_on_a_busy_gpu_runs_on_a_worker_thread_not_the_event_loop():
    class BusyGatedGpu(GatedBackend):
        device_kind = "GPU"

        def run_if_idle(self, op, a, b, options):
            return None  # every device has another request's matmul in flight

    backend = BusyGatedGpu()
    settings = Settings(backend="cpu", _env_file=None)

    async def scenario(http: httpx.AsyncClient) -> None:
        compute = asyncio.create_task(http.post("/add", files=TINY))
        await asyncio.to_thread(backend.running.acquire, True, 10)
        assert (await http.get("/health/live")).status_code == 200  # the loop is free
        backend.gate.set()
        response = await compute
        assert response.status_code == 200 and response.json()["matrix_shape"] == [2, 2]

    _serve(settings, backend, scenario)


class ThreadRecordingGpu(CpuBackend):
    """A GPU backend posing as idle, recording which thread computed each request. Its first
    inline request takes ``first_inline_seconds``: spinning, as CUDA waits for a GPU, or
    asleep, as a thread the OS does not run."""

    device_kind = "GPU"

    def __init__(self, first_inline_seconds: float = 0.0, *, spinning: bool = True) -> None:
        super().__init__()
        self.first_inline_seconds = first_inline_seconds
        self.spinning = spinning
        self.threads: list[tuple[str, str]] = []

    def run(self, op, a, b, options):
        self.threads.append(("run", threading.current_thread().name))
        return super().run(op, a, b, options)

    def run_if_idle(self, op, a, b, options):
        self.threads.append(("run_if_idle", threading.current_thread().name))
        if len(self.threads) == 1 and self.spinning:
            spent = time.thread_time() + self.first_inline_seconds
            while time.thread_time() < spent:
                pass
        elif len(self.threads) == 1:
            time.sleep(self.first_inline_seconds)
        return super().run(op, a, b, options)


def test_tiny_work_on_an_idle_gpu_is_computed_on_the_event_loop_thread(monkeypatch):
    monkeypatch.setattr(compute, "INLINE_BUDGET_SECONDS", 10.0)  # a slow CI machine's hiccup
    backend = ThreadRecordingGpu()
    with TestClient(create_app(Settings(backend="cpu", _env_file=None), backend)) as client:
        loop_thread = client.portal.call(lambda: threading.current_thread().name)
        for _ in range(2):
            response = client.post("/add?result=json", files=TINY)
            assert response.status_code == 200 and response.json()["result"] == [[2, 2], [2, 2]]
    assert backend.threads == [("run_if_idle", loop_thread)] * 2


def test_tiny_work_that_held_the_loop_too_long_goes_to_worker_threads_for_a_while(monkeypatch):
    monkeypatch.setattr(compute, "INLINE_PAUSE_SECONDS", 60.0)  # outlasts a slow CI machine
    backend = ThreadRecordingGpu(first_inline_seconds=2 * compute.INLINE_BUDGET_SECONDS)
    with TestClient(create_app(Settings(backend="cpu", _env_file=None), backend)) as client:
        for _ in range(3):
            assert client.post("/add", files=TINY).status_code == 200
    (first, _), *later = backend.threads
    assert first == "run_if_idle"
    assert [kind for kind, _ in later] == ["run", "run"]
    assert all(thread.startswith("gms-compute") for _, thread in later)


def test_tiny_work_delayed_without_using_the_loop_thread_stays_on_the_loop(monkeypatch):
    # Asleep (the OS running something else) for twice the budget: a worker thread would have
    # waited as long, so the next requests are still computed on the loop.
    monkeypatch.setattr(compute, "INLINE_PAUSE_SECONDS", 60.0)
    backend = ThreadRecordingGpu(2 * compute.INLINE_BUDGET_SECONDS, spinning=False)
    with TestClient(create_app(Settings(backend="cpu", _env_file=None), backend)) as client:
        loop_thread = client.portal.call(lambda: threading.current_thread().name)
        for _ in range(3):
            assert client.post("/add", files=TINY).status_code == 200
    assert backend.threads == [("run_if_idle", loop_thread)] * 3


def test_tokens_that_are_only_commas_and_metrics_auth_without_tokens_are_refused():
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="only commas"):
        Settings(api_tokens=" , ", _env_file=None)
    with pytest.raises(pydantic.ValidationError, match="metrics_auth needs api_tokens"):
        Settings(metrics_auth=True, _env_file=None)
