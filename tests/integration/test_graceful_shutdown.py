"""SIGTERM while a request is in flight: the request completes, then the server exits 0."""

from __future__ import annotations

import signal
import sys
import threading
import time

import httpx
import numpy as np

from arrayfiles import npz_bytes
from servers import LiveServer, free_port, server_env


def _slow_multipart(a: bytes, b: bytes, seconds: float):
    """A multipart body that trickles in over ``seconds``, so SIGTERM lands mid-upload."""
    boundary = "slowboundary"
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.npz"'
            f"\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
            for name, data in (("file_a", a), ("file_b", b))
        )
        + f"--{boundary}--\r\n".encode()
    )
    pieces = 20

    def chunks():
        step = -(-len(body) // pieces)
        for start in range(0, len(body), step):
            time.sleep(seconds / pieces)
            yield body[start : start + step]

    return chunks(), {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_sigterm_lets_the_in_flight_request_finish_and_exits_0():
    port = free_port()
    args = [sys.executable, "-m", "gpu_matrix_service", "serve", "--port", str(port)]
    server = LiveServer(args, server_env(GMS_BACKEND="cpu"), port)
    a = np.random.default_rng().standard_normal((256, 256))
    outcome: dict = {}
    try:
        server.wait_ready()
        content, headers = _slow_multipart(npz_bytes(a), npz_bytes(a), seconds=3.0)

        def send() -> None:
            outcome["response"] = httpx.post(
                f"{server.url}/add?result=npz", content=content, headers=headers, timeout=30
            )

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(1.0)  # the upload is under way
        server.process.send_signal(signal.SIGTERM)
        sender.join(30)
        exit_code = server.process.wait(timeout=30)
    finally:
        log = server.stop()
    response = outcome["response"]
    assert response.status_code == 200, log
    with np.load(__import__("io").BytesIO(response.content)) as archive:
        np.testing.assert_array_equal(archive["result"], a + a)
    assert exit_code == 0, log
    assert "Shutting down" in log or "shutdown" in log.lower()
