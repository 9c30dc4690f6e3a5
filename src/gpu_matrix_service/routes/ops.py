"""``POST /add`` (the lab contract) and ``POST /v1/ops/{op}``: two arrays in, a result out."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any, TypeVar

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.routing import Match, Route
from starlette.types import Scope

from gpu_matrix_service.arrays import encode_npy, encode_npz
from gpu_matrix_service.auth import bearer, require_token
from gpu_matrix_service.backends.base import Result, RunOptions
from gpu_matrix_service.errors import NotAcceptable, PayloadTooLarge, RequestTimeout
from gpu_matrix_service.ops import OPS, Op, get_op
from gpu_matrix_service.routes.state import operation_state, route_template
from gpu_matrix_service.uploads import read_multipart

# Describes the two endpoints in OpenAPI. Requests reach them through dispatch_routes(), plain
# Starlette routes the app's OperationLane (routes/lane.py) answers ahead of the router:
# FastAPI's per-request handling of an APIRoute (dependency solving, two exit stacks, its
# exception wrapper, the included router's matching) cost about 170 us of a 64x64 request in
# process on the 2-core CPU machine (740 to 568 us, docs/benchmarks.md), on a path whose
# handlers read the request themselves anyway. Without the lane this router's routes would
# answer them alike, only slower.
router = APIRouter(tags=["operations"])

NPZ_MEDIA_TYPE = "application/x-npz"
NPY_MEDIA_TYPE = "application/x-npy"
# Encoding more than this many bytes of result happens on a worker thread, not the loop.
LOOP_BYTES = 1 << 20
T = TypeVar("T")
# With ?result=npz|npy the summary travels in these headers.
RESULT_HEADERS = (
    "X-Elapsed-Time", "X-Device", "X-Backend", "X-Op", "X-Matrix-Shape", "X-Dtype", "X-Timings",
)  # fmt: skip


class ResultFormat(StrEnum):
    """How the result itself comes back, besides the timing summary."""

    npz = "npz"
    npy = "npy"
    json = "json"


class OpResponse(BaseModel):
    """The lab's three fields first, then what helps: backend, dtype and per-phase timings."""

    matrix_shape: list[int] = Field(description="Shape of the result, e.g. [rows, cols].")
    elapsed_time: float = Field(
        description="Compute time in seconds (transfers and kernel on a GPU), not the upload."
    )
    device: str = Field(description='"GPU" or "CPU": where the operation ran.')
    op: str
    backend: str = Field(description="Backend that computed it: cuda, numba or cpu.")
    device_name: str
    dtype: str = Field(description="Result dtype (NumPy's promotion of the operands).")
    timings: dict[str, float] = Field(description="Seconds per phase: decode, h2d, kernel, d2h...")
    result: list[Any] | None = Field(None, description="The result, with ?result=json only.")


UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file_a": {
                            "type": "string",
                            "format": "binary",
                            "description": "First operand, .npz or .npy.",
                        },
                        "file_b": {
                            "type": "string",
                            "format": "binary",
                            "description": "Second operand, .npz or .npy.",
                        },
                    },
                    "required": ["file_a", "file_b"],
                    "description": "Two file parts. Other field names (matrix1/matrix2, "
                    "a/b...) are accepted too and taken in order.",
                }
            }
        },
    }
}


class ErrorBody(BaseModel):
    """Every error answer: what went wrong, for a person."""

    detail: str


class ValidationIssue(BaseModel):
    """One problem with a parameter, as FastAPI reports it."""

    model_config = ConfigDict(extra="allow")
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    """422: each parameter that failed validation."""

    detail: list[ValidationIssue]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": OpResponse,
        "description": "The result's shape and timing (JSON), or the result itself as .npz/.npy "
        "with ?result=npz|npy or an Accept header; timings then come as X- headers.",
        "content": {NPZ_MEDIA_TYPE: {}, NPY_MEDIA_TYPE: {}},
    },
    400: _error("Bad input: mismatched shapes, not an array file, wrong file count."),
    401: _error("A bearer token is required (GMS_API_TOKENS) and was missing or wrong."),
    406: _error("?result=json for a result JSON cannot hold (complex, NaN, infinity)."),
    422: {"model": ValidationErrorBody, "description": "An unknown op or a bad query parameter."},
    413: _error("Body, array or dimensions over a limit."),
    415: _error("Not multipart/form-data, or a non-numeric dtype."),
    503: _error("Too many requests queued (Retry-After), or a GPU error in this request."),
    408: _error("The upload outlasted GMS_UPLOAD_TIMEOUT_SECONDS."),
    504: _error("The computation outlasted GMS_COMPUTE_TIMEOUT_SECONDS."),
    507: _error("The GPU ran out of memory."),
}


class OpParams(BaseModel):
    """The query parameters of both routes, validated by :func:`op_params`."""

    result: ResultFormat | None = None
    allow_tf32: bool = False


NO_PARAMS = OpParams()
# The parameters are read by op_params rather than declared in the handlers'
# signatures: FastAPI's per-parameter solving cost about 30 us per request, a tenth of a small
# request's server time. The same validation (pydantic, 422 with FastAPI's error list) and the
# same OpenAPI description remain.
OP_PATH_PARAMETER = {
    "name": "op",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "enum": list(OPS), "title": "Op"},
    "description": "add, subtract, multiply (elementwise, equal shapes) or matmul (2-D).",
}
QUERY_PARAMETERS = [
    {
        "name": "result",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": [f.value for f in ResultFormat], "title": "Result"},
        "description": "Return the result itself: npz, npy or json.",
    },
    {
        "name": "allow_tf32",
        "in": "query",
        "required": False,
        "schema": {"type": "boolean", "default": False, "title": "Allow Tf32"},
        "description": "matmul: allow TF32 tensor cores (faster, ~1e-3 error).",
    },
]


def op_params(request: Request, op_name: str | None = None) -> tuple[Op, OpParams]:
    """The operation (``op_name``, else the path's) and the query parameters, or one 422
    listing every problem with them, worded as FastAPI's own validation would."""
    name = op_name or request.path_params["op"]
    errors: list[dict[str, Any]] = []
    if name not in OPS:
        *first, last = (repr(choice) for choice in OPS)
        choices = f"{', '.join(first)} or {last}"
        errors.append({"type": "enum", "loc": ("path", "op"), "msg": f"Input should be {choices}",
                       "input": name, "ctx": {"expected": choices}})  # fmt: skip
    params = NO_PARAMS
    if request.scope.get("query_string"):
        try:
            params = OpParams.model_validate(dict(request.query_params))
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                errors.append({**error, "loc": ("query", *error["loc"])})
    if errors:
        raise RequestValidationError(errors)
    return get_op(name), params


@router.post("/add", summary="Add two matrices (the lab contract)", responses=RESPONSES,
             openapi_extra={**UPLOAD_BODY, "parameters": QUERY_PARAMETERS},
             response_model=None)  # fmt: skip
async def add(request: Request) -> Response:
    """Elementwise ``a + b`` of two uploaded arrays of the same shape; same as ``/v1/ops/add``."""
    op, params = op_params(request, "add")
    return await run_op(request, op, params.result, params.allow_tf32)


@router.post("/v1/ops/{op}", summary="Apply an operation to two matrices", responses=RESPONSES,
             openapi_extra={**UPLOAD_BODY, "parameters": [OP_PATH_PARAMETER, *QUERY_PARAMETERS]},
             response_model=None)  # fmt: skip
async def apply_op(request: Request) -> Response:
    """``add``, ``subtract``, ``multiply`` (elementwise, equal shapes) or ``matmul`` (2-D)."""
    op, params = op_params(request)
    return await run_op(request, op, params.result, params.allow_tf32)


class DispatchRoute(Route):
    """A plain Starlette route that, like FastAPI's, records itself as ``scope["route"]``
    (metrics label requests by its path template)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        """Starlette's match, with the route in the child scope. A path without parameters
        (``/add``) is compared as a string first: the same answer as Starlette's regular
        expression, root path and parameter copies (0.7 against 0.3 us) where no root path
        or outer parameters make those matter."""
        if (
            not self.param_convertors
            and scope["type"] == "http"
            and scope["path"] == self.path
            and not scope.get("root_path")
            and not scope.get("path_params")
            and (self.methods is None or scope["method"] in self.methods)
        ):
            return Match.FULL, {"endpoint": self.endpoint, "path_params": {}, "route": self}
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


def dispatch_routes() -> list[Route]:
    """The routes :class:`~gpu_matrix_service.routes.lane.OperationLane` serves ``/add`` and
    ``/v1/ops/{op}`` by (``router`` describes them)."""
    return [
        DispatchRoute("/add", add, methods=["POST"]),
        DispatchRoute("/v1/ops/{op}", apply_op, methods=["POST"]),
    ]


async def run_op(
    request: Request, op: Op, result_format: ResultFormat | None, allow_tf32: bool
) -> Response:
    """Read the upload, compute, and answer in the format the client asked for."""
    settings, service, metrics = operation_state(request)
    if settings.api_tokens:  # what the described routes' guard dependency declares
        await require_token(request, await bearer(request))
    headers = _headers(request.scope)
    with service.admit() as ticket:  # 503 before the body is read when the queue is full
        try:
            with service.upload_deadlines.watch():
                upload = await read_multipart(
                    request.stream(),
                    content_type=headers.get(b"content-type"),
                    content_length=headers.get(b"content-length"),
                    max_bytes=settings.max_upload_bytes,
                    open_file=service.open_stream,  # each file decodes as it arrives
                    read_whole=service.read_whole_body,  # or all at once, when small
                )
        except TimeoutError:
            raise RequestTimeout(
                f"the upload took longer than {settings.upload_timeout_seconds:g} s "
                "(GMS_UPLOAD_TIMEOUT_SECONDS)"
            ) from None
        endpoint = route_template(request.scope)
        metrics.series(metrics.upload_bytes, endpoint).record(upload.body_bytes)
        a, b = await upload.operands()
        assert a.array is not None
        assert b.array is not None
        outcome = await service.compute(op, a.array, b.array, RunOptions(allow_tf32), ticket)
    timings = {"decode": upload.decode_seconds, **outcome.timings}
    metrics.record_computation(
        op.name, outcome.backend, outcome.device, timings, outcome.array.size
    )
    fmt = result_format or _format_from_accept(headers.get(b"accept", ""))
    if fmt in (ResultFormat.npz, ResultFormat.npy):
        return await _array_response(outcome, op, timings, fmt)
    body = _summary(outcome, op, timings)
    if fmt is ResultFormat.json:
        if outcome.array.size > settings.max_json_result_elements:
            raise PayloadTooLarge(
                f"result has {outcome.array.size} elements, more than "
                f"{settings.max_json_result_elements} for ?result=json; use ?result=npz"
            )
        body["result"] = await _off_loop_if_large(json_result, outcome.array)
    # orjson: a tenth of the json module's time; JSON's own types only (no NaN reaches it).
    return JSONBytesResponse(orjson.dumps(body))


class JSONBytesResponse(Response):
    """A 200 whose body is JSON already encoded: its two headers set directly, in half the
    time of Starlette's general header building (1.0 against 0.5 us, once per request)."""

    media_type = "application/json"

    def init_headers(self, headers: Mapping[str, str] | None = None) -> None:
        """Content-Length and Content-Type, as Starlette would set them for a 200 with no
        other headers; anything else is Starlette's to set."""
        if headers is not None or self.status_code != 200:
            super().init_headers(headers)
            return
        self.raw_headers = [
            (b"content-length", str(len(self.body)).encode("latin-1")),
            (b"content-type", b"application/json"),
        ]


def json_result(array: np.ndarray) -> list[Any]:
    """The result as nested lists, or 406 when JSON cannot hold it (complex, NaN, inf)."""
    if array.dtype.kind == "c":
        raise NotAcceptable("a complex result cannot be returned as JSON; use ?result=npz")
    if array.dtype.kind == "f" and array.dtype.itemsize > 8:
        array = array.astype(np.float64)  # long double: JSON numbers are doubles anyway
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise NotAcceptable("the result holds NaN or infinity, which JSON cannot represent; "
                            "use ?result=npz")  # fmt: skip
    values: list[Any] = array.tolist()
    return values


@functools.lru_cache(maxsize=64)
def dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, remembered: numpy works it out in Python (4 us; ``str(dtype)`` 9 us)."""
    return dtype.name


def _summary(outcome: Result, op: Op, timings: dict[str, float]) -> dict[str, Any]:
    return {
        "matrix_shape": list(outcome.array.shape),
        "elapsed_time": outcome.elapsed_time,
        "device": outcome.device,
        "op": op.name,
        "backend": outcome.backend,
        "device_name": outcome.device_name,
        "dtype": dtype_name(outcome.array.dtype),
        "timings": timings,
    }


async def _off_loop_if_large(convert: Callable[[np.ndarray], T], array: np.ndarray) -> T:
    """``convert(array)``, on a worker thread when the array is large enough to hold the loop."""
    if array.nbytes <= LOOP_BYTES:
        return convert(array)
    return await run_in_threadpool(convert, array)


async def _array_response(
    outcome: Result, op: Op, timings: dict[str, float], fmt: ResultFormat
) -> Response:
    encode, media_type = (
        (encode_npz, NPZ_MEDIA_TYPE) if fmt is ResultFormat.npz else (encode_npy, NPY_MEDIA_TYPE)
    )
    content = await _off_loop_if_large(encode, outcome.array)
    values = (
        repr(outcome.elapsed_time),
        outcome.device,
        outcome.backend,
        op.name,
        ",".join(str(n) for n in outcome.array.shape),
        dtype_name(outcome.array.dtype),
        json.dumps(timings, separators=(",", ":")),
    )
    return Response(
        content, media_type=media_type, headers=dict(zip(RESULT_HEADERS, values, strict=True))
    )


# The request headers run_op reads: one pass over them instead of a lookup each.
OP_HEADERS = frozenset({b"content-type", b"content-length", b"accept"})


def _headers(scope: Scope) -> dict[bytes, str]:
    """Content-Type, Content-Length and Accept (those present, first of each, as Starlette's
    ``request.headers.get`` finds them)."""
    found: dict[bytes, str] = {}
    for key, value in scope["headers"]:
        if key in OP_HEADERS and key not in found:
            found[key] = value.decode("latin-1")
    return found


def _format_from_accept(accept: str) -> ResultFormat | None:
    if NPZ_MEDIA_TYPE in accept:
        return ResultFormat.npz
    if NPY_MEDIA_TYPE in accept:
        return ResultFormat.npy
    return None
