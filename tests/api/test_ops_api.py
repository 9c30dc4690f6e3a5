"""POST /add and /v1/ops/{op} through the ASGI app: the lab contract, results, and every error."""

from __future__ import annotations

import asyncio
import io
import json
import threading

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from gpu_matrix_service.app import create_app
from gpu_matrix_service.array_stream import ArrayStream
from gpu_matrix_service.backends.base import RunOptions
from gpu_matrix_service.backends.cpu import CpuBackend
from gpu_matrix_service.settings import Settings

from arrayfiles import npy_bytes, npz_bytes, npz_compressed_bytes, random_array, unseekable_npz


def files(a: bytes, b: bytes, names: tuple[str, str] = ("file_a", "file_b")) -> dict:
    return {names[0]: ("a.npz", a), names[1]: ("b.npz", b)}


def test_add_answers_the_lab_contract_with_extra_fields_after(client, rng):
    a, b = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    response = client.post("/add", files=files(npz_bytes(a), npz_bytes(b)))
    assert response.status_code == 200
    body = response.json()
    assert list(body)[:3] == ["matrix_shape", "elapsed_time", "device"]
    assert body["matrix_shape"] == [4, 5]
    assert isinstance(body["elapsed_time"], float) and body["elapsed_time"] >= 0
    assert body["device"] == "CPU" and body["backend"] == "cpu" and body["dtype"] == "float64"
    assert {"decode", "total"} <= body["timings"].keys()
    assert body["elapsed_time"] == body["timings"]["total"]


@pytest.mark.parametrize(
    "names", [("file_a", "file_b"), ("matrix1", "matrix2"), ("file1", "file2"), ("a", "b")]
)
def test_any_two_file_field_names_are_accepted(client, rng, names):
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    response = client.post("/add?result=npz", files=files(npz_bytes(a), npz_bytes(b), names))
    assert response.status_code == 200
    np.testing.assert_array_equal(_npz_result(response), a + b)


def test_canonical_names_win_over_arrival_order(client, rng):
    a, b = rng.standard_normal((2, 2)), rng.standard_normal((2, 2))
    parts = {"file_b": ("b.npy", npy_bytes(b)), "file_a": ("a.npy", npy_bytes(a))}
    response = client.post("/v1/ops/subtract?result=npz", files=parts)
    np.testing.assert_array_equal(_npz_result(response), a - b)


def test_other_names_are_taken_in_order(client, rng):
    a, b = rng.standard_normal((2, 2)), rng.standard_normal((2, 2))
    parts = [("second", ("x.npy", npy_bytes(a))), ("first", ("y.npy", npy_bytes(b)))]
    response = client.post("/v1/ops/subtract?result=npz", files=parts)
    np.testing.assert_array_equal(_npz_result(response), a - b)


def test_npy_and_compressed_npz_uploads_work(client, rng):
    a, b = rng.standard_normal((3, 3)), rng.standard_normal((3, 3))
    response = client.post("/add?result=npz", files=files(npy_bytes(a), npz_compressed_bytes(m=b)))
    np.testing.assert_array_equal(_npz_result(response), a + b)


def _npz_result(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    with np.load(io.BytesIO(response.content), allow_pickle=False) as archive:
        assert archive.files == ["result"]
        return archive["result"]


@pytest.mark.parametrize("op", ["add", "subtract", "multiply"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64", "uint8", "complex64"])
def test_elementwise_ops_return_numpy_results(client, rng, op, dtype):
    a, b = random_array(rng, (6, 7), dtype), random_array(rng, (6, 7), dtype)
    response = client.post(f"/v1/ops/{op}?result=npz", files=files(npz_bytes(a), npz_bytes(b)))
    out = _npz_result(response)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, getattr(np, op)(a, b))


def test_n_dimensional_elementwise_reports_the_full_shape(client, rng):
    a, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    response = client.post("/add", files=files(npz_bytes(a), npz_bytes(b)))
    assert response.json()["matrix_shape"] == [2, 3, 4]


def test_matmul_returns_the_product(client, rng):
    a, b = rng.standard_normal((5, 3)), rng.standard_normal((3, 4))
    response = client.post("/v1/ops/matmul?result=npz", files=files(npz_bytes(a), npz_bytes(b)))
    np.testing.assert_allclose(_npz_result(response), a @ b, rtol=1e-12)


def test_mixed_dtypes_follow_numpy_promotion(client, rng):
    a = random_array(rng, (3, 3), "int32")
    b = random_array(rng, (3, 3), "float32")
    response = client.post("/v1/ops/multiply?result=npz", files=files(npy_bytes(a), npy_bytes(b)))
    out = _npz_result(response)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, a * b)


def test_accept_header_returns_npz_with_timing_headers(client, rng):
    a, b = rng.standard_normal((2, 2)), rng.standard_normal((2, 2))
    response = client.post(
        "/add", files=files(npz_bytes(a), npz_bytes(b)), headers={"Accept": "application/x-npz"}
    )
    assert response.headers["content-type"] == "application/x-npz"
    np.testing.assert_array_equal(_npz_result(response), a + b)
    assert response.headers["X-Device"] == "CPU"
    assert response.headers["X-Matrix-Shape"] == "2,2"
    assert float(response.headers["X-Elapsed-Time"]) >= 0
    assert "total" in json.loads(response.headers["X-Timings"])


def test_result_as_npy_and_json(client, rng):
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    response = client.post("/add?result=npy", files=files(npz_bytes(a), npz_bytes(b)))
    assert response.headers["content-type"] == "application/x-npy"
    np.testing.assert_array_equal(np.load(io.BytesIO(response.content)), a + b)
    response = client.post("/add?result=json", files=files(npz_bytes(a), npz_bytes(b)))
    np.testing.assert_array_equal(np.array(response.json()["result"]), a + b)


def test_json_result_over_its_limit_is_413(rng):
    settings = Settings(backend="cpu", max_json_result_elements=10, _env_file=None)
    with TestClient(create_app(settings)) as client:
        a = rng.standard_normal((4, 4))
        response = client.post("/add?result=json", files=files(npz_bytes(a), npz_bytes(a)))
    assert response.status_code == 413 and "?result=npz" in response.json()["detail"]


def test_empty_arrays_give_empty_results(client):
    a, b = np.empty((0, 3)), np.empty((0, 3))
    response = client.post("/add?result=npz", files=files(npz_bytes(a), npz_bytes(b)))
    assert _npz_result(response).shape == (0, 3)
    response = client.post(
        "/v1/ops/matmul?result=npz",
        files=files(npz_bytes(np.ones((2, 0))), npz_bytes(np.ones((0, 3)))),
    )
    np.testing.assert_array_equal(_npz_result(response), np.zeros((2, 3)))


# ---- errors: clear status and a JSON detail a person understands ----


def _error(response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    for fragment in fragments:
        assert fragment in str(detail), detail


def test_mismatched_shapes_are_400_naming_both(client, rng):
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 3))
    _error(client.post("/add", files=files(npz_bytes(a), npz_bytes(b))), 400, "[3, 4]", "[4, 3]")


def test_matmul_inner_dimension_mismatch_is_400_naming_both(client, rng):
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((5, 6))
    response = client.post("/v1/ops/matmul", files=files(npz_bytes(a), npz_bytes(b)))
    _error(response, 400, "[3, 4] @ [5, 6]")


def test_one_file_is_400_and_three_files_are_400(client, rng):
    data = npz_bytes(rng.standard_normal(3))
    _error(client.post("/add", files={"file_a": ("a.npz", data)}), 400, "exactly 2", "got 1")
    three = [(name, ("x.npz", data)) for name in ("a", "b", "c")]
    _error(client.post("/add", files=three), 400, "got 3 or more")


def test_not_multipart_is_415(client):
    _error(client.post("/add", json={"a": [1, 2]}), 415, "multipart/form-data")
    _error(client.post("/add"), 415, "multipart/form-data")


def test_malformed_multipart_is_400(client):
    headers = {"content-type": "multipart/form-data"}
    _error(client.post("/add", content=b"x", headers=headers), 400, "boundary")


def test_not_an_array_file_is_400(client):
    response = client.post("/add", files=files(b"hello", b"world"))
    _error(response, 400, "file_a", "neither a .npy nor a .npz")


def test_object_dtype_is_415_and_never_unpickled(client):
    buffer = io.BytesIO()
    np.save(buffer, np.array([object()], dtype=object), allow_pickle=True)
    response = client.post("/add", files=files(buffer.getvalue(), buffer.getvalue()))
    _error(response, 415, "objects")


def test_string_dtype_is_415(client):
    data = npy_bytes(np.array(["a", "b"]))
    _error(client.post("/add", files=files(data, data)), 415, "not supported")


def test_several_arrays_without_a_chosen_key_is_400_naming_keys(client, rng):
    data = npz_bytes(x=rng.standard_normal(2), y=rng.standard_normal(2))
    _error(client.post("/add", files=files(data, data)), 400, "['x', 'y']")


def test_unknown_op_is_422_listing_the_choices(client, rng):
    data = npz_bytes(rng.standard_normal(2))
    response = client.post("/v1/ops/divide", files=files(data, data))
    assert response.status_code == 422
    assert "add" in json.dumps(response.json()["detail"])


@pytest.mark.parametrize(
    ("query", "field"), [("result=xml", "result"), ("allow_tf32=maybe", "allow_tf32")]
)
def test_bad_query_parameter_is_422_naming_it(client, rng, query, field):
    data = npz_bytes(rng.standard_normal(2))
    response = client.post(f"/v1/ops/add?{query}", files=files(data, data))
    assert response.status_code == 422
    (issue,) = response.json()["detail"]
    assert issue["loc"] == ["query", field]


def test_an_unknown_op_and_a_bad_query_are_both_listed_as_fastapi_words_them(client, rng):
    data = npz_bytes(rng.standard_normal(2))
    response = client.post("/v1/ops/divide?result=xml", files=files(data, data))
    assert response.status_code == 422
    op, result = response.json()["detail"]
    assert op["loc"] == ["path", "op"] and result["loc"] == ["query", "result"]
    assert op["msg"] == "Input should be 'add', 'subtract', 'multiply' or 'matmul'"
    assert result["msg"] == "Input should be 'npz', 'npy' or 'json'"


class OptionsRecorder(CpuBackend):
    """The CPU backend, keeping the options each run was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[RunOptions] = []

    def run(self, op, a, b, options):
        self.seen.append(options)
        return super().run(op, a, b, options)


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("1", True), ("off", False)])
def test_allow_tf32_reaches_the_backend(value, expected):
    backend = OptionsRecorder()
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    with TestClient(create_app(Settings(backend="cpu", _env_file=None), backend)) as client:
        response = client.post(
            f"/v1/ops/matmul?allow_tf32={value}&result=json",
            files=files(npz_bytes(a), npz_bytes(a.T.copy())),
        )
    assert response.status_code == 200
    np.testing.assert_array_equal(np.array(response.json()["result"]), a @ a.T)
    assert [options.allow_tf32 for options in backend.seen] == [expected]


def test_body_over_the_limit_is_413_from_content_length_before_reading(rng):
    settings = Settings(backend="cpu", max_upload_bytes=1000, _env_file=None)
    with TestClient(create_app(settings)) as client:
        data = npz_bytes(rng.standard_normal(200))
        _error(client.post("/add", files=files(data, data)), 413, "request body of")


def test_streamed_body_over_the_limit_is_413_without_content_length(rng):
    settings = Settings(backend="cpu", max_upload_bytes=1000, _env_file=None)
    body = (
        b'--xx\r\nContent-Disposition: form-data; name="a"; filename="a"\r\n\r\n'
        + bytes(5000)
        + b"\r\n--xx--\r\n"
    )

    def chunks():
        for start in range(0, len(body), 512):
            yield body[start : start + 512]

    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/add", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xx"}
        )
    _error(response, 413, "limit of 1000")


def test_array_over_the_element_limit_is_413(rng):
    settings = Settings(backend="cpu", max_array_elements=10, _env_file=None)
    with TestClient(create_app(settings)) as client:
        data = npz_bytes(rng.standard_normal(11))
        _error(client.post("/add", files=files(data, data)), 413, "11 elements")


def test_fifty_bad_requests_leave_the_service_healthy_and_correct(client, rng):
    good = rng.standard_normal((8, 8))
    bad_requests = [
        {"files": files(b"junk", b"junk")},
        {"files": files(npz_bytes(good), npz_bytes(good[:4]))},
        {"files": {"file_a": ("a.npz", npz_bytes(good))}},
        {"json": {"x": 1}},
        {"files": files(npz_bytes(good)[:50], npz_bytes(good))},
    ]
    for i in range(50):
        response = client.post("/add", **bad_requests[i % len(bad_requests)])
        assert 400 <= response.status_code < 500, response.text
        assert "detail" in response.json()
    assert client.get("/health").json()["status"] == "ok"
    response = client.post("/add?result=npz", files=files(npz_bytes(good), npz_bytes(good)))
    np.testing.assert_array_equal(_npz_result(response), good + good)


def test_a_result_over_the_element_limit_is_413_before_computing(rng):
    settings = Settings(backend="cpu", max_array_elements=10_000, _env_file=None)
    with TestClient(create_app(settings)) as client:
        a, b = rng.standard_normal((1000, 1)), rng.standard_normal((1, 1000))
        response = client.post("/v1/ops/matmul", files=files(npz_bytes(a), npz_bytes(b)))
    _error(response, 413, "1000000 elements", "[1000, 1000]")


def test_integer_matmul_over_its_work_limit_is_413(rng):
    settings = Settings(backend="cpu", max_matmul_macs=256 * 1000, _env_file=None)
    with TestClient(create_app(settings)) as client:
        a, b = np.ones((20, 20), np.int64), np.ones((20, 20), np.int64)  # 8000 MACs > 1000
        response = client.post("/v1/ops/matmul", files=files(npz_bytes(a), npz_bytes(b)))
        _error(response, 413, "8000 multiply-adds", "int64")
        floats = client.post("/v1/ops/matmul", files=files(npz_bytes(a * 1.0), npz_bytes(b * 1.0)))
        assert floats.status_code == 200


def test_long_double_result_comes_back_as_json_numbers(client):
    a = np.arange(4, dtype=np.longdouble).reshape(2, 2)
    response = client.post("/add?result=json", files=files(npy_bytes(a), npy_bytes(a)))
    assert response.status_code == 200
    assert response.json()["result"] == [[0.0, 2.0], [4.0, 6.0]]


def test_heavy_finishing_runs_off_the_event_loop_and_answers_right(monkeypatch, rng):
    # A data-descriptor .npz is decoded whole at the end, a big-endian array byte-swapped:
    # over a megabyte, both happen on a worker thread, not on the loop.
    finished = []
    original = ArrayStream.finish

    def finish(self):
        finished.append((self.heavy_finish, threading.get_ident()))
        return original(self)

    monkeypatch.setattr(ArrayStream, "finish", finish)
    a, b = rng.standard_normal((400, 400)), rng.standard_normal((400, 400))
    uploads = {"a": ("a.npz", unseekable_npz(m=a)), "b": ("b.npy", npy_bytes(b.astype(">f8")))}
    app = create_app(Settings(backend="cpu", _env_file=None))

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://test") as http,
        ):
            return await http.post("/v1/ops/add?result=npy", files=uploads)

    response = asyncio.run(main())  # the loop runs on this thread
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(np.load(io.BytesIO(response.content)), a + b)
    assert [heavy for heavy, _ in finished] == [True, True]
    assert threading.get_ident() not in {thread for _, thread in finished}


@pytest.mark.parametrize(
    ("status", "headers"), [(200, None), (200, {"X-Extra": "1"}), (201, None)], ids=str
)
def test_the_json_summarys_response_has_starlettes_headers(status, headers):
    from starlette.responses import Response

    from gpu_matrix_service.routes.ops import JSONBytesResponse

    body = b'{"matrix_shape":[2,3],"device":"CPU"}'
    ours = JSONBytesResponse(body, status, headers)
    starlettes = Response(body, status, headers, media_type="application/json")
    assert ours.raw_headers == starlettes.raw_headers
    assert ours.body == body and ours.status_code == status
