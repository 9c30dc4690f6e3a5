"""Health, GPU info, metrics, OpenAPI, and behaviour around backend failures."""

from __future__ import annotations

import asyncio
import re
import threading

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from gpu_matrix_service import __version__
from gpu_matrix_service.app import create_app
from gpu_matrix_service.backends.cpu import CpuBackend
from gpu_matrix_service.errors import BackendFailure, DeviceOutOfMemory
from gpu_matrix_service.settings import Settings

from arrayfiles import npz_bytes
from fake_backends import FailingBackend


def two_files(rng, shape=(4, 4)) -> dict:
    return {
        "file_a": ("a.npz", npz_bytes(rng.standard_normal(shape))),
        "file_b": ("b.npz", npz_bytes(rng.standard_normal(shape))),
    }


def test_health_says_ok_with_backend_and_version(client):
    body = client.get("/health").json()
    assert body == {
        "status": "ok",
        "backend": "cpu",
        "device": "CPU",
        "gpu_count": 0,
        "devices": ["cpu"],
        "version": __version__,
    }


def test_liveness_and_readiness(client):
    assert client.get("/health/live").json() == {"status": "ok"}
    assert client.get("/health/ready").json() == {"status": "ready", "backend": "cpu"}


def test_gpu_info_without_gpu_is_200_with_empty_list_and_reason(client):
    response = client.get("/gpu-info")
    assert response.status_code == 200
    body = response.json()
    assert body["gpus"] == [] and body["count"] == 0 and body["reason"]
    assert body["devices_in_use"] == [{"index": -1, "name": "cpu", "kind": "CPU"}]


def test_metrics_count_requests_by_route_template_and_status(client, rng):
    client.post("/v1/ops/add", files=two_files(rng))
    client.post("/v1/ops/multiply", files=two_files(rng))
    client.post("/v1/ops/add", files={"file_a": ("a", b"junk")})
    client.get("/no/such/path")
    text = client.get("/metrics").text
    assert 'request_count_total{endpoint="/v1/ops/{op}",method="POST",status="200"} 2.0' in text
    assert 'request_count_total{endpoint="/v1/ops/{op}",method="POST",status="400"} 1.0' in text
    assert 'request_count_total{endpoint="<unmatched>",method="GET",status="404"} 1.0' in text
    assert "/v1/ops/add" not in text  # raw paths never become labels
    assert re.search(
        r'request_latency_seconds_bucket\{endpoint="/v1/ops/\{op\}",le="0.001",method="POST"\}',
        text,
    )
    assert 'request_errors_total{endpoint="/v1/ops/{op}",reason="BadRequest"} 1.0' in text
    assert (
        'compute_seconds_count{backend="cpu",device="CPU",op="multiply",phase="total"} 1.0' in text
    )
    assert 'matrix_elements_processed_total{backend="cpu",op="add"} 16.0' in text
    assert re.search(r'service_info\{backend="cpu",instance="[^"]+",version="[^"]+"\} 1.0', text)


def test_openapi_describes_every_endpoint_and_the_upload_fields(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in ("/add", "/v1/ops/{op}", "/health", "/health/live", "/health/ready",
                 "/gpu-info", "/metrics"):  # fmt: skip
        assert path in paths, path
    body = paths["/add"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["file_a", "file_b"]
    assert body["properties"]["file_a"]["format"] == "binary"
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize(
    ("error", "status"),
    [(DeviceOutOfMemory("out of memory on cuda:0"), 507),
     (BackendFailure("CUDA error: an illegal memory access"), 503)],
)  # fmt: skip
def test_a_device_error_fails_that_request_only(rng, error, status):
    settings = Settings(backend="cpu", _env_file=None)
    with TestClient(create_app(settings, backend=FailingBackend([error]))) as client:
        response = client.post("/add", files=two_files(rng))
        assert response.status_code == status
        assert response.json() == {"detail": error.detail}
        after = client.post("/add", files=two_files(rng))
        assert after.status_code == 200 and after.json()["device"] == "GPU"


def test_out_of_memory_falls_back_to_the_cpu_when_configured(rng):
    settings = Settings(backend="cpu", fallback="cpu", _env_file=None)
    backend = FailingBackend([DeviceOutOfMemory("out of memory")])
    with TestClient(create_app(settings, backend=backend)) as client:
        body = client.post("/add", files=two_files(rng)).json()
    assert body["device"] == "CPU" and body["backend"] == "cpu"


def test_unexpected_bug_is_a_json_500_and_the_service_keeps_serving(rng):
    settings = Settings(backend="cpu", _env_file=None)
    backend = FailingBackend([ZeroDivisionError("bug")])
    with TestClient(create_app(settings, backend=backend), raise_server_exceptions=False) as c:
        response = c.post("/add", files=two_files(rng))
        assert response.status_code == 500 and "internal error" in response.json()["detail"]
        assert c.post("/add", files=two_files(rng)).status_code == 200


class SlowBackend(CpuBackend):
    """Blocks inside run() until released, like a long matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()
        self.release = threading.Event()

    def run(self, op, a, b, options):
        self.started.set()
        assert self.release.wait(10)
        return super().run(op, a, b, options)


def test_health_and_metrics_answer_while_a_computation_runs(rng):
    backend = SlowBackend()
    app = create_app(Settings(backend="cpu", _env_file=None), backend=backend)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://test") as http,
        ):
            # Large enough for a worker thread (small work is computed inline).
            big = two_files(rng, shape=(512, 512))
            compute = asyncio.create_task(http.post("/add", files=big))
            await asyncio.to_thread(backend.started.wait, 10)
            assert (await http.get("/health")).json()["status"] == "ok"
            assert (await http.get("/metrics")).status_code == 200
            assert not compute.done()
            backend.release.set()
            assert (await compute).status_code == 200

    asyncio.run(scenario())


def test_an_unsupported_dtype_runs_on_the_cpu_backend(rng):
    class Float32Only(FailingBackend):
        def supports(self, op, dtype):
            return dtype == np.float32

    with TestClient(create_app(Settings(backend="cpu", _env_file=None),
                               backend=Float32Only([]))) as client:  # fmt: skip
        body = client.post("/add", files=two_files(rng)).json()  # float64
    assert body["device"] == "CPU" and body["backend"] == "cpu"


def test_readiness_is_503_naming_a_blocking_gpu_problem(client, monkeypatch):
    from gpu_matrix_service.doctor import Check
    from gpu_matrix_service.routes import health

    broken = Check("uncorrectable ECC errors", "devices", "fail", "GPU 0: 3", "replace it", True)
    fine = Check("driver", "driver", "pass", "580.159.04")
    monkeypatch.setattr(health, "quick_checks", lambda settings: [fine, broken])
    response = client.get("/health/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unready"
    assert [c["name"] for c in body["failing"]] == ["uncorrectable ECC errors"]
    assert client.get("/health/live").status_code == 200


@pytest.mark.parametrize("enabled", [False, True])
def test_fastapi_opentelemetry_looks_for_providers_only_when_enabled(rng, monkeypatch, enabled):
    from opentelemetry import trace

    looked = []
    real = trace.get_tracer_provider
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: looked.append(1) or real())
    settings = Settings(backend="cpu", opentelemetry=enabled, _env_file=None)
    with TestClient(create_app(settings)) as client:
        looked.clear()  # start-up may look too
        assert client.post("/add", files=two_files(rng)).status_code == 200
        assert client.get("/health").json()["status"] == "ok"
    assert bool(looked) is enabled
