"""A small Python client for the service (httpx), used by the CLI and the tests.

from gpu_matrix_service.client import Client
with Client("http://127.0.0.1:8000") as client:
    out = client.add(a, b, want_result=True)   # arrays, or paths to .npz/.npy files
    print(out.matrix_shape, out.elapsed_time, out.device, out.result)
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from gpu_matrix_service.arrays import encode_npy

Operand = np.ndarray | str | Path | bytes

DEFAULT_URL = "http://127.0.0.1:8000"


class ServiceResponseError(RuntimeError):
    """The service answered with an error status; ``detail`` is its explanation."""

    def __init__(self, status_code: int, detail: Any) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


@dataclass
class OpResult:
    """What the service answered for one operation. Seconds for every time."""

    matrix_shape: list[int]
    elapsed_time: float
    device: str
    backend: str
    dtype: str
    timings: dict[str, float] = field(default_factory=dict)
    result: np.ndarray | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def _file_part(operand: Operand, default_name: str) -> tuple[str, bytes, str]:
    """A multipart file tuple: arrays are sent as .npy, paths and bytes as they are."""
    if isinstance(operand, np.ndarray):
        return (f"{default_name}.npy", encode_npy(operand), "application/octet-stream")
    if isinstance(operand, bytes):
        return (f"{default_name}.npz", operand, "application/octet-stream")
    path = Path(operand)
    return (path.name, path.read_bytes(), "application/octet-stream")


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        detail = response.json().get("detail", response.text)
    except (json.JSONDecodeError, AttributeError):
        detail = response.text
    raise ServiceResponseError(response.status_code, detail)


class Client:
    """Talks to one gpu-matrix-service instance. Use as a context manager, or call close()."""

    def __init__(
        self, base_url: str = DEFAULT_URL, *, timeout: float = 300.0, token: str | None = None
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def health(self) -> dict[str, Any]:
        """``GET /health``."""
        return self._get_json("/health")

    def gpu_info(self) -> dict[str, Any]:
        """``GET /gpu-info``."""
        return self._get_json("/gpu-info")

    def metrics(self) -> str:
        """``GET /metrics`` as Prometheus text."""
        response = self._http.get("/metrics")
        _raise_for_error(response)
        return response.text

    def add(self, a: Operand, b: Operand, *, want_result: bool = False) -> OpResult:
        """``POST /add``: elementwise sum (the lab contract)."""
        return self._post("/add", a, b, want_result=want_result, allow_tf32=False)

    def op(
        self,
        name: str,
        a: Operand,
        b: Operand,
        *,
        want_result: bool = False,
        allow_tf32: bool = False,
    ) -> OpResult:
        """``POST /v1/ops/{name}``: add, subtract, multiply or matmul."""
        return self._post(f"/v1/ops/{name}", a, b, want_result=want_result, allow_tf32=allow_tf32)

    def _get_json(self, path: str) -> dict[str, Any]:
        response = self._http.get(path)
        _raise_for_error(response)
        body: dict[str, Any] = response.json()
        return body

    def _post(
        self, path: str, a: Operand, b: Operand, *, want_result: bool, allow_tf32: bool
    ) -> OpResult:
        files = {"file_a": _file_part(a, "a"), "file_b": _file_part(b, "b")}
        params: dict[str, str] = {"allow_tf32": "true"} if allow_tf32 else {}
        if want_result:
            params["result"] = "npz"
        response = self._http.post(path, files=files, params=params)
        _raise_for_error(response)
        if not want_result:
            body = response.json()
            return OpResult(
                matrix_shape=body["matrix_shape"],
                elapsed_time=body["elapsed_time"],
                device=body["device"],
                backend=body.get("backend", ""),
                dtype=body.get("dtype", ""),
                timings=body.get("timings", {}),
                raw=body,
            )
        with np.load(io.BytesIO(response.content), allow_pickle=False) as archive:
            result = archive["result"]
        headers = response.headers
        return OpResult(
            matrix_shape=list(result.shape),
            elapsed_time=float(headers["X-Elapsed-Time"]),
            device=headers["X-Device"],
            backend=headers.get("X-Backend", ""),
            dtype=headers.get("X-Dtype", str(result.dtype)),
            timings=json.loads(headers.get("X-Timings", "{}")),
            result=result,
        )
