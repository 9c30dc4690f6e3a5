"""A real server process on a free loopback port, driven the way users drive it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import requests

from gpu_matrix_service.client import Client, ServiceResponseError

from arrayfiles import npz_bytes
from servers import REPO, LiveServer, free_port, server_env

EXAMPLES = REPO / "examples"


def test_lab_client_with_requests_files_gets_the_contract(live_server):
    with (EXAMPLES / "matrix1.npz").open("rb") as f1, (EXAMPLES / "matrix2.npz").open("rb") as f2:
        response = requests.post(
            f"{live_server.url}/add", files={"file_a": f1, "file_b": f2}, timeout=30
        )
    assert response.status_code == 200
    body = response.json()
    assert body["matrix_shape"] == [512, 512] and body["device"] == "CPU"
    assert isinstance(body["elapsed_time"], float)


def test_lab_client_mismatched_shapes_get_400(live_server):
    files = {
        "matrix1": ("m1.npz", (EXAMPLES / "matrix1.npz").read_bytes()),
        "matrix2": ("m2.npz", (EXAMPLES / "matrix_mismatched.npz").read_bytes()),
    }
    response = httpx.post(f"{live_server.url}/add", files=files, timeout=30)
    assert response.status_code == 400
    assert "[512, 512]" in response.json()["detail"] and "[256, 512]" in response.json()["detail"]


def test_python_client_computes_every_op_against_numpy(live_server, rng):
    a, b = rng.standard_normal((33, 47)), rng.standard_normal((33, 47))
    c = rng.standard_normal((47, 29))
    with Client(live_server.url) as client:
        assert client.health()["status"] == "ok"
        assert client.gpu_info()["gpus"] == []
        np.testing.assert_array_equal(client.add(a, b, want_result=True).result, a + b)
        for name in ("subtract", "multiply"):
            out = client.op(name, a, b, want_result=True)
            np.testing.assert_array_equal(out.result, getattr(np, name)(a, b))
        out = client.op("matmul", a, c, want_result=True)
        np.testing.assert_allclose(out.result, a @ c, rtol=1e-12)
        summary = client.op("matmul", a, c)
        assert summary.matrix_shape == [33, 29] and summary.result is None
        with pytest.raises(ServiceResponseError) as error:
            client.add(a, c)
        assert error.value.status_code == 400
        assert 'request_count_total{endpoint="/add",method="POST",status="400"}' in client.metrics()


def test_large_uploads_add_right_and_a_boundary_inside_their_data_is_400(live_server, rng):
    # 4.8 MB operands: their CRC and boundary checks run off the event loop (GMS_UPLOAD_THREADS).
    a = rng.standard_normal((1100, 1100)).astype(np.float32)
    b = rng.standard_normal((1100, 1100)).astype(np.float32)
    with Client(live_server.url) as client:
        np.testing.assert_array_equal(client.add(a, b, want_result=True).result, a + b)
    boundary = "x7boundary"
    inside = bytearray(a.tobytes())  # the boundary in file_a's own data: its CRC is right
    inside[3_000_000 : 3_000_000 + len(boundary) + 4] = f"\r\n--{boundary}".encode()
    body = b""
    for name, array in (("file_a", np.frombuffer(bytes(inside), a.dtype)), ("file_b", b)):
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{name}.npz"\r\n\r\n')  # fmt: skip
        body += head.encode() + npz_bytes(array) + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    response = httpx.post(
        f"{live_server.url}/add", content=body, timeout=30,
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )  # fmt: skip
    assert response.status_code == 400
    assert "boundary occurs inside the data of file 'file_a'" in response.json()["detail"]
    with Client(live_server.url) as client:  # and it goes on serving
        assert client.add(a[:3], b[:3]).matrix_shape == [3, 1100]


def _cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpu_matrix_service", *args, "--url", url],
        capture_output=True, text=True, env=server_env(), timeout=60, check=False,
    )  # fmt: skip


def test_cli_add_and_op_write_the_result(live_server, tmp_path: Path):
    output = tmp_path / "sum.npz"
    done = _cli("add", str(EXAMPLES / "matrix1.npz"), str(EXAMPLES / "matrix2.npz"),
                "-o", str(output), url=live_server.url)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "512, 512" in done.stdout
    with np.load(EXAMPLES / "matrix1.npz") as m1, np.load(EXAMPLES / "matrix2.npz") as m2:
        expected_sum, expected_product = m1["matrix"] + m2["matrix"], m1["matrix"] @ m2["matrix"]
    with np.load(output) as archive:
        np.testing.assert_array_equal(archive["result"], expected_sum)
    output = tmp_path / "product.npz"
    done = _cli("op", "matmul", str(EXAMPLES / "matrix1.npz"), str(EXAMPLES / "matrix2.npz"),
                "-o", str(output), url=live_server.url)  # fmt: skip
    assert done.returncode == 0, done.stderr
    with np.load(output) as archive:
        np.testing.assert_allclose(archive["result"], expected_product, rtol=1e-4)


def test_cli_reports_service_errors_with_exit_1(live_server):
    done = _cli("add", str(EXAMPLES / "matrix1.npz"), str(EXAMPLES / "matrix_mismatched.npz"),
                url=live_server.url)  # fmt: skip
    assert done.returncode == 1
    assert "400" in done.stderr and "[256, 512]" in done.stderr


def test_cli_unreachable_service_is_exit_2():
    done = _cli("health", url=f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 2 and "cannot reach" in done.stderr


def test_main_py_serves_on_the_port_variable():
    port = free_port()
    server = LiveServer([sys.executable, "main.py"], server_env(PORT=str(port), GMS_BACKEND="cpu"),
                        port)  # fmt: skip
    try:
        server.wait_ready()
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    finally:
        server.stop()


def test_version_command_prints_the_version():
    from gpu_matrix_service import __version__

    done = subprocess.run([sys.executable, "-m", "gpu_matrix_service", "version"],
                          capture_output=True, text=True, env=server_env(), check=True)  # fmt: skip
    assert done.stdout.strip() == __version__
