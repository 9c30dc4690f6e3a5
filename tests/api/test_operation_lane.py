"""The operation lane answers POST /add and /v1/ops/{op} exactly as FastAPI's router would."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.testclient import TestClient
from starlette.exceptions import HTTPException

from gpu_matrix_service.app import create_app
from gpu_matrix_service.routes.lane import OperationLane
from gpu_matrix_service.settings import Settings

from arrayfiles import npy_bytes, npz_bytes
from fake_backends import FailingBackend

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


class TeapotError(Exception):
    pass


class FineTeapotError(TeapotError):
    """Handled by its base class's handler, the nearest in its MRO."""


def with_odd_handlers(app: FastAPI) -> FastAPI:
    """A plain (sync) handler for a base class, and one for status 500, which is Starlette's
    server-error middleware's own and must not catch an HTTPException(500)."""

    def teapot(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"teapot on {threading.current_thread().name!r}"}, 418)

    app.add_exception_handler(TeapotError, teapot)
    app.add_exception_handler(500, lambda request, exc: PlainTextResponse("500 handler", 500))
    return app


def test_odd_exception_handlers_are_looked_up_and_run_as_the_router_does(rng):
    errors = lambda: [FineTeapotError(), HTTPException(500, "explicit"), HTTPException(409, "busy")]  # noqa: E731
    settings = Settings(backend="cpu", _env_file=None)
    request = {"method": "POST", "url": "/add", "files": upload(np.ones(2), np.ones(2))}
    with (
        TestClient(with_odd_handlers(create_app(settings, FailingBackend(errors())))) as lane,
        TestClient(
            with_odd_handlers(without_lane(create_app(settings, FailingBackend(errors()))))
        ) as router,
    ):
        answers = [(answer(lane, request), answer(router, request)) for _ in range(3)]
    for through_lane, through_router in answers:
        assert through_lane == through_router
    teapot, explicit, busy = (through_lane for through_lane, _ in answers)
    assert teapot[0] == 418 and b"AnyIO worker thread" in teapot[2], teapot
    assert explicit[:1] == (500,) and explicit[2] == b'{"detail":"explicit"}'
    assert busy[0] == 409


def test_with_opentelemetry_spans_still_name_their_route(rng):
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = Settings(backend="cpu", opentelemetry=True, _env_file=None)
    real = trace.get_tracer_provider
    trace.get_tracer_provider = lambda: provider
    try:
        with TestClient(create_app(settings)) as client:
            exporter.clear()
            assert (
                client.post("/v1/ops/add", files=upload(np.ones(2), np.ones(2))).status_code == 200
            )
    finally:
        trace.get_tracer_provider = real
    servers = [s for s in exporter.get_finished_spans() if s.kind == trace.SpanKind.SERVER]
    assert [s.attributes.get("http.route") for s in servers] == ["/v1/ops/{op}"]


@pytest.mark.parametrize(
    "scope",
    [
        {"type": "http", "method": "POST", "path": "/add", "root_path": ""},
        {"type": "http", "method": "GET", "path": "/add"},
        {"type": "http", "method": "POST", "path": "/add/", "root_path": ""},
        {"type": "http", "method": "POST", "path": "/v1/ops/matmul", "root_path": ""},
        {"type": "http", "method": "POST", "path": "/api/add", "root_path": "/api"},
        {"type": "http", "method": "POST", "path": "/add", "root_path": "/api"},
        {"type": "http", "method": "POST", "path": "/add", "root_path": "/add"},
        {"type": "http", "method": "POST", "path": "/add", "path_params": {"outer": "x"}},
        {"type": "websocket", "path": "/add", "root_path": ""},
    ],
    ids=[
        "post",
        "get",
        "slash",
        "op",
        "under root",
        "outside root",
        "is root",
        "outer params",
        "ws",
    ],
)
def test_the_lanes_quick_match_of_a_literal_path_is_starlettes_match(scope):
    from starlette.routing import Match, Route

    from gpu_matrix_service.routes.ops import dispatch_routes

    for route in dispatch_routes():
        match, child_scope = route.matches(scope)
        expected, expected_scope = Route.matches(route, scope)
        assert match is expected
        if expected is not Match.NONE:
            assert child_scope == {**expected_scope, "route": route}
