"""In process, without sockets: microseconds one ``POST /add`` of two small ``.npz`` costs the
service's ASGI app, against the receive-only floor's app, and where the service's time goes.

    python scripts/request_cost.py --backend cuda --size 64 [--stages] [--uvloop]

What uvicorn itself costs per request (HTTP parsing, the transport) is the same for both and
is not here; ``bench http`` measures the whole. ``--stages`` times the reading of the upload,
the computation and the metrics by wrapping those functions (which adds a little).
``--essentials`` also times a bare ASGI app that does only the work no service can skip,
with the service's own functions: split the body, decode both files into the backend's host
memory, compute on the backend, answer the three contract fields. No framework, limits,
admission, timeouts, metrics or error mapping: what is left of a request when all of that
costs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from starlette.types import ASGIApp

import gpu_matrix_service.compute as compute
import gpu_matrix_service.multipart_splitter as multipart_splitter
import gpu_matrix_service.routes.ops as ops
import gpu_matrix_service.uploads as uploads
from gpu_matrix_service.app import create_app
from gpu_matrix_service.backends.base import RunOptions
from gpu_matrix_service.bench.floor import create_floor_app
from gpu_matrix_service.compute import ComputeService
from gpu_matrix_service.metrics import ServiceMetrics
from gpu_matrix_service.ops import get_op
from gpu_matrix_service.settings import Settings
from gpu_matrix_service.whole_body import split_whole_body

BOUNDARY = b"request-cost-boundary"
ADD = get_op("add")


def upload_body(size: int) -> bytes:
    """A two-file multipart body as clients send it: two n x n float32 ``.npz``."""
    rng = np.random.default_rng(0)
    body = b""
    for name in ("file_a", "file_b"):
        buffer = io.BytesIO()
        np.savez(buffer, rng.standard_normal((size, size)).astype(np.float32))
        body += (
            b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="' + name.encode()
            + b'"; filename="' + name.encode() + b'.npz"\r\nContent-Type: '
            b"application/octet-stream\r\n\r\n" + buffer.getvalue() + b"\r\n"
        )  # fmt: skip
    return body + b"--" + BOUNDARY + b"--\r\n"


async def post(app: ASGIApp, body: bytes) -> None:
    """One ``POST /add`` through ``app``, the body in one message as a server delivers it."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/add", "raw_path": b"/add", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        "headers": [(b"host", b"x"), (b"content-length", str(len(body)).encode()),
                    (b"content-type", b"multipart/form-data; boundary=" + BOUNDARY)],
    }  # fmt: skip
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # no disconnect while the app answers
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    if status != [200]:
        raise RuntimeError(f"POST /add answered {status}")


async def lifespan(app: ASGIApp) -> Callable[[], Awaitable[None]]:
    """Start ``app``'s lifespan; returns the coroutine function that shuts it down."""
    inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                   inbox.get, outbox.put))  # fmt: skip
    started = await outbox.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"start-up failed: {started}")

    async def shutdown() -> None:
        await inbox.put({"type": "lifespan.shutdown"})
        await task

    return shutdown


def create_essentials_app(settings: Settings) -> ASGIApp:
    """The work of a well-formed two-file ``POST /add`` and nothing else (see the docstring)."""
    service: ComputeService | None = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal service
        if scope["type"] == "lifespan":
            await receive()
            service = ComputeService(settings)
            await send({"type": "lifespan.startup.complete"})
            await receive()
            service.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert service is not None
        content_type = dict(scope["headers"])[b"content-type"].decode("latin-1")
        body = (await receive())["body"]
        pieces = split_whole_body(
            body, uploads.multipart_boundary(content_type),
            max_parts=multipart_splitter.MAX_PARTS,
            max_header_bytes=multipart_splitter.MAX_HEADER_BYTES,
        )  # fmt: skip
        assert pieces is not None
        part_name = multipart_splitter.part_from_headers
        a, b = (service.decode_in_one_piece(part_name(block).name, content)
                for block, content in pieces)  # fmt: skip
        assert a is not None
        assert b is not None
        result = service.backend.run(ADD, a, b, RunOptions())
        shape, seconds = list(result.array.shape), result.elapsed_time
        answer = orjson.dumps(
            {"matrix_shape": shape, "elapsed_time": seconds, "device": result.device}
        )
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(answer)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": answer})

    return app


SPENT: dict[str, list[float]] = {}


def timed(owner: object, name: str, label: str) -> None:
    """Replace ``owner.name`` (a function or coroutine function) by one that records its time."""
    function = getattr(owner, name)

    @functools.wraps(function)
    async def timed_coroutine(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await function(*args, **kwargs)
        finally:
            SPENT.setdefault(label, []).append(time.perf_counter() - start)

    @functools.wraps(function)
    def timed_call(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SPENT.setdefault(label, []).append(time.perf_counter() - start)

    setattr(owner, name, timed_coroutine if asyncio.iscoroutinefunction(function) else timed_call)


async def cost(app: ASGIApp, body: bytes, requests: int, repeats: int) -> float:
    """Microseconds per request, the best of ``repeats`` runs of ``requests`` after warm-up."""
    shutdown = await lifespan(app)
    for _ in range(requests // 5):
        await post(app, body)
    best, best_spent = float("inf"), {}
    for _ in range(repeats):
        SPENT.clear()
        start = time.perf_counter()
        for _ in range(requests):
            await post(app, body)
        seconds = (time.perf_counter() - start) / requests
        if seconds < best:
            best, best_spent = seconds, {k: list(v) for k, v in SPENT.items()}
    await shutdown()
    SPENT.clear()
    SPENT.update(best_spent)  # the stages of the fastest run
    return best * 1e6


async def main(args: argparse.Namespace) -> None:
    body = upload_body(args.size)
    floor = await cost(create_floor_app(), body, args.requests, args.repeats)
    if args.stages:
        timed(ops, "read_multipart", "read and decode")
        timed(uploads.Upload, "operands", "operands")
        timed(compute.ComputeService, "compute", "compute")
        timed(ServiceMetrics, "record_computation", "metrics")
        timed(ops, "run_op", "handler")
    settings = Settings(_env_file=None, backend=args.backend)
    essentials = None
    if args.essentials:
        essentials = await cost(create_essentials_app(settings), body, args.requests, args.repeats)
    service = await cost(create_app(settings), body, args.requests, args.repeats)
    line = f"{args.size}x{args.size} float32 add: floor {floor:.1f} us, service {service:.1f} us"
    if essentials is not None:
        line += f", essentials {essentials:.1f} us"
    if SPENT:
        medians = (f"{k} {statistics.median(v) * 1e6:.1f}" for k, v in SPENT.items())
        line += " (medians: " + ", ".join(medians) + ")"
    print(line)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stages", action="store_true", help="time the handler's stages")
    parser.add_argument("--essentials", action="store_true",
                        help="also time the bare essential work (see the docstring)")  # fmt: skip
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, as uvicorn does")
    arguments = parser.parse_args()
    if arguments.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main(arguments))
