"""The operation lane answers POST /add and /v1/ops/{op} exactly as FastAPI's router would."""

from __future__ import annotations

import re

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gpu_matrix_service.app import create_app
from gpu_matrix_service.routes.lane import OperationLane
from gpu_matrix_service.settings import Settings

from arrayfiles import npy_bytes, npz_bytes

TOKEN = "lane-test-token"


def without_lane(app: FastAPI) -> FastAPI:
    """``app`` with its middleware stack (built at the first request) lacking the lane."""
    kept = [m for m in app.user_middleware if m.cls is not OperationLane]
    assert len(kept) == len(app.user_middleware) - 1
    app.user_middleware = kept
    return app


def upload(a: np.ndarray, b: np.ndarray) -> dict:
    return {"file_a": ("a.npz", npz_bytes(a)), "file_b": ("b.npy", npy_bytes(b))}


def requests(rng: np.random.Generator) -> dict[str, dict]:
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    good = upload(a, b)
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def post(url: str, files: dict | None = None, headers: dict = auth, **more) -> dict:
        return {"method": "POST", "url": url, "files": files or good, "headers": headers, **more}

    return {
        "add": post("/add"),
        "op as npz": post("/v1/ops/multiply?result=npz"),
        "as json": post("/v1/ops/subtract?result=json"),
        "no token": post("/add", headers={}),
        "wrong token": post("/add", headers={"Authorization": "Bearer nope"}),
        "unknown op": post("/v1/ops/divide"),
        "bad query": post("/add?result=xml"),
        "shapes differ": post("/add", upload(a, rng.standard_normal((4, 3)))),
        "not multipart": {"method": "POST", "url": "/add", "content": b"{}", "headers": auth},
        "one file": post("/add", {"file_a": ("a.npz", npz_bytes(a))}),
        "not an array": post("/add", {"file_a": ("a", b"junk"), "file_b": ("b", b"junk")}),
        "GET /add": {"method": "GET", "url": "/add", "headers": auth},
        "no op": post("/v1/ops/"),
        "trailing slash": post("/add/"),
    }


EXPECTED_STATUSES = {
    "add": 200, "op as npz": 200, "as json": 200, "no token": 401, "wrong token": 401,
    "unknown op": 422, "bad query": 422, "shapes differ": 400, "not multipart": 415,
    "one file": 400, "not an array": 400, "GET /add": 405, "no op": 404, "trailing slash": 307,
}  # fmt: skip
# Values that differ between any two answers: compute times and their headers.
VARYING = re.compile(rb'"(elapsed_time|decode|compute|h2d|kernel|d2h|total)":[0-9.e+-]+')
VARYING_HEADERS = {"x-elapsed-time", "x-timings", "content-length", "date"}


def answer(client: TestClient, request: dict) -> tuple[int, dict[str, str], bytes]:
    response = client.request(**request, follow_redirects=False)
    headers = {k: v for k, v in response.headers.items() if k not in VARYING_HEADERS}
    return response.status_code, headers, VARYING.sub(rb'"\1":0', response.content)


@pytest.mark.parametrize("cors", [False, True], ids=["plain", "cors"])
def test_every_answer_is_the_routers_answer(rng, cors):
    settings = Settings(
        backend="cpu", api_tokens=[TOKEN], cors_origins=["https://ui.example"] if cors else [],
        _env_file=None,
    )  # fmt: skip
    cases = requests(rng)
    origin = {"Origin": "https://ui.example"} if cors else {}
    with (
        TestClient(create_app(settings), headers=origin) as lane,
        TestClient(without_lane(create_app(settings)), headers=origin) as router,
    ):
        statuses = {}
        for label, request in cases.items():
            statuses[label] = answer(lane, request)[0]
            assert answer(lane, request) == answer(router, request), label
        assert statuses == EXPECTED_STATUSES
        if cors:
            assert lane.request(**cases["add"]).headers["access-control-allow-origin"]


def test_requests_through_the_lane_are_counted_by_route_and_status(rng):
    settings = Settings(backend="cpu", _env_file=None)
    with TestClient(create_app(settings)) as client:
        for url in ("/add", "/v1/ops/add", "/v1/ops/matmul"):
            client.post(url, files=upload(np.ones((2, 2)), np.ones((2, 2))))
        client.post("/v1/ops/add", files=upload(np.ones(2), np.ones(3)))
        metrics = client.get("/metrics").text
    counted = re.findall(r"^request_count_total\{(.*)\} ([0-9.]+)$", metrics, re.MULTILINE)
    ops = {labels: float(value) for labels, value in counted if "POST" in labels}
    assert ops == {
        'endpoint="/add",method="POST",status="200"': 1.0,
        'endpoint="/v1/ops/{op}",method="POST",status="200"': 2.0,
        'endpoint="/v1/ops/{op}",method="POST",status="400"': 1.0,
    }
