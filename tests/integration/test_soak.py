"""A soak test: a real server under a minute of mixed traffic, answering right, leaking nothing.

32 concurrent clients on loopback send good requests (every op, several dtypes and shapes,
``?result=npz``, answers checked against NumPy) and bad ones (mismatched shapes, junk bytes,
truncated archives, object arrays, a missing file, the wrong content type, and uploads
abandoned half way). Every good answer must be right, every bad one a 4xx with a JSON
``detail``, nothing a 5xx; the server's memory and open file descriptors must stay flat
after warm-up. ``GMS_SOAK_SECONDS`` sets the duration (default 60).
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import numpy as np
import psutil
import pytest

from arrayfiles import npy_bytes, npz_bytes, random_array

pytestmark = pytest.mark.soak

SOAK_SECONDS = float(os.environ.get("GMS_SOAK_SECONDS", "60"))
CLIENTS = 32
SAMPLE_EVERY_SECONDS = 0.5
# The first quarter warms up (imports, BLAS threads, allocator arenas); the baseline is the
# next fifth, compared with the last fifth.
WARM_UP, BASELINE_END, FINAL_START = 0.25, 0.45, 0.8
RSS_TOLERANCE_BYTES = 25 * 1024 * 1024
FD_TOLERANCE = 10
# A leak of this much per request must exceed the RSS tolerance between the two windows.
LEAK_TO_CATCH_BYTES = 1024 * 1024

ELEMENTWISE = ("add", "subtract", "multiply")
DTYPES = ("float32", "float64", "int32", "int64", "complex64")


@dataclass
class Tally:
    """What the clients saw: outcomes by request kind, status codes, and what went wrong."""

    outcomes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    good_done_at: list[float] = field(default_factory=list)

    def answered(self, response: httpx.Response) -> httpx.Response:
        self.statuses[response.status_code] += 1
        return response

    def check(self, kind: str, ok: bool, what: str) -> None:
        self.outcomes[kind] += 1
        if not ok:
            self.wrong.append(f"{kind}: {what}")


async def post_files(
    client: httpx.AsyncClient, tally: Tally, path: str, files: dict[str, tuple[str, bytes]]
) -> httpx.Response:
    return tally.answered(await client.post(path, files=files))


def expect_refusal(tally: Tally, kind: str, response: httpx.Response, status: int) -> None:
    """A bad request: exactly ``status``, with a JSON ``detail`` saying why."""
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    ok = response.status_code == status and isinstance(detail, str) and bool(detail)
    tally.check(kind, ok, f"{response.status_code} {response.text[:200]}")


async def good_request(client: httpx.AsyncClient, rng: np.random.Generator, tally: Tally) -> None:
    op = str(rng.choice([*ELEMENTWISE, "matmul"]))
    dtype = str(rng.choice(DTYPES))
    m, k, n = (int(x) for x in rng.integers(1, 96, size=3))
    if rng.random() < 0.05:
        m = k = n = 256  # now and then a bigger one: 512 KiB operands in float64
    a = random_array(rng, (m, k), dtype)
    b = random_array(rng, (k, n) if op == "matmul" else (m, k), dtype)
    write = npz_bytes if rng.random() < 0.5 else npy_bytes
    path = "/add" if op == "add" and rng.random() < 0.3 else f"/v1/ops/{op}"
    files = {"file_a": ("a.npz", write(a)), "file_b": ("b.npz", write(b))}
    response = await post_files(client, tally, f"{path}?result=npz", files)
    if response.status_code != 200:
        tally.check(f"good {op}", False, f"{response.status_code} {response.text[:200]}")
        return
    out = np.load(io.BytesIO(response.content), allow_pickle=False)["result"]
    expected = getattr(np, op)(a, b)
    if op == "matmul" and expected.dtype.kind in "fc":  # summation order may differ
        rtol = 1e-4 if expected.dtype in (np.float32, np.complex64) else 1e-10
        ok = out.dtype == expected.dtype and np.allclose(out, expected, rtol=rtol, atol=rtol)
    else:
        ok = out.dtype == expected.dtype and np.array_equal(out, expected)
    tally.check(f"good {op}", ok, f"{dtype} {a.shape} {b.shape}: result differs from NumPy")
    tally.good_done_at.append(time.monotonic())


def small_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.standard_normal((4, 5)), rng.standard_normal((5, 4))


async def mismatched_shapes(client: httpx.AsyncClient, rng: np.random.Generator, tally: Tally):
    a, b = small_pair(rng)
    files = {"file_a": ("a.npz", npz_bytes(a)), "file_b": ("b.npz", npz_bytes(b))}
    response = await post_files(client, tally, "/add", files)
    expect_refusal(tally, "mismatched shapes", response, 400)


async def junk_bytes(client: httpx.AsyncClient, rng: np.random.Generator, tally: Tally):
    junk = rng.bytes(int(rng.integers(1, 4096)))
    a, _ = small_pair(rng)
    files = {"file_a": ("a.npz", junk), "file_b": ("b.npz", npz_bytes(a))}
    response = await post_files(client, tally, "/v1/ops/multiply", files)
    expect_refusal(tally, "junk bytes", response, 400)


async def truncated_npz(client: httpx.AsyncClient, rng: np.random.Generator, tally: Tally):
    a = rng.standard_normal((32, 32))
    whole = npz_bytes(a)
    # Cut inside the member, before the central directory: no decoder can have the array.
    cut = whole[: int(rng.integers(10, whole.find(b"PK\x01\x02")))]
    files = {"file_a": ("a.npz", npz_bytes(a)), "file_b": ("b.npz", cut)}
    response = await post_files(client, tally, "/v1/ops/add", files)
    expect_refusal(tally, "truncated npz", response, 400)


OBJECT_NPY = npy_bytes(np.array([{"x": 1}, None], dtype=object))


async def object_dtype(client: httpx.AsyncClient, rng: np.random.Generator, tally: Tally):
    files = {"file_a": ("a.npy", OBJECT_NPY), "file_b": ("b.npy", OBJECT_NPY)}
    response = await post_files(client, tally, "/add", files)
    expect_refusal(tally, "object dtype", response, 415)


async def missing_file(client: httpx.AsyncClient, rng: np.random.Generator, tally: Tally):
    a, _ = small_pair(rng)
    response = await post_files(client, tally, "/v1/ops/matmul", {"file_a": ("a", npz_bytes(a))})
    expect_refusal(tally, "missing file", response, 400)


async def wrong_content_type(client: httpx.AsyncClient, rng: np.random.Generator, tally: Tally):
    response = tally.answered(await client.post("/add", json={"file_a": [1, 2], "file_b": [3]}))
    expect_refusal(tally, "wrong content type", response, 415)


async def abandoned_upload(client: httpx.AsyncClient, rng: np.random.Generator, tally: Tally):
    """Send half of a large upload, stall, and hang up: the server must drop the request."""
    a = rng.standard_normal((256, 256))
    boundary = "soak-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file_a"; filename="a.npy"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + npy_bytes(a)  # file_b and the closing boundary never come

    async def stall() -> AsyncIterator[bytes]:
        yield body[: len(body) // 2]
        await asyncio.sleep(60)
        yield body[len(body) // 2 :]

    headers = {
        "content-type": f"multipart/form-data; boundary={boundary}",
        "content-length": str(len(body) + 1000),
    }
    try:
        response = await asyncio.wait_for(
            client.post("/add", content=stall(), headers=headers),
            timeout=float(rng.uniform(0.05, 0.3)),
        )
    except TimeoutError:
        tally.check("abandoned upload", True, "")
        return
    tally.answered(response)
    tally.check("abandoned upload", False, f"answered {response.status_code} before the end")


BAD_REQUESTS: tuple[Callable[..., Awaitable[None]], ...] = (
    mismatched_shapes, junk_bytes, truncated_npz, object_dtype, missing_file,
    wrong_content_type, abandoned_upload,
)  # fmt: skip


async def client_loop(url: str, seed: int, deadline: float, tally: Tally) -> None:
    """One client: good and bad requests in random order until the deadline."""
    rng = np.random.default_rng(seed)
    # A client of its own, so an abandoned upload's dropped connection costs only this one.
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        while time.monotonic() < deadline:
            try:
                if rng.random() < 0.6:
                    await good_request(client, rng, tally)
                else:
                    await BAD_REQUESTS[int(rng.integers(len(BAD_REQUESTS)))](client, rng, tally)
            except httpx.TransportError as exc:
                tally.wrong.append(f"transport error: {exc!r}")


class ServerLog:
    """Reads the server's merged stdout/stderr so the pipe never fills and blocks it."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._drain, args=(process.stdout,), daemon=True)
        self._thread.start()

    def _drain(self, stream: io.TextIOBase) -> None:
        for line in stream:
            self.lines.append(line)


@dataclass
class Sample:
    at: float
    rss: int
    fds: int


async def sample_resources(pid: int, deadline: float, samples: list[Sample]) -> None:
    process = psutil.Process(pid)
    while time.monotonic() < deadline:
        samples.append(Sample(time.monotonic(), process.memory_info().rss, process.num_fds()))
        await asyncio.sleep(SAMPLE_EVERY_SECONDS)


def window(samples: list[Sample], start: float, fraction_from: float, fraction_to: float):
    lo, hi = start + fraction_from * SOAK_SECONDS, start + fraction_to * SOAK_SECONDS
    return [s for s in samples if lo <= s.at <= hi]


async def in_flight_settles(url: str) -> float:
    """``requests_in_flight`` once abandoned uploads are dropped: 1, the scrape itself."""
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
        for _ in range(50):
            metrics = (await client.get("/metrics")).text
            match = re.search(r"^requests_in_flight(?:\{[^}]*\})? (\S+)$", metrics, re.M)
            assert match, "requests_in_flight missing from /metrics"
            if float(match.group(1)) == 1.0:
                break
            await asyncio.sleep(0.2)
        server_errors = re.findall(r'^request_count_total\{[^}]*status="5\d\d"[^}]*\} (\S+)$',
                                   metrics, re.M)  # fmt: skip
        assert not [n for n in server_errors if float(n) > 0], "the server counted 5xx answers"
        return float(match.group(1))


def test_soak_mixed_traffic_answers_right_and_leaks_nothing(live_server):
    log = ServerLog(live_server.process)
    tally, samples = Tally(), []

    async def soak() -> None:
        start = time.monotonic()
        deadline = start + SOAK_SECONDS
        await asyncio.gather(
            sample_resources(live_server.process.pid, deadline, samples),
            *(client_loop(live_server.url, seed, deadline, tally) for seed in range(CLIENTS)),
        )

    asyncio.run(soak())
    start = samples[0].at

    server_errors = {status: n for status, n in tally.statuses.items() if status >= 500}
    assert not server_errors, f"{server_errors}; {tally.wrong[:20]}"
    assert not tally.wrong, tally.wrong[:20]
    kinds = {f"good {op}" for op in (*ELEMENTWISE, "matmul")} | {
        "mismatched shapes", "junk bytes", "truncated npz", "object dtype", "missing file",
        "wrong content type", "abandoned upload",
    }  # fmt: skip
    assert kinds <= set(tally.outcomes), f"some kinds never ran: {tally.outcomes}"
    assert asyncio.run(in_flight_settles(live_server.url)) == 1.0

    baseline = window(samples, start, WARM_UP, BASELINE_END)
    final = window(samples, start, FINAL_START, 1.0)
    assert len(baseline) >= 3 and len(final) >= 3, "too few samples: raise GMS_SOAK_SECONDS"
    between = [t for t in tally.good_done_at if baseline[-1].at < t < final[0].at]
    # Enough requests ran between the windows for a small per-request leak to show.
    assert len(between) * LEAK_TO_CATCH_BYTES > RSS_TOLERANCE_BYTES, len(between)
    rss_growth = statistics.median(s.rss for s in final) - statistics.median(
        s.rss for s in baseline
    )
    fd_growth = statistics.median(s.fds for s in final) - statistics.median(s.fds for s in baseline)
    summary = f"{tally.outcomes}; RSS {rss_growth / 2**20:+.1f} MiB, fds {fd_growth:+}"
    assert rss_growth < RSS_TOLERANCE_BYTES, summary
    assert fd_growth < FD_TOLERANCE, summary
    assert not [line for line in log.lines if "Traceback" in line], "".join(log.lines[-50:])
