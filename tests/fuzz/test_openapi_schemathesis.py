"""Schemathesis against the service's own OpenAPI schema, through the ASGI app (no network).

Every operation gets schema-driven requests, valid and invalid; none may answer 5xx, and every
answer must match what ``/openapi.json`` documents (status code, content type, body, headers).
Schemathesis cannot know that ``file_a`` must be an array file, so its uploads are mostly
refused with a 4xx; a second test swaps in real arrays to reach the 200 answers and checks
their values against NumPy.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gpu_matrix_service.app import create_app
from gpu_matrix_service.ops import OPS
from gpu_matrix_service.settings import Settings

from arrayfiles import npy_bytes, npz_bytes

# What every answer must satisfy, whoever built the request.
RESPONSE_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
# Bounded: at most this many generated cases per operation and phase, no example database.
SCHEMATHESIS = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def load_schema(
    settings_: Settings, *, modes: list[GenerationMode] | None = None
) -> schemathesis.BaseSchema:
    """The app's own schema; its lifespan starts on the first call and lasts the session."""
    config = schemathesis.Config()  # explicit, so no schemathesis.toml changes what runs
    if modes is not None:
        config.projects.override.generation.update(modes=modes)
        config.projects.override.phases.update(phases=["fuzzing"])
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(settings_), config=config)


def cpu_settings(**overrides: object) -> Settings:
    return Settings(backend="cpu", _env_file=None, **overrides)


schema = load_schema(cpu_settings())
positive_schema = load_schema(cpu_settings(), modes=[GenerationMode.POSITIVE])
guarded_schema = load_schema(
    cpu_settings(api_tokens="correct-horse"), modes=[GenerationMode.POSITIVE]
)


def has_upload_body(case: schemathesis.Case) -> bool:
    return case.operation.method.upper() == "POST"


@schema.parametrize()
@SCHEMATHESIS
def test_every_operation_answers_as_documented_and_never_5xx(case):
    response = case.call()
    checks = [*RESPONSE_CHECKS, negative_data_rejection]
    if not has_upload_body(case):
        # A random upload is schema-valid yet no array file, so only bodiless operations can
        # promise to accept every schema-valid request.
        checks.append(positive_data_acceptance)
    case.validate_response(response, checks=checks)
    if 400 <= response.status_code < 500:
        assert response.headers["content-type"][0] == "application/json"
        assert response.json()["detail"], response.text


ARRAY_DTYPES = ["float64", "float32", "float16", "int64", "int32", "uint8", "int8", "bool",
                "complex128", "complex64"]  # fmt: skip
# Each documented form of the answer; None: the JSON summary without the values.
RESULT_FORMATS = [None, "json", "npz", "npy"]


@st.composite
def operands(draw: st.DrawFn, op: str) -> tuple[np.ndarray, np.ndarray]:
    """Two arrays ``op`` accepts: equal shapes, or (m, k) and (k, n) for matmul."""
    if op == "matmul":
        m, k, n = (draw(st.integers(0, 6)) for _ in range(3))
        shapes = (m, k), (k, n)
    else:
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6))
        shapes = shape, shape
    return tuple(draw(hnp.arrays(draw(st.sampled_from(ARRAY_DTYPES)), s)) for s in shapes)


def op_of(case: schemathesis.Case) -> str:
    return (case.path_parameters or {}).get("op", "add")


def fits_json(array: np.ndarray) -> bool:
    """JSON numbers are real and finite; complex, NaN or infinite values have no JSON form."""
    return array.dtype.kind != "c" and bool(np.isfinite(array).all())


def assert_same_values(out: np.ndarray, expected: np.ndarray) -> None:
    """Equal, up to summation order for floating-point matmul (NaN equals NaN)."""
    if expected.dtype.kind in "fc":
        tolerance = 1e-2 if expected.dtype.itemsize <= 4 else 1e-9  # half and single precision
        np.testing.assert_allclose(out, expected, rtol=tolerance, atol=tolerance)
    else:
        np.testing.assert_array_equal(out, expected)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the server's NumPy
@positive_schema.include(method="POST").parametrize()
@positive_schema.given(data=st.data())
@SCHEMATHESIS
def test_uploads_of_real_arrays_get_documented_answers_with_numpy_values(case, data):
    op = op_of(case)
    a, b = data.draw(operands(op), label="operands")
    write = data.draw(st.sampled_from([npy_bytes, npz_bytes]), label="file format")
    case.body = {"file_a": write(a), "file_b": write(b)}  # no longer schemathesis' own data
    # Schemathesis mostly leaves the optional ?result= out; ask for every form equally.
    result = data.draw(st.sampled_from(RESULT_FORMATS), label="result format")
    case.query = {k: v for k, v in (case.query or {}).items() if k != "result"}
    if result is not None:
        case.query["result"] = result
    response = case.call()
    case.validate_response(response, checks=RESPONSE_CHECKS)
    if op == "subtract" and a.dtype == b.dtype == np.bool_:
        assert response.status_code == 415, response.text  # NumPy has no boolean subtraction
        return
    with np.errstate(all="ignore"):
        expected = OPS[op].reference(a, b)
    if result == "json" and not fits_json(expected):
        # Saying so with a 4xx is as good as some JSON encoding of these values.
        if response.status_code != 200:
            assert 400 <= response.status_code < 500 and response.json()["detail"]
        return
    assert response.status_code == 200, response.text
    if response.headers["content-type"][0] == "application/json":
        body = response.json()
        assert body["matrix_shape"] == list(expected.shape) and body["op"] == op
        assert body["dtype"] == str(expected.dtype)
        if "result" in body:
            values = np.asarray(body["result"], expected.dtype).reshape(expected.shape)
            assert_same_values(values, expected)
        return
    out = np.load(io.BytesIO(response.content), allow_pickle=False)
    out = out["result"] if isinstance(out, np.lib.npyio.NpzFile) else out
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert_same_values(out, expected)


@guarded_schema.include(method="POST").parametrize()
@settings(SCHEMATHESIS, max_examples=5)
def test_guarded_operations_document_their_401(case):
    response = case.call()
    assert response.status_code == 401
    case.validate_response(response, checks=[status_code_conformance])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize(
    "values",
    [[1 + 2j, 3j], [np.nan, 1.0], [np.inf, 1.0], [1e308, 1.0]],
    ids=["complex", "nan", "inf", "overflow-to-inf"],
)
def test_json_result_without_a_json_form_is_not_a_500(client, values):
    # Found by the test above: ?result=json answers 500, as Starlette's JSONResponse refuses
    # complex numbers (TypeError) and NaN/inf (ValueError, allow_nan=False). 1e308 + 1e308
    # overflows to inf, so perfectly finite operands hit it too.
    a = np.array(values)
    files = {"file_a": ("a.npy", npy_bytes(a)), "file_b": ("b.npy", npy_bytes(a))}
    response = client.post("/add?result=json", files=files)
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert response.json()["detail"]
